"""Stable Cascade text-to-image (the seed's `python inference.py`): writes result_0.png, ...

    python inference.py --preset demo --caption "a red circle on a blue background"   # the shipped demo
    python inference.py [--preset tiny]                   # seed example: 2 images, seed 1 (tiny: offline)
    python inference.py --image ref.png --caption ""      # image variation (--init_image x.png: img2img)
"""
import argparse
import dataclasses
import os
import sys

from ldm.utils import quiet_third_party, run_main

if __name__ == "__main__":
    quiet_third_party()  # before paddle is imported (issue 12 item 15)

import config as C  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Stable Cascade text-to-image (Stage C -> B -> A)")
    p.add_argument("--caption", default=C.CAPTION)
    p.add_argument("--negative_caption", default="", help="unconditional caption (default empty)")
    p.add_argument("--seed", type=int, default=C.SEED, help="image i uses seed + i")
    p.add_argument("--batch_size", type=int, default=C.BATCH_SIZE)
    p.add_argument("--height", type=int, help=f"rounded to a multiple of 64 (default {C.HEIGHT}, presets {C.TINY_SIZE})")
    p.add_argument("--width", type=int, help=f"rounded to a multiple of 64 (default {C.WIDTH}, presets {C.TINY_SIZE})")
    for s, d in (("c", C.STAGE_C_SAMPLING), ("b", C.STAGE_B_SAMPLING)):  # --steps_c --cfg_c --shift_c, same for b
        p.add_argument(f"--steps_{s}", type=int, default=d.steps, help=f"Stage {s.upper()} sampler steps")
        p.add_argument(f"--cfg_{s}", type=float, default=d.cfg, help=f"Stage {s.upper()} guidance scale")
        p.add_argument(f"--shift_{s}", type=float, default=d.shift, help=f"Stage {s.upper()} schedule shift")
    p.add_argument("--cfg_rho", type=float, default=C.STAGE_C_SAMPLING.cfg_rho, help="guidance std rescale, both stages")
    p.add_argument("--dtype", default=C.CASCADE.dtype, choices=C.DTYPES, help="bfloat16 needs a GPU; float16 is refused (overflows, use bfloat16)")
    p.add_argument("--output_dir", default=".")
    p.add_argument("--weights_path", help=f"weights folder (default {C.CASCADE.weights_path}; with --preset demo "
                                          f"the shipped assets/demo/cascade)")
    p.add_argument("--model_c_version", default=C.CASCADE.model_c_version, choices=list(C.STAGE_C_FILES))
    p.add_argument("--model_b_version", default=C.CASCADE.model_b_version, choices=list(C.STAGE_B_FILES))
    p.add_argument("--stage_c", help="Stage C weight file instead of the folder's (e.g. a fine-tuned one; "
                                     "with --preset tiny/demo: one of the preset's size, others are refused)")
    p.add_argument("--stage_b", help="Stage B weight file instead of the folder's (scripts/extract_unet_weights.py "
                                     "of a Stage B run; with --preset tiny/demo: one of the preset's size)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="Stage C LoRA (community format: kohya, OneTrainer, train_stage_c_trainer.py --lora_rank); "
                        "repeatable, SCALE default 1")
    p.add_argument("--lora_b", action="append", default=[], metavar="FILE[:SCALE]", help="Stage B LoRA, as --lora")
    p.add_argument("--preset", choices=["demo", "tiny"], default=None,
                   help="demo: the small networks this project trained on coloured shapes, shipped in assets/demo "
                        "(prompts 'a {color} {shape} on a {background} background'); tiny: random tiny networks, "
                        "no weight files (a smoke test)")
    p.add_argument("--image", help="image for CLIP image conditioning (variation)")
    p.add_argument("--init_image", help="image to start Stage C from (image-to-image)")
    p.add_argument("--strength", type=float, default=C.IMG2IMG_STRENGTH, help="img2img noise level in (0, 1]")
    p.add_argument("--low_memory", action="store_true", help="load one network at a time, free it after use")
    p.add_argument("--save_previews", action="store_true", help="also write preview_<i>.png (Stage C previewer)")
    p.add_argument("--no_progress", action="store_true", help="no tqdm bars")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.steps_c < 1 or args.steps_b < 1:
        p.error("--batch_size, --steps_c and --steps_b must be >= 1")
    if not 0.0 < args.strength <= 1.0:
        p.error(f"--strength must be in (0, 1], got {args.strength}")
    from ldm.lora import parse_lora_arg

    args.lora, args.lora_b = [parse_lora_arg(v) for v in args.lora], [parse_lora_arg(v) for v in args.lora_b]
    # a missing --stage_c/--stage_b of a weights-folder run is listed by resolve_weights with the others
    for f in [f for f, _ in args.lora + args.lora_b] + [f for f in (args.stage_c, args.stage_b) if f and args.preset]:
        if not os.path.isfile(f):
            p.error(f"no such file: {f}")
    args.height = args.height or (C.TINY_SIZE if args.preset else C.HEIGHT)
    args.width = args.width or (C.TINY_SIZE if args.preset else C.WIDTH)
    return args


