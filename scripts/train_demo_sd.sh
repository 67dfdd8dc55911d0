#!/bin/sh
# Rebuild the SD half of the demo (issue 14) from scratch on CPU, deterministic for SEED and THREADS:
#   1. parts: frozen random CLIP text encoder (10 positions) + word tokenizer + scheduler + UNet
#      config, and the small VAE trained on rendered shapes (scripts/make_demo_sd.py parts)
#   2. data: the shapes jsonl of the 81 trained combinations, lines shuffled (make_demo_sd.py data)
#   3. LAION part files from it (create_pretraining_data.py)
#   4. their VAE latents and text-encoder outputs, once (scripts/precompute_latents.py)
#   5. the UNet pretrained by train_txt2img_laion400m_trainer.py from those latents (--latents_path), with an EMA
#   6. the pipeline folder DEST (default assets/demo/sd, the EMA UNet), what `generate_sd.py --preset demo` reads
#   sh scripts/train_demo_sd.sh                      # one thread; timings in assets/demo/README.md
#   MAX_STEPS=2 VAE_STEPS=2 PER_COMBINATION=1 DEST=/tmp/x sh scripts/train_demo_sd.sh   # smoke run
# Every variable below can be set from the environment; extra flags go to the UNet trainer.
set -e
REPO=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON}" ]; then
    if [ -x "${REPO}/.venv/bin/python" ]; then PYTHON="${REPO}/.venv/bin/python"; else PYTHON=python; fi
fi
WORK_DIR=${WORK_DIR:-./demo_sd_build}
DEST=${DEST:-${REPO}/assets/demo/sd}
SEED=${SEED:-0}
THREADS=${THREADS:-1}
VAE_STEPS=${VAE_STEPS:-600}
PER_COMBINATION=${PER_COMBINATION:-32}
MAX_LENGTH=10   # ldm.demo.sd.MAX_LENGTH: the text encoder's positions
MAX_STEPS=${MAX_STEPS:-4000}
SAVE_STEPS=${SAVE_STEPS:-500}
BATCH_SIZE=${BATCH_SIZE:-16}
LEARNING_RATE=${LEARNING_RATE:-1e-3}
WARMUP_STEPS=${WARMUP_STEPS:-100}
EMA_DECAY=${EMA_DECAY:-0.999}
NOISE_OFFSET=${NOISE_OFFSET:-0.05}
export OMP_NUM_THREADS=${THREADS}
T0=$(date +%s)
# a fresh build (precompute_latents.py would keep a stopped pass's entries, the trainer resume a checkpoint)
rm -rf "${WORK_DIR}/parts" "${WORK_DIR}/data" "${WORK_DIR}/images" "${WORK_DIR}/data.jsonl" "${WORK_DIR}/latents" \
    "${WORK_DIR}/pretrain"
${PYTHON} "${REPO}/scripts/make_demo_sd.py" parts --output_dir "${WORK_DIR}/parts" --vae_steps ${VAE_STEPS} --seed ${SEED}
${PYTHON} "${REPO}/scripts/make_demo_sd.py" data --jsonl "${WORK_DIR}/data.jsonl" \
    --per_combination ${PER_COMBINATION} --seed ${SEED}
${PYTHON} "${REPO}/create_pretraining_data.py" --input_path "${WORK_DIR}/data.jsonl" \
    --output_path "${WORK_DIR}/data" --per_part_file_num 512 --num_workers 0
FILE_LIST="${WORK_DIR}/data/filelist/custom_dataset.filelist.list"
${PYTHON} "${REPO}/scripts/precompute_latents.py" --file_list "${FILE_LIST}" \
    --pretrained_model_name_or_path "${WORK_DIR}/parts" --resolution 128 --model_max_length ${MAX_LENGTH} \
    --latents_path "${WORK_DIR}/latents" --batch_size 16
${PYTHON} -u "${REPO}/train_txt2img_laion400m_trainer.py" --do_train --output_dir "${WORK_DIR}/pretrain" \
    --pretrained_model_name_or_path "${WORK_DIR}/parts" \
    --unet_name_or_path "${WORK_DIR}/parts/unet_config.json" --model_max_length ${MAX_LENGTH} \
    --file_list "${FILE_LIST}" --latents_path "${WORK_DIR}/latents" \
    --per_device_train_batch_size ${BATCH_SIZE} --learning_rate ${LEARNING_RATE} --weight_decay 0.0 \
    --max_steps ${MAX_STEPS} --save_steps ${SAVE_STEPS} --save_total_limit 1 --lr_scheduler_type cosine \
    --warmup_steps ${WARMUP_STEPS} --resolution 128 --center_crop True --image_logging_steps 0 \
    --logging_steps 50 --seed ${SEED} --dataloader_num_workers 0 --max_grad_norm 1.0 --disable_tqdm True \
    --bf16 False --noise_offset ${NOISE_OFFSET} --caption_drop_prob 0.1 --use_ema True --ema_decay ${EMA_DECAY} "$@"
${PYTHON} "${REPO}/scripts/make_demo_sd.py" package --parts "${WORK_DIR}/parts" \
    --unet "${WORK_DIR}/pretrain/unet_ema" --output_dir "${DEST}"
echo "demo SD rebuilt into ${DEST} in $(( $(date +%s) - T0 )) s"
