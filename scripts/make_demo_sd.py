"""The non-UNet steps of the SD demo recipe (issue 14; `scripts/train_demo_sd.sh` runs them all).

    python scripts/make_demo_sd.py parts --output_dir ./demo_sd/parts --vae_steps 300 --seed 0
    python scripts/make_demo_sd.py data --jsonl ./demo_sd/data.jsonl --per_combination 32 --seed 0
    python scripts/make_demo_sd.py package --parts ./demo_sd/parts --unet ./demo_sd/pretrain/unet \
        --output_dir assets/demo/sd

parts: the frozen random CLIP text encoder, the word tokenizer, the scheduler config, the UNet
config (ldm.demo.sd.write_components) and the small VAE trained on rendered shapes
(ldm.demo.sd.train_vae). data: the shapes jsonl + images (ldm.demo.shapes.write_jsonl) that
create_pretraining_data.py turns into LAION part files. package: the pipeline folder that
`generate_sd.py --preset demo` reads (UNet re-saved with its config in the metadata).
Prints one JSON summary line.
"""
import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, as evaluate.py

from ldm.utils import quiet_third_party, run_main  # noqa: E402

if __name__ == "__main__":
    quiet_third_party()  # before paddle is imported


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("parts", help="text encoder, tokenizer, scheduler, UNet config, trained VAE")
    a.add_argument("--output_dir", required=True)
    a.add_argument("--vae_steps", type=int, default=600)
    a.add_argument("--vae_batch_size", type=int, default=8)
    a.add_argument("--vae_learning_rate", type=float, default=2e-3)
    a.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("data", help="the shapes jsonl (+ images) of the trained combinations")
    d.add_argument("--jsonl", required=True)
    d.add_argument("--image_dir", default=None, help="default: images/ beside the jsonl")
    d.add_argument("--per_combination", type=int, default=32)
    d.add_argument("--size", type=int, default=128)
    d.add_argument("--seed", type=int, default=0)
    k = sub.add_parser("package", help="the demo pipeline folder from the parts and a trained UNet")
    k.add_argument("--parts", required=True)
    k.add_argument("--unet", required=True, help="trained unet/ (or unet_ema/) folder")
    k.add_argument("--output_dir", required=True)
    return p.parse_args(argv)


def shuffle_lines(path: str, seed: int) -> None:
    """Put the jsonl's lines in a random order (numpy, [seed, 0x5F]). write_jsonl writes them
    combination by combination, and the LAION stream reads a part file's records in order: a batch
    would then hold one caption, and the UNet would learn the recent combination, not the text."""
    import numpy as np

    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    order = np.random.default_rng([seed, 0x5F]).permutation(len(lines))
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines[i] for i in order)
    os.replace(tmp, path)


def _package(parts: str, unet_dir: str, out: str) -> dict:
    from ldm.demo.sd import check_folder, save_model
    from ldm.sd.loading import load_unet

    os.makedirs(out, exist_ok=True)
    for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
        dst = os.path.join(out, sub)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        shutil.copytree(os.path.join(parts, sub), dst)
    unet = load_unet(unet_dir)
    dst = os.path.join(out, "unet")
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    save_model(unet, dst, "diffusion_paddle_model.safetensors", "sd_unet")
    sched = os.path.join(os.path.dirname(os.path.normpath(unet_dir)), "scheduler", "scheduler_config.json")
    if os.path.isfile(sched):  # the training scheduler (its prediction_type) wins over the parts' copy
        shutil.copy(sched, os.path.join(out, "scheduler", "scheduler_config.json"))
    check_folder(out)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    return {"folder": os.path.abspath(out), "bytes": size}


def main(argv=None):
    args = parse_args(argv)
    t0, c0 = time.time(), time.process_time()
    if args.command == "parts":
        from ldm.demo.sd import train_vae, write_components

        write_components(args.output_dir, seed=args.seed)
        summary = train_vae(os.path.join(args.output_dir, "vae"), steps=args.vae_steps,
                            batch_size=args.vae_batch_size, learning_rate=args.vae_learning_rate, seed=args.seed)
        summary["folder"] = os.path.abspath(args.output_dir)
    elif args.command == "data":
        from ldm.demo.shapes import write_jsonl

        image_dir = args.image_dir or os.path.join(os.path.dirname(os.path.abspath(args.jsonl)), "images")
        n = write_jsonl(args.jsonl, image_dir, args.per_combination, args.size, args.seed)
        shuffle_lines(args.jsonl, args.seed)
        summary = {"jsonl": os.path.abspath(args.jsonl), "records": n}
    else:
        summary = _package(args.parts, args.unet, args.output_dir)
    summary.update(command=args.command, wall_s=round(time.time() - t0, 1), cpu_s=round(time.process_time() - c0, 1))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
