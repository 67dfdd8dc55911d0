#!/bin/sh
# Rebuild the shipped demo (issue 14) from scratch on CPU: the Stable Cascade family into
# assets/demo/cascade, then the SD family (scripts/train_demo_sd.sh) into assets/demo/sd.
#   sh scripts/train_demo.sh                       # both families, deterministic for SEED
#   FAMILIES=cascade sh scripts/train_demo.sh      # only Stable Cascade (FAMILIES=sd: only SD)
#   WORK=/tmp/demo_build OUT=/tmp/demo_cascade STEPS_SCALE=0.01 sh scripts/train_demo.sh   # a quick trial
#   SKIP_PARTS=1 sh scripts/train_demo.sh         # reuse WORK's data set and parts (steps 1-2), retrain B, C
# Stable Cascade steps (every network is the "demo" preset of its class, ldm/demo/cascade.py):
#   1. the shapes data set as a Stage C caption folder (ldm.demo.shapes.write_caption_folder, 256 px)
#   2. scripts/demo_cascade_parts.py: random frozen CLIP text + word tokenizer; Stage A trained as an
#      autoencoder; EfficientNet encoder + Previewer trained together as an autoencoder
#   3. train_stage_c_trainer.py --model_version demo (192 px = the 6 x 6 latents of a 256 px image)
#   4. scripts/train_stage_b_trainer.py --model_version demo (256 px, encoder cache)
#   5. the EMA weights of both into OUT (with the parts), a sample image
# Every Stable Cascade step runs on one thread (OMP_NUM_THREADS=1), one after the other; with both
# families the SD one (scripts/train_demo_sd.sh, log WORK/sd.log) trains at the same time, started first.
set -e
REPO=$(cd "$(dirname "$0")/.." && pwd)  # found from any folder
if [ -z "${PYTHON}" ]; then  # the repository's venv (README set-up) unless PYTHON names another
    if [ -x "${REPO}/.venv/bin/python" ]; then PYTHON="${REPO}/.venv/bin/python"; else PYTHON=python; fi
fi
PY=${PYTHON}
export PYTHON
SEED=${SEED:-0}
FAMILIES=${FAMILIES:-cascade sd}
WORK=${WORK:-./demo_build}
OUT=${OUT:-${REPO}/assets/demo/cascade}
STEPS_SCALE=${STEPS_SCALE:-1}   # multiplies every step count (a quick trial: 0.01)
PER_COMBINATION=${PER_COMBINATION:-8}
steps() { ${PY} -c "import sys; print(max(2, round(float(sys.argv[1]) * float(sys.argv[2]))))" "$1" "${STEPS_SCALE}"; }
STAGE_A_STEPS=${STAGE_A_STEPS:-$(steps 600)}
ENCODER_STEPS=${ENCODER_STEPS:-$(steps 3600)}
STAGE_B_STEPS=${STAGE_B_STEPS:-$(steps 1000)}
STAGE_C_STEPS=${STAGE_C_STEPS:-$(steps 1200)}
export PYTHONHASHSEED=0

part_start() { PART_T0=$(date +%s); echo "== demo: $1 ($(date -u +%H:%M:%S) UTC)"; }
part_end() { echo "== demo: $1 done in $(( $(date +%s) - PART_T0 )) s wall"; }
SD_PID=
case " ${FAMILIES} " in *" sd "*)
    if [ ! -f "${REPO}/scripts/train_demo_sd.sh" ]; then
        echo "scripts/train_demo_sd.sh not found: the SD half is skipped" >&2
        exit 1
    fi
    case " ${FAMILIES} " in
        *" cascade "*)  # both: SD in the background, on the other core
            mkdir -p "${WORK}"
            echo "== demo: SD family (scripts/train_demo_sd.sh) in the background, log ${WORK}/sd.log"
            WORK_DIR="${WORK}/sd" SEED="${SEED}" sh "${REPO}/scripts/train_demo_sd.sh" > "${WORK}/sd.log" 2>&1 &
            SD_PID=$! ;;
        *) WORK_DIR="${WORK}/sd" SEED="${SEED}" sh "${REPO}/scripts/train_demo_sd.sh" ;;
    esac
    ;;
esac

