"""FID and CLIP score of a text-to-image model over a sweep of guidance scales (SD v1 or Stable Cascade).

    python scripts/evaluate.py --family sd --pretrained_model_name_or_path sd-v1-4 \
        --unet_path out/checkpoint-5000/unet --height 256 --width 256 --num_inference_steps 50 \
        --captions coco30k.tsv --num_images 1000 --guidance_scales 3 4 5 6 7 8 \
        --reference coco_256_1k.npz --inception weights/inception_fid.safetensors \
        --clip_dir weights/clip-vit-base-patch32 --output_dir eval --run_name step5000
    python scripts/evaluate.py --family sd --unet_path out/checkpoint-5000 --vae_path sd-v1-4/vae \
        --text_encoder_path sd-v1-4/text_encoder --scheduler ddim --num_inference_steps 50 ...
    python scripts/evaluate.py --family cascade [--preset tiny] --steps_c 20 --steps_b 10 ...

Writes <output_dir>/<run_name>/g<scale>/<k:05d>.png (caption k from seed + k at every scale; files
that exist are kept, so a stopped run resumes), then <output_dir>/results.json, results.csv and
fid_clip.png (FID against CLIP score, every run of that folder). --reference is a statistics .npz
(pytorch-fid / PaddleMIX / scripts/fid_stats.py) or an image folder / LAION file list (statistics
computed once, cached in the output folder). Local files only: nothing is downloaded.
The last line printed is the JSON of this run's points.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.utils import quiet_third_party, run_main

if __name__ == "__main__":
    quiet_third_party()  # before paddle is imported (issue 12 item 15)

import config as C  # noqa: E402
from ldm.eval import generators as gen  # noqa: E402
from ldm.sd.sampling import SCHEDULERS  # noqa: E402

PADDLEMIX_SCALES = (3.0, 4.0, 5.0, 6.0, 7.0, 8.0)  # PaddleMIX generate_images.py


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["sd", "cascade"], required=True)
    p.add_argument("--captions", required=True, help="COCO .tsv/.csv (caption_en or caption), .jsonl, or one per line")
    p.add_argument("--num_images", type=int, default=None, help="use the first N captions (default all)")
    p.add_argument("--guidance_scales", type=float, nargs="+", default=list(PADDLEMIX_SCALES))
    p.add_argument("--seed", type=int, default=0, help="caption k is sampled from seed + k")
    p.add_argument("--batch_size", type=int, default=4, help="images per sampling call")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--height", type=int, help="default: SD 512, cascade config.py's (tiny preset: TINY_SIZE)")
    p.add_argument("--width", type=int)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--run_name", help="name of this run in the table and plot (default: the family)")
    m = p.add_argument_group("metrics")
    m.add_argument("--reference", required=True, help="statistics .npz, or an image folder / LAION file list")
    m.add_argument("--reference_resolution", type=int, default=None,
                   help="for a reference folder/list: short-side resize + centre crop to this first")
    m.add_argument("--reference_limit", type=int, default=None, help="for a reference folder/list: at most N images")
    m.add_argument("--inception", required=True, help="inception_fid.safetensors or PaddleMIX pp_inception .pdparams")
    m.add_argument("--clip_dir", help="folder with clip_text/ and clip_image/ (convert_other_weight.py --output_dir)")
    m.add_argument("--clip_text_dir", help="CLIP text tower folder (instead of --clip_dir)")
    m.add_argument("--clip_vision_dir", help="CLIP vision tower folder (instead of --clip_dir)")
    m.add_argument("--eval_batch_size", type=int, default=50)
    m.add_argument("--no_progress", action="store_true")
    s = p.add_argument_group("Stable Diffusion (--family sd)")
    s.add_argument("--pretrained_model_name_or_path",
                   help="local pipeline folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/); optional when "
                        "--unet_path, --vae_path and --text_encoder_path are given")
    s.add_argument("--unet_path", help="trained unet/ or unet_ema/ folder, or a training checkpoint folder (its unet/, "
                                       "and its text_encoder/ if trained) (default: <pretrained>/unet)")
    s.add_argument("--vae_path", help="VAE folder (default: <pretrained>/vae)")
    s.add_argument("--text_encoder_path", help="CLIP text encoder folder (default: <pretrained>/text_encoder)")
    s.add_argument("--tokenizer_path", help="tokenizer folder (default: <pretrained>/tokenizer, else a tokenizer/ "
                                            "beside the text encoder)")
    s.add_argument("--scheduler_path", help="folder with scheduler_config.json (default: the one beside the UNet, "
                                            "else <pretrained>/scheduler, else SD v1 defaults)")
    s.add_argument("--scheduler", choices=SCHEDULERS, default=gen.SDSettings.scheduler)
    s.add_argument("--num_inference_steps", type=int, default=gen.SDSettings.num_inference_steps)
    s.add_argument("--allow_pickle_weights", action="store_true", help="also read PyTorch .bin pickles (trusted only)")
    c = p.add_argument_group("Stable Cascade (--family cascade; the guidance scale is Stage C's)")
    c.add_argument("--preset", choices=["tiny"], default=None, help="random tiny networks, no weight files")
    c.add_argument("--weights_path", default=C.CASCADE.weights_path)
    c.add_argument("--model_c_version", default=C.CASCADE.model_c_version, choices=list(C.STAGE_C_FILES))
    c.add_argument("--model_b_version", default=C.CASCADE.model_b_version, choices=list(C.STAGE_B_FILES))
    c.add_argument("--stage_c", help="Stage C weight file instead of the folder's (e.g. a fine-tuned one)")
    c.add_argument("--dtype", default=C.CASCADE.dtype, choices=C.DTYPES)
    for name in ("steps_c", "steps_b", "cfg_b", "shift_c", "shift_b", "cfg_rho"):
        default = getattr(gen.CascadeSettings, name)
        c.add_argument(f"--{name}", type=type(default), default=default)
    args = p.parse_args(argv)
    if args.family == "sd" and not args.pretrained_model_name_or_path and not (
            args.unet_path and args.vae_path and args.text_encoder_path):
        p.error("--family sd needs --pretrained_model_name_or_path, or --unet_path, --vae_path and --text_encoder_path")
    if not args.clip_dir and not (args.clip_text_dir and args.clip_vision_dir):
        p.error("give --clip_dir, or --clip_text_dir and --clip_vision_dir")
    if min(args.batch_size, args.eval_batch_size, args.num_images or 1) < 1:
        p.error("--batch_size, --eval_batch_size and --num_images must be >= 1")
    if args.family == "sd":
        args.height, args.width = args.height or gen.SDSettings.height, args.width or gen.SDSettings.width
    else:
        size = C.TINY_SIZE if args.preset else None
        args.height, args.width = args.height or size or C.HEIGHT, args.width or size or C.WIDTH
    args.run_name = args.run_name or args.family
    return args


def build_generator(args):
    """The SD or Stable Cascade generator the flags describe."""
    if args.family == "sd":
        settings = gen.SDSettings(height=args.height, width=args.width, num_inference_steps=args.num_inference_steps,
                                  scheduler=args.scheduler, negative_prompt=args.negative_prompt)
        return gen.SDGenerator.from_pretrained(args.pretrained_model_name_or_path, args.unet_path, settings,
                                               allow_pickle=args.allow_pickle_weights, vae_path=args.vae_path,
                                               text_encoder_path=args.text_encoder_path,
                                               tokenizer_path=args.tokenizer_path, scheduler_path=args.scheduler_path)
    from ldm.cascade import components as cp
    from ldm.cascade.pipeline import check_dtype
    from ldm.model_b import ModelB
    from ldm.model_c import ModelC

    cfg = dataclasses.replace(C.CASCADE, weights_path=args.weights_path, dtype=check_dtype(args.dtype),
                              model_c_version=args.model_c_version, model_b_version=args.model_b_version)
    files = {"stage_c": C.STAGE_C_FILES[args.model_c_version], "stage_b": C.STAGE_B_FILES[args.model_b_version]}
    changed = {"stage_c": args.model_c_version != C.CASCADE.model_c_version,  # config.py may name the default's
               "stage_b": args.model_b_version != C.CASCADE.model_b_version}  # files its own way: keep those
    cfg = dataclasses.replace(cfg, **{k: v for k, v in files.items() if changed[k]})
    if args.stage_c:
        cfg = dataclasses.replace(cfg, stage_c=os.path.abspath(args.stage_c))
    if args.preset is None:
        cp.resolve_weights(cfg, cp.NEEDED_C + cp.NEEDED_B)
    opts = dict(preset=args.preset, progress=False)
    settings = gen.CascadeSettings(height=args.height, width=args.width, negative_prompt=args.negative_prompt,
                                   **{k: getattr(args, k) for k in ("steps_c", "steps_b", "cfg_b", "shift_c",
                                                                    "shift_b", "cfg_rho")})
    source = {"preset": args.preset} if args.preset else {
        "weights_path": os.path.abspath(cfg.weights_path), "stage_c": cfg.stage_c, "stage_b": cfg.stage_b,
        "dtype": cfg.dtype}
    return gen.CascadeGenerator(ModelC(cfg, **opts), ModelB(cfg, **opts), settings, source)


def main(argv=None) -> list:
    args = parse_args(argv)
    from ldm.eval import sweep
    from ldm.eval.clip_score import ClipScorer
    from ldm.eval.fid import FrechetReference
    from ldm.eval.inception import load_inception
    from ldm.sd.loading import set_offline

    set_offline()
    progress = not args.no_progress
    captions = sweep.read_captions(args.captions, args.num_images)
    run_dir = os.path.join(args.output_dir, args.run_name)
    generator = build_generator(args)
    settings = {**generator.describe(), "seed": args.seed, "captions": os.path.abspath(args.captions),
                "num_captions": len(captions), "reference": os.path.abspath(args.reference)}
    sweep.check_run_settings(run_dir, {k: v for k, v in settings.items() if k != "reference"})
    sweep.generate_missing(generator, captions, args.guidance_scales, run_dir, args.seed, args.batch_size, progress,
                           meta={"run": args.run_name, "family": args.family})
    del generator

    inception = load_inception(args.inception)
    mu, sigma = sweep.reference_statistics(args.reference, inception, args.output_dir, args.reference_resolution,
                                           args.reference_limit, args.eval_batch_size, progress)
    reference = FrechetReference(mu, sigma)
    scorer = ClipScorer.from_dir(args.clip_dir) if args.clip_dir else ClipScorer(args.clip_text_dir,
                                                                                args.clip_vision_dir)
    points = [sweep.scale_point(run_dir, g, captions, inception, reference, scorer, args.eval_batch_size, progress)
              for g in args.guidance_scales]
    results = sweep.update_results(args.output_dir, args.run_name, settings, points)
    sweep.write_table(args.output_dir, results)
    sweep.plot_runs(args.output_dir, results)
    print(json.dumps(points))
    return points


if __name__ == "__main__":
    sys.exit(run_main(main))
