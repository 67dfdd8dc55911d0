#!/bin/sh
# Stage C fine-tuning (README "模型微调训练"). Every variable below can be set from the environment:
#   sh train.sh                                   # 1B (lite) Stage C, weights from config.py's WEIGHTS_PATH
#   DATASET_PATH=./my_data OUTPUT_DIR=./out MAX_STEPS=2000 sh train.sh
#   USE_AMP=True fp16_opt_level=O2 sh train.sh     # fp16 (GPU only); USE_BF16=True is the safer choice
#   MODEL_VERSION=tiny sh train.sh                # offline CPU demo on assets/demo_dataset (~2 minutes)
#   GPUS=0,1,2,3 sh train.sh                      # multi-GPU: python -m paddle.distributed.launch --gpus
#   MODEL_VERSION=3.6B GPUS=0,1,2,3,4,5,6,7 SHARDING=stage2 RECOMPUTE=True USE_BF16=True sh train.sh
#   STAGE=b sh train.sh                           # Stage B (700M lite; MODEL_VERSION=3B, or tiny offline)
#   STAGE=sd MODEL_VERSION=tiny sh train.sh       # SD v1 offline recipe: tiny parts, data, pretrain, sample (~1 min)
#   LoRA: sh train.sh --lora_rank 4 --lora_alpha 1  # only the adapters train (either stage)
# Extra flags are passed through: sh train.sh --use_ema True --adaptive_loss_weight True
# Found from any folder: the trainers and the demo data are looked up next to this file, and the
# Python is the repository's .venv (the README's set-up command makes it) unless PYTHON is set.
REPO=$(dirname "$0")
if [ -z "${PYTHON}" ]; then
    if [ -x "${REPO}/.venv/bin/python" ]; then PYTHON="${REPO}/.venv/bin/python"; else PYTHON=python; fi
fi
STAGE=${STAGE:-c}
if [ "${STAGE}" = "sd" ]; then
    # SD v1 UNet pretraining, offline tiny recipe (README "Stable Diffusion: UNet pretraining"):
    # tiny random components -> jsonl + LAION part files -> pretrain -> sample. ~1 minute on CPU.
    #   STAGE=sd MODEL_VERSION=tiny sh train.sh   (OUTPUT_DIR, MAX_STEPS, RESOLUTION, ... as below)
    if [ "${MODEL_VERSION:-tiny}" != "tiny" ]; then
        echo "STAGE=sd runs the offline tiny recipe only (MODEL_VERSION=tiny); for real SD v1 weights" \
             "run train_txt2img_laion400m_trainer.py as in the README" >&2
        exit 2
    fi
    set -e
    OUTPUT_DIR=${OUTPUT_DIR:-./train_output_sd}
    DATASET_PATH=${DATASET_PATH:-${REPO}/assets/demo_dataset}
    RESOLUTION=${RESOLUTION:-32}
    MAX_STEPS=${MAX_STEPS:-40}
    SAVE_STEPS=${SAVE_STEPS:-20}
    NUM_INFERENCE_STEPS=${NUM_INFERENCE_STEPS:-10}
    LEARNING_RATE=${LEARNING_RATE:-1e-3}
    BATCH_SIZE=${BATCH_SIZE:-2}
    "${PYTHON}" "${REPO}/scripts/make_tiny_sd.py" --output_dir "${OUTPUT_DIR}/tiny_sd" \
        --dataset_dir "${DATASET_PATH}" --jsonl "${OUTPUT_DIR}/data.jsonl"
    "${PYTHON}" "${REPO}/create_pretraining_data.py" --input_path "${OUTPUT_DIR}/data.jsonl" \
        --output_path "${OUTPUT_DIR}/data" --per_part_file_num 4 --num_workers 0
    "${PYTHON}" -u "${REPO}/train_txt2img_laion400m_trainer.py" --do_train --output_dir "${OUTPUT_DIR}/pretrain" \
        --pretrained_model_name_or_path "${OUTPUT_DIR}/tiny_sd" \
        --unet_name_or_path "${OUTPUT_DIR}/tiny_sd/unet_config.json" \
        --file_list "${OUTPUT_DIR}/data/filelist/custom_dataset.filelist.list" \
        --per_device_train_batch_size ${BATCH_SIZE} --learning_rate ${LEARNING_RATE} --weight_decay 0.0 \
        --max_steps ${MAX_STEPS} --save_steps ${SAVE_STEPS} --save_total_limit 2 --lr_scheduler_type constant \
        --warmup_steps 0 --resolution ${RESOLUTION} --image_logging_steps 1000000 --logging_steps 5 \
        --seed 23 --dataloader_num_workers 0 --model_max_length 16 --max_grad_norm 1.0 --disable_tqdm True \
        --bf16 False --num_inference_steps ${NUM_INFERENCE_STEPS} "$@"
    "${PYTHON}" "${REPO}/scripts/generate_sd.py" --pretrained_model_name_or_path "${OUTPUT_DIR}/tiny_sd" \
        --unet_path "${OUTPUT_DIR}/pretrain/unet" --prompt "a red circle on a snowy white background" \
        --height ${RESOLUTION} --width ${RESOLUTION} --num_inference_steps ${NUM_INFERENCE_STEPS} \
        --scheduler ddim --seed 42 --output_dir "${OUTPUT_DIR}/samples"
    exit 0