case " ${FAMILIES} " in *" cascade "*)
    export OMP_NUM_THREADS=1
    C_WORK="${WORK}/cascade"
    if [ "${SKIP_PARTS:-0}" = 1 ]; then  # reuse WORK's data set and parts (a run stopped after step 2)
        rm -rf "${C_WORK}/stage_b" "${C_WORK}/stage_c" "${C_WORK}/cache_b" "${C_WORK}/cache_c"
    else
    rm -rf "${C_WORK}"
    mkdir -p "${C_WORK}/weights"
    part_start "shapes caption folder"
    ${PY} -c "import sys; from ldm.demo.shapes import write_caption_folder; \
print(write_caption_folder(sys.argv[1], per_combination=int(sys.argv[2]), size=256, seed=int(sys.argv[3])), 'images')" \
        "${C_WORK}/data" "${PER_COMBINATION}" "${SEED}"
    part_end "shapes caption folder"

    PARTS="${PY} ${REPO}/scripts/demo_cascade_parts.py --output_dir ${C_WORK}/weights --seed ${SEED}"
    part_start "CLIP text"
    ${PARTS} --part clip
    part_end "CLIP text"
    part_start "Stage A"
    ${PARTS} --part stage_a --stage_a_steps "${STAGE_A_STEPS}" > "${C_WORK}/stage_a.log" 2>&1 || {
        echo "failed, see ${C_WORK}/stage_a.log" >&2; exit 1; }
    grep -h "s CPU" "${C_WORK}/stage_a.log"
    part_end "Stage A"
    part_start "EfficientNet + Previewer"
    ${PARTS} --part encoder --encoder_steps "${ENCODER_STEPS}" > "${C_WORK}/encoder.log" 2>&1 || {
        echo "failed, see ${C_WORK}/encoder.log" >&2; exit 1; }
    grep -h "s CPU" "${C_WORK}/encoder.log"
    part_end "EfficientNet + Previewer"
    fi

    # captions padded to the demo tokenizer's length (ldm.demo.cascade.MAX_LENGTH, its tokenizer_config.json)
    MAX_LENGTH=$(${PY} -c "import json, sys; print(json.load(open(sys.argv[1]))['model_max_length'])" \
        "${C_WORK}/weights/clip_text/tokenizer_config.json")
    COMMON="--do_train --weights_path ${C_WORK}/weights --dataset_path ${C_WORK}/data --multi_aspect_ratio 1 \
        --model_max_length ${MAX_LENGTH} --model_version demo --use_ema True --ema_decay 0.99 --lr_scheduler_type cosine --warmup_steps 20 \
        --weight_decay 0.0 --max_grad_norm 1.0 --image_logging_steps 1000000 --logging_steps 20 \
        --save_total_limit 1 --seed ${SEED} --dataloader_num_workers 0 --disable_tqdm True --overwrite_output_dir"
    # train LOG SCRIPT ARGS...: one trainer run, its log in C_WORK/LOG.log
    train() {
        LOG="${C_WORK}/$1.log"; shift
        # shellcheck disable=SC2086
        ${PY} -u "$@" ${COMMON} > "${LOG}" 2>&1 || { echo "failed, see ${LOG}" >&2; exit 1; }
        grep -h "train_runtime" "${LOG}" || true
    }
    part_start "Stage C (train_stage_c_trainer.py)"
    train stage_c "${REPO}/train_stage_c_trainer.py" --output_dir "${C_WORK}/stage_c" --cache_dir "${C_WORK}/cache_c" \
        --clip_image none --resolution 192 --per_device_train_batch_size 32 --learning_rate 2e-3 \
        --max_steps "${STAGE_C_STEPS}" --save_steps "${STAGE_C_STEPS}"
    part_end "Stage C"
    part_start "Stage B (scripts/train_stage_b_trainer.py)"
    train stage_b "${REPO}/scripts/train_stage_b_trainer.py" --output_dir "${C_WORK}/stage_b" \
        --cache_dir "${C_WORK}/cache_b" --resolution 256 --per_device_train_batch_size 8 --learning_rate 1e-3 \
        --max_steps "${STAGE_B_STEPS}" --save_steps "${STAGE_B_STEPS}"
    part_end "Stage B"
    cp "${C_WORK}/stage_b/stage_b_ema.safetensors" "${C_WORK}/weights/stage_b.safetensors"
    cp "${C_WORK}/stage_c/stage_c_ema.safetensors" "${C_WORK}/weights/stage_c.safetensors"

    mkdir -p "${OUT}"
    rm -rf "${OUT}/clip_text"
    cp -r "${C_WORK}/weights/clip_text" "${OUT}/clip_text"
    for f in stage_a effnet_encoder previewer stage_b stage_c; do
        cp "${C_WORK}/weights/${f}.safetensors" "${OUT}/${f}.safetensors"
    done
    part_start "sample"
    ${PY} "${REPO}/inference.py" --preset demo --weights_path "${OUT}" --caption "a red circle on a blue background" \
        --output_dir "${C_WORK}/samples" --no_progress
    part_end "sample"
    echo "Stable Cascade demo weights: ${OUT}"
    ;;
esac

if [ -n "${SD_PID}" ]; then
    wait "${SD_PID}" || { echo "the SD family failed, see ${WORK}/sd.log" >&2; exit 1; }
    tail -n 3 "${WORK}/sd.log"
fi
times
