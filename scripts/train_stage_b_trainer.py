"""Stable Cascade Stage B fine-tuning with the PaddleNLP Trainer (`STAGE=b sh train.sh`).

    python -u scripts/train_stage_b_trainer.py --do_train --dataset_path ./assets/demo_dataset \
        --output_dir ./train_output_b --model_version tiny --resolution 128 --max_steps 20

The same flags and behaviour as train_stage_c_trainer.py (data, EMA, checkpoints and exact resume,
VisualDL, multi-GPU through `python -m paddle.distributed.launch`, --sharding, --recompute,
--lora_rank), plus Stage B's own: --stage_a, --effnet_prob; flags: ldm/train/stage_b.py.
`scripts/extract_unet_weights.py` turns a checkpoint into a Stage B file for `inference.py --stage_b`.
"""
import os
import sys

# The one accepted exception (as scripts/evaluate.py): this script lives in scripts/ but reads the
# top-level config.py like train_stage_c_trainer.py, so the repository root goes on sys.path.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.utils import quiet_third_party, run_main  # noqa: E402

if __name__ == "__main__":
    quiet_third_party()  # before paddle is imported

from ldm.train.stage_b import parse_stage_b_args  # noqa: E402


def main(argv=None):
    import config
    from ldm.train.stage_b import build_stage_b_trainer
    from ldm.train.trainer import run_training

    # final stage_b.safetensors (+ stage_b_ema.safetensors, train_b_config.json)
    return run_training(*parse_stage_b_args(argv, cascade=config.CASCADE),
                        build=lambda m, d, t, resume: build_stage_b_trainer(m, d, t))


if __name__ == "__main__":
    raise SystemExit(run_main(main))  # the project's errors: one `error: ...` line, exit 1 (--debug: traceback)
