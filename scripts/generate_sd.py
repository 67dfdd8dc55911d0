"""Generate images with a (trained) Stable Diffusion v1 UNet: the seed README section 5 as a CLI.

    python scripts/generate_sd.py --pretrained_model_name_or_path <sd-v1-4 folder> \
        --unet_path ./laion400m_pretrain_output_trainer/checkpoint-5000/unet \
        --prompt "a photo of an astronaut riding a horse on mars" --height 256 --width 256 \
        --guidance_scale 7.5 --num_inference_steps 50 --scheduler ddim --seed 42 --output_dir ./samples

    python scripts/generate_sd.py --preset demo --prompt "a red circle on a blue background"

--preset demo: the small SD this project trained on coloured shapes (assets/demo/sd, from any
working directory; `sh scripts/train_demo_sd.sh` rebuilds it), 128x128, its own sampler defaults.
Writes <output_dir>/<prompt#>_<image#>_seed<seed>.png with the prompt, seed and settings as PNG
text metadata, and prints a JSON summary. Local folders only (no downloads).
"""
import argparse
import json
import os
import sys


from ldm.utils import quiet_third_party, run_main, special_file_problem

if __name__ == "__main__":
    quiet_third_party()  # before paddle is imported (issue 12 item 15)

from ldm.sd.loading import set_offline  # noqa: E402
from ldm.sd.sampling import SCHEDULERS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="local pipeline folder (vae/, text_encoder/, tokenizer/); with --preset demo: assets/demo/sd")
    p.add_argument("--preset", choices=["demo"], default=None,
                   help="demo: the shipped SD trained on coloured shapes (prompts 'a {color} {shape} on a "
                        "{background} background'), 128x128")
    p.add_argument("--unet_path", default=None, help="trained unet/ or unet_ema/ folder (default: <pretrained>/unet)")
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    p.add_argument("--prompt_file", default=None, help="text file, one prompt per line")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--height", type=int, default=None, help="default 512 (--preset demo: 128)")
    p.add_argument("--width", type=int, default=None, help="default 512 (--preset demo: 128)")
    p.add_argument("--guidance_scale", type=float, default=None, help="default 7.5 (--preset demo: its own)")
    p.add_argument("--num_inference_steps", type=int, default=None, help="default 50 (--preset demo: its own)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="default ddim")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--num_images", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    p.add_argument("--output_dir", default="./samples")
    p.add_argument("--allow_pickle_weights", action="store_true",
                   help="also load PyTorch pickle weights (.bin), which can run code: trusted files only "
                        "(default: refused; convert them to safetensors instead)")
    args = p.parse_args(argv)
    if args.preset == "demo":
        from ldm.demo.sd import SAMPLING, check_folder, demo_sd_dir

        defaults = SAMPLING
        if args.pretrained_model_name_or_path is None:
            try:
                args.pretrained_model_name_or_path = check_folder(demo_sd_dir())
            except FileNotFoundError as e:
                p.error(str(e))
    else:
        defaults = dict(height=512, width=512, guidance_scale=7.5, num_inference_steps=50, scheduler="ddim")
        if args.pretrained_model_name_or_path is None:
            p.error("give --pretrained_model_name_or_path (a local SD v1 pipeline folder), or --preset demo")
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    prompts = list(args.prompt or [])
    if args.prompt_file:
        if special_file_problem(args.prompt_file):  # a FIFO would block (issue 12 item 6)
            p.error(f"--prompt_file {special_file_problem(args.prompt_file)}")
        with open(args.prompt_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        p.error("give --prompt or --prompt_file")
    if args.num_images < 1 or args.num_inference_steps < 1:
        p.error("--num_images and --num_inference_steps must be >= 1")
    args.prompts = prompts
    return args


def main(argv=None):
    set_offline()
    args = parse_args(argv)
    from ldm.sd.loading import load_for_inference
    from ldm.sd.sampling import generate, make_scheduler
    from ldm.utils import save_png

    unet, vae, te, tok, sched_cfg = load_for_inference(args.pretrained_model_name_or_path, args.unet_path,
                                                          allow_pickle=args.allow_pickle_weights)
    written = []
    for pi, prompt in enumerate(args.prompts):
        images = generate(unet, vae, te, tok, make_scheduler(args.scheduler, sched_cfg), [prompt] * args.num_images,
                          args.height, args.width, guidance_scale=args.guidance_scale,
                          num_inference_steps=args.num_inference_steps, seed=args.seed,
                          negative_prompt=args.negative_prompt)
        for i, img in enumerate(images):
            seed = args.seed + i
            path = os.path.join(args.output_dir, f"{pi:04d}_{i:02d}_seed{seed}.png")
            save_png(path, img, {"prompt": prompt, "seed": seed, "guidance_scale": args.guidance_scale,
                                 "num_inference_steps": args.num_inference_steps, "scheduler": args.scheduler})
            written.append(path)
    print(json.dumps({"images": written}))
    return written


if __name__ == "__main__":
    sys.exit(run_main(main))
