"""Precompute Stable Diffusion latents: one pass over LAION part files (or tar shards) that stores
the VAE latent distribution (mean and std, so each epoch still draws a fresh sample) and the CLIP
text encoder outputs of every record, for `train_txt2img_laion400m_trainer.py --latents_path`
(as mosaicml/diffusion precomputes latents for SD pretraining at scale, and kohya-ss/sd-scripts'
--cache_latents / --cache_text_encoder_outputs; this project's own code, `ldm.data.cache`).

    python scripts/precompute_latents.py --file_list data/filelist/custom_dataset.filelist.list \\
        --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 --resolution 256 \\
        --latents_path ./latents [--random_flip True] [--batch_size 8]

Training then reads only the latents folder (same --resolution, --random_flip and encoder flags;
other encoders are refused): the VAE and text encoder are not loaded. Images are centre-cropped
(random crops cannot be precomputed); with --random_flip both orientations are stored. A stopped
pass continues where it stopped when run again. The last line printed is a JSON summary.
"""
import json

from ldm.utils import quiet_third_party, run_main

if __name__ == "__main__":
    quiet_third_party()  # before paddle is imported (issue 12 item 15)


def main(argv=None):
    from ldm.sd.loading import set_offline
    from ldm.train.sd import parse_precompute_args, precompute_latents

    set_offline()
    model_args, data_args, args = parse_precompute_args(argv)
    summary = precompute_latents(model_args, data_args, batch_size=args.batch_size)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
