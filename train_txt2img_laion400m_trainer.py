"""Stable Diffusion v1 UNet pretraining on LAION-format data with the PaddleNLP Trainer.

    python -u train_txt2img_laion400m_trainer.py --do_train --output_dir ./out \
        --unet_name_or_path ./sd/unet_config.json --vae_name_or_path <sd>/vae \
        --text_encoder_name_or_path <sd>/text_encoder --file_list <x>.filelist.list --resolution 256

Multi-GPU / multi-node: `python -u -m paddle.distributed.launch --gpus 0,1,.. [--ips ...] <this>`.
Flags: seed stable_diffusion_README.md section 4 (ldm/train/sd.py). FLAG_USE_EMA, FLAG_RECOMPUTE and
FLAG_XFORMERS set the defaults of --use_ema, --recompute, --enable_xformers_memory_efficient_attention.
"""


from ldm.utils import quiet_third_party, run_main

if __name__ == "__main__":
    quiet_third_party()  # before paddle is imported (issue 12 item 15)

from ldm.sd.loading import set_offline  # noqa: E402
from ldm.train.sd import parse_sd_args  # noqa: E402


def main(argv=None):
    set_offline()
    model_args, data_args, training_args = parse_sd_args(argv)
    from ldm.train.args import check_precision
    from ldm.train.checkpoint import resolve_resume
    from ldm.train.sd import build_sd_trainer
    from ldm.utils import set_seed

    check_precision(training_args)
    set_seed(training_args.seed)
    resume = resolve_resume(training_args.output_dir, training_args.resume_from_checkpoint,
                            training_args.overwrite_output_dir) if training_args.do_train else None
    trainer, _, ema = build_sd_trainer(model_args, data_args, training_args, resume)
    if training_args.do_train:  # final unet/ (+ unet_ema/, text_encoder/), scheduler/
        trainer.fit(resume, ema)
    return trainer


if __name__ == "__main__":
    raise SystemExit(run_main(main))  # the project's errors: one `error: ...` line, exit 1 (--debug: traceback)
