"""Stable Cascade Stage C fine-tuning with the PaddleNLP Trainer (the seed's `sh train.sh`).

    python -u train_stage_c_trainer.py --do_train --dataset_path ./assets/demo_dataset \
        --output_dir ./train_output --model_version tiny --resolution 128 --max_steps 20

Multi-GPU: `python -u -m paddle.distributed.launch --gpus 0,1,2,3 train_stage_c_trainer.py ...`
(add `--sharding "stage2"` to shard optimiser state and gradients, `--recompute` for activations).
Flags: ldm/train/stage_c.py (plus every PaddleNLP TrainingArguments flag). FLAG_USE_EMA and
FLAG_RECOMPUTE set the defaults of --use_ema and --recompute. Checkpoints are resumed
automatically from --output_dir (the newest complete checkpoint-N) unless --overwrite_output_dir;
`scripts/extract_unet_weights.py` turns one into a Stage C weight file for inference.py.
"""


from ldm.utils import quiet_third_party, run_main

if __name__ == "__main__":
    quiet_third_party()  # before paddle is imported (issue 12 item 15)

from ldm.train.stage_c import parse_stage_c_args  # noqa: E402


def main(argv=None):
    import config
    from ldm.train.stage_c import build_stage_c_trainer
    from ldm.train.trainer import run_training

    # final stage_c.safetensors (+ stage_c_ema.safetensors, train_c_config.json)
    return run_training(*parse_stage_c_args(argv, cascade=config.CASCADE),
                        build=lambda m, d, t, resume: build_stage_c_trainer(m, d, t))


if __name__ == "__main__":
    raise SystemExit(run_main(main))  # the project's errors: one `error: ...` line, exit 1 (--debug: traceback)
