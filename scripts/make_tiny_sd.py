"""Write tiny random Stable Diffusion v1 components for the offline SD recipe (issue 12 item 12).

    python scripts/make_tiny_sd.py --output_dir ./tiny_sd
    python scripts/make_tiny_sd.py --output_dir ./tiny_sd --dataset_dir assets/demo_dataset --jsonl ./demo.jsonl

Writes <output_dir>/{vae,text_encoder,tokenizer,scheduler}/ and <output_dir>/unet_config.json
(ldm.sd.tiny.write_tiny_sd; --unet_weights also writes unet/). Built with ppdiffusers (Paddle-layout
weights; only requirements.txt needed) unless --backend torch (diffusers/transformers layout; needs
torch, diffusers and transformers from requirements-dev.txt). With --dataset_dir and --jsonl, also
turns a folder of NAME.jpg + NAME.txt pairs into the {"caption", "image"} jsonl that
create_pretraining_data.py reads (absolute image paths). Needs no network.
`STAGE=sd MODEL_VERSION=tiny sh train.sh` runs the whole recipe: this, create_pretraining_data.py,
train_txt2img_laion400m_trainer.py and scripts/generate_sd.py.
"""
import argparse
import json
import os


from ldm.utils import quiet_third_party, run_main

if __name__ == "__main__":
    quiet_third_party()  # before paddle/torch are imported (issue 12 item 15)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", required=True, help="folder for vae/, text_encoder/, tokenizer/, scheduler/")
    p.add_argument("--unet_weights", action="store_true", help="also write a random-init unet/ folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=("paddle", "torch"), default="paddle",
                   help="paddle: ppdiffusers, Paddle-layout weights (default, no torch needed); "
                        "torch: diffusers/transformers PyTorch layout (requirements-dev.txt)")
    p.add_argument("--dataset_dir", default=None, help="folder of NAME.jpg + NAME.txt pairs to list in --jsonl")
    p.add_argument("--jsonl", default=None, help="jsonl to write from --dataset_dir")
    args = p.parse_args(argv)
    if (args.dataset_dir is None) != (args.jsonl is None):
        p.error("--dataset_dir and --jsonl go together")
    return args


def write_folder_jsonl(dataset_dir: str, jsonl: str) -> int:
    """One {"caption", "image"} line per image/caption pair of dataset_dir; returns the count."""
    from ldm.data.folder import scan_folder

    pairs, missing = scan_folder(dataset_dir)
    if missing:
        raise ValueError(f"{len(missing)} image(s) in {dataset_dir} have no caption file, e.g. {missing[0]}")
    if not pairs:
        raise ValueError(f"no image/caption pairs in {dataset_dir}")
    os.makedirs(os.path.dirname(os.path.abspath(jsonl)), exist_ok=True)
    with open(jsonl, "w", encoding="utf-8") as f:
        for image, caption_path in pairs:
            with open(caption_path, encoding="utf-8-sig") as c:
                caption = c.read().strip()
            f.write(json.dumps({"caption": caption, "image": os.path.abspath(image)}) + "\n")
    return len(pairs)


def main(argv=None):
    args = parse_args(argv)
    from ldm.sd.tiny import write_tiny_sd

    summary = {"components": os.path.abspath(write_tiny_sd(args.output_dir, args.unet_weights, args.seed,
                                                             backend=args.backend))}
    if args.dataset_dir is not None:
        summary["jsonl"] = os.path.abspath(args.jsonl)
        summary["records"] = write_folder_jsonl(args.dataset_dir, args.jsonl)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