fi
if [ "${STAGE}" = "b" ]; then
    TRAINER="${REPO}/scripts/train_stage_b_trainer.py"
    MODEL_VERSION=${MODEL_VERSION:-700M}
    RESOLUTION=${RESOLUTION:-$([ "${MODEL_VERSION}" = "tiny" ] && echo 128 || echo 1024)}
    NUM_INFERENCE_STEPS=${NUM_INFERENCE_STEPS:-10}
    OUTPUT_DIR=${OUTPUT_DIR:-./train_output_b}
elif [ "${STAGE}" = "c" ]; then
    TRAINER="${REPO}/train_stage_c_trainer.py"
else
    echo "STAGE must be b, c or sd, got ${STAGE}" >&2
    exit 2
fi
MODEL_VERSION=${MODEL_VERSION:-1B}
if [ "${MODEL_VERSION}" = "tiny" ]; then
    DATASET_PATH=${DATASET_PATH:-${REPO}/assets/demo_dataset}
    RESOLUTION=${RESOLUTION:-128}
    MAX_STEPS=${MAX_STEPS:-100}
    SAVE_STEPS=${SAVE_STEPS:-50}
    IMAGE_LOGGING_STEPS=${IMAGE_LOGGING_STEPS:-50}
    NUM_INFERENCE_STEPS=${NUM_INFERENCE_STEPS:-10}
    LEARNING_RATE=${LEARNING_RATE:-1.0e-3}
fi
DATASET_PATH=${DATASET_PATH:-./dataset}
OUTPUT_DIR=${OUTPUT_DIR:-./train_output}
RESOLUTION=${RESOLUTION:-768}
MAX_STEPS=${MAX_STEPS:-1000}
SAVE_STEPS=${SAVE_STEPS:-5000}
IMAGE_LOGGING_STEPS=${IMAGE_LOGGING_STEPS:-1000000}
NUM_INFERENCE_STEPS=${NUM_INFERENCE_STEPS:-200}
LEARNING_RATE=${LEARNING_RATE:-1.0e-4}
BATCH_SIZE=${BATCH_SIZE:-1}
USE_AMP=${USE_AMP:-False}
fp16_opt_level=${fp16_opt_level:-O1}
USE_BF16=${USE_BF16:-False}
RECOMPUTE=${RECOMPUTE:-False}
SHARDING=${SHARDING:-}

# TRAINING_PYTHON (a command line, split on spaces) replaces "${PYTHON} -u" when set; GPUS launches
# one process per GPU through paddle.distributed.launch.
run_trainer() {
    if [ -n "${GPUS}" ]; then
        "${PYTHON}" -u -m paddle.distributed.launch --gpus "${GPUS}" "$@"
    elif [ -n "${TRAINING_PYTHON}" ]; then
        ${TRAINING_PYTHON} "$@"
    else
        "${PYTHON}" -u "$@"
    fi
}
run_trainer "${TRAINER}" \
    --do_train \
    --dataset_path "${DATASET_PATH}" \
    --output_dir "${OUTPUT_DIR}" \
    --per_device_train_batch_size ${BATCH_SIZE} \
    --gradient_accumulation_steps 1 \
    --learning_rate ${LEARNING_RATE} \
    --weight_decay 0.01 \
    --max_grad_norm 1.0 \
    --max_steps ${MAX_STEPS} \
    --lr_scheduler_type "constant" \
    --warmup_steps 0 \
    --image_logging_steps ${IMAGE_LOGGING_STEPS} \
    --logging_steps 1 \
    --save_steps ${SAVE_STEPS} \
    --save_total_limit 50 \
    --seed 1 \
    --dataloader_num_workers 0 \
    --num_inference_steps ${NUM_INFERENCE_STEPS} \
    --model_max_length 77 \
    --fp16 ${USE_AMP} \
    --fp16_opt_level=${fp16_opt_level} \
    --bf16 ${USE_BF16} \
    --recompute ${RECOMPUTE} \
    --model_version ${MODEL_VERSION} \
    --resolution ${RESOLUTION} \
    ${SHARDING:+--sharding ${SHARDING}} \
    "$@"
