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
    from ldm.train.sd import build_sd_trainer
    from ldm.train.trainer import run_training

    # final unet/ (+ unet_ema/, text_encoder/), scheduler/
    return run_training(*parse_sd_args(argv), build=build_sd_trainer)


if __name__ == "__main__":
    raise SystemExit(run_main(main))  # the project's errors: one `error: ...` line, exit 1 (--debug: traceback)
