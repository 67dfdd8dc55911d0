"""Score the demo models (issue 14): K images for each of the 90 shape combinations, classified by
ldm.demo.score.analyse (background colour, shape colour, shape), as a table of trained vs
held-out combinations per family.

    python scripts/demo_score.py --family sd --k 4              # assets/demo/sd
    python scripts/demo_score.py --family cascade --k 2         # assets/demo/cascade
    python scripts/demo_score.py --family sd --family cascade   # both, one table
    python scripts/demo_score.py --family data --k 4            # the data set's own images (100%)

Images come from the code the CLIs use: `sd` loads the pipeline folder once with
ldm.sd.loading.load_for_inference and samples with ldm.sd.sampling.generate at the settings of
`generate_sd.py --preset demo` (ldm.demo.sd.SAMPLING); `cascade` loads the demo networks once and
samples as `inference.py --preset demo` does (ldm.demo.cascade.generate). Combination j's image i
uses seed + j * K + i. Prints the markdown table, then one JSON line with the numbers and
timings; --output_dir keeps the images.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, as evaluate.py

from ldm.utils import quiet_third_party, run_main  # noqa: E402

if __name__ == "__main__":
    quiet_third_party()  # before paddle is imported

FAMILIES = ("sd", "cascade", "data")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", action="append", choices=FAMILIES, help="repeatable (default: sd and cascade)")
    p.add_argument("--k", type=int, default=4, help="images per combination")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sd_dir", default=None, help="SD pipeline folder (default: the shipped assets/demo/sd)")
    p.add_argument("--cascade_dir", default=None, help="Stable Cascade demo folder (default: assets/demo/cascade)")
    p.add_argument("--num_inference_steps", type=int, default=None, help="SD sampler steps (default: the preset's)")
    p.add_argument("--guidance_scale", type=float, default=None, help="SD guidance (default: the preset's)")
    p.add_argument("--output_dir", default=None, help="keep the images here (<family>/<combination>_<i>.png)")
    args = p.parse_args(argv)
    if args.k < 1:
        p.error("--k must be >= 1")
    args.family = args.family or ["sd", "cascade"]
    return args


def _sd_images(args):
    """Yields (combination, [PIL images]) for the SD demo."""
    from PIL import Image

    from ldm.demo.sd import SAMPLING, check_folder
    from ldm.demo.shapes import caption, combinations
    from ldm.sd.loading import load_for_inference, set_offline
    from ldm.sd.sampling import generate, make_scheduler

    set_offline()
    unet, vae, te, tok, sched = load_for_inference(check_folder(args.sd_dir))
    steps = args.num_inference_steps or SAMPLING["num_inference_steps"]
    guidance = SAMPLING["guidance_scale"] if args.guidance_scale is None else args.guidance_scale
    for j, combo in enumerate(combinations()):
        arr = generate(unet, vae, te, tok, make_scheduler(SAMPLING["scheduler"], sched), [caption(*combo)] * args.k,
                       SAMPLING["height"], SAMPLING["width"], guidance_scale=guidance,
                       num_inference_steps=steps, seed=args.seed + j * args.k)
        yield combo, [Image.fromarray(a) for a in arr]


def _cascade_images(args):
    """Yields (combination, [PIL images]) from the Stable Cascade demo, its networks loaded once:
    ldm.demo.cascade.generate, which gives what inference.py --preset demo writes for the same
    caption, batch size and seed (tests/test_demo_cascade.py)."""
    from PIL import Image

    from ldm.demo.cascade import generate
    from ldm.demo.shapes import caption, combinations

    for j, combo in enumerate(combinations()):
        images = generate(caption(*combo), n=args.k, seed=args.seed + j * args.k, weights_path=args.cascade_dir)
        yield combo, [Image.fromarray(a) for a in images]


def _data_images(args):
    from ldm.demo.shapes import combinations, render

    for j, combo in enumerate(combinations()):
        yield combo, [render(*combo, size=128, rng_or_seed=args.seed + j * args.k + i) for i in range(args.k)]


def score_family(name: str, images) -> dict:
    """{"<name> trained": accuracy, "<name> held-out": accuracy} from (combination, images) pairs."""
    from ldm.demo.score import accuracy, analyse
    from ldm.demo.shapes import HELD_OUT

    held = set(HELD_OUT)
    results = {True: [], False: []}
    for combo, imgs in images:
        for img in imgs:
            results[combo in held].append((combo, analyse(img)))
    return {f"{name} trained": accuracy(results[False]), f"{name} held-out": accuracy(results[True])}


def _kept(images, folder):
    """Pass (combination, images) through, saving each image as PNG under folder."""
    os.makedirs(folder, exist_ok=True)
    for combo, imgs in images:
        for i, img in enumerate(imgs):
            img.save(os.path.join(folder, "{}_{}_on_{}_{}.png".format(*combo, i)))
        yield combo, imgs


def main(argv=None):
    args = parse_args(argv)
    from ldm.demo.score import format_table

    makers = {"sd": _sd_images, "cascade": _cascade_images, "data": _data_images}
    rows, timings = {}, {}
    for family in args.family:
        t0, c0 = time.time(), time.process_time()
        images = makers[family](args)
        if args.output_dir:
            images = _kept(images, os.path.join(args.output_dir, family))
        rows.update(score_family(family, images))
        timings[family] = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
                           "images": 90 * args.k}
    print(format_table(rows))
    print(json.dumps({"k": args.k, "seed": args.seed, "rows": rows, "timings": timings}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