def run_components(cfg, args):
    """The networks of the run: the weights folder or a preset (tiny, demo), with --stage_c / --stage_b
    files (of the preset's size under --preset) and the LoRA files applied in memory."""
    from ldm.cascade import components as cp
    from ldm.cascade.loading import load_stage_b, load_stage_c
    from ldm.lora import with_lora

    shared = cp.shared_components(cfg, args.preset, cp.NEEDED_C + cp.NEEDED_B)
    comps = cp.Components(dict(shared.builders), shared.dtype)
    if args.preset:  # the file must be a network of the preset's size: another size fails on its shapes
        if args.stage_c:
            comps.builders["stage_c"] = lambda: load_stage_c(cfg.stage_c, args.preset)
        if args.stage_b:
            comps.builders["stage_b"] = lambda: load_stage_b(cfg.stage_b, args.preset)
    if args.lora:
        comps.builders["stage_c"] = with_lora(comps.builders["stage_c"], args.lora, "c")
    if args.lora_b:
        comps.builders["stage_b"] = with_lora(comps.builders["stage_b"], args.lora_b, "b")
    return comps


def main(argv=None):
    args = parse_args(argv)
    from PIL import Image
    from ldm.cascade import components as cp
    from ldm.cascade import pipeline as pl
    from ldm.model_b import ModelB
    from ldm.model_c import ModelC
    from ldm.utils import save_png, special_file_problem

    height, width = pl.check_size(args.height, args.width)  # fail before loading anything
    for f in (args.image, args.init_image):  # a FIFO or device would block Image.open (issue 12 item 6)
        if f and special_file_problem(f):
            raise ValueError(special_file_problem(f))
    if args.preset == "demo":  # the demo's files: the shipped folder or --weights_path
        from ldm.cascade.settings import DEMO

        cfg = dataclasses.replace(DEMO, weights_path=args.weights_path or DEMO.weights_path,
                                  dtype=pl.check_dtype(args.dtype))
    else:
        cfg = dataclasses.replace(C.CASCADE, weights_path=args.weights_path or C.CASCADE.weights_path,
                                  dtype=pl.check_dtype(args.dtype), model_c_version=args.model_c_version,
                                  model_b_version=args.model_b_version)
    if args.preset != "demo" and args.model_c_version != C.CASCADE.model_c_version:  # the other version's file
        cfg = dataclasses.replace(cfg, stage_c=C.STAGE_C_FILES[args.model_c_version])  # (config.py keeps custom names)
    if args.preset != "demo" and args.model_b_version != C.CASCADE.model_b_version:
        cfg = dataclasses.replace(cfg, stage_b=C.STAGE_B_FILES[args.model_b_version])
    if args.stage_c:  # an explicit file, relative to the working directory
        cfg = dataclasses.replace(cfg, stage_c=os.path.abspath(args.stage_c))
    if args.stage_b:
        cfg = dataclasses.replace(cfg, stage_b=os.path.abspath(args.stage_b))
    if args.preset is None:  # one error listing every missing file, before any network is built
        extra = (("image_encoder",) if args.image else ()) + (("effnet",) if args.init_image else ())
        cp.resolve_weights(cfg, cp.NEEDED_C + cp.NEEDED_B + extra)
    opts = dict(low_memory=args.low_memory, progress=not args.no_progress, components=run_components(cfg, args))
    model, model_b = ModelC(cfg, **opts).eval(), ModelB(cfg, **opts).eval()
    image, init_image = [Image.open(f) if f else None for f in (args.image, args.init_image)]

    preview, latent_c = model.log_image(
        args.caption, height=height, width=width, cfg=args.cfg_c, batch_size=args.batch_size, seed=args.seed,
        steps=args.steps_c, shift=args.shift_c, cfg_rho=args.cfg_rho, negative_caption=args.negative_caption,
        image=image, init_image=init_image, strength=args.strength, t_start=cfg.t_start)
    images, _ = model_b.log_image(
        latent_c, args.caption, seed=args.seed, batch_size=args.batch_size, steps=args.steps_b, cfg=args.cfg_b,
        shift=args.shift_b, cfg_rho=args.cfg_rho, negative_caption=args.negative_caption, height=height, width=width,
        t_start=cfg.t_start)
    meta = {"prompt": args.caption, "negative_prompt": args.negative_caption,
            "steps": f"C {args.steps_c}, B {args.steps_b}", "cfg": f"C {args.cfg_c}, B {args.cfg_b}",
            "shift": f"C {args.shift_c}, B {args.shift_b}", "cfg_rho": args.cfg_rho,
            "size": f"{width}x{height}", "model": args.preset or f"C {cfg.model_c_version}, B {cfg.model_b_version}",
            "image": args.image or "", "init_image": args.init_image or "", "strength": args.strength}
    os.makedirs(args.output_dir, exist_ok=True)
    written = []
    for i, img in enumerate(images):  # image i was sampled with seed + i
        info = {**meta, "seed": args.seed + i, "batch_seed": args.seed, "batch_index": i}
        written.append(save_png(os.path.join(args.output_dir, C.OUTPUT_PATTERN.format(i)), img, info))
        if args.save_previews:
            save_png(os.path.join(args.output_dir, f"preview_{i}.png"), preview[i], info)
    print("\n".join(written))
    return written


if __name__ == "__main__":
    sys.exit(run_main(main))
