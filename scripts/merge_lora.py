"""Merge Stage C / Stage B LoRA files into a base weight file: W' = W + scale * (alpha / r) * up @ down.

    python scripts/merge_lora.py --base stable_cascade_weights/stage_c_lite.safetensors \
        --lora train_output/stage_c_lora.safetensors:0.8 --lora style.safetensors --output stage_c_merged.safetensors

The LoRA files are in the community format (ldm/lora.py: this project's training output, kohya
sd-scripts, OneTrainer); the stage is read from the base file's names. The output keeps the base
file's layout and names (ours / the seed's, the original Stability-AI, or diffusers), its metadata
and, unless --dtype says otherwise, its float type. A LoRA key that matches no module of the base,
or a shape that does not fit, is an error naming it, and nothing is written.
"""
from __future__ import annotations

import argparse
import json
import sys

from ldm.utils import quiet_third_party, run_main

if __name__ == "__main__":
    quiet_third_party()  # before paddle is imported

from ldm.lora import merge_lora, parse_lora_arg  # noqa: E402
from ldm.weights import STORAGE_DTYPES  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="Stage C or Stage B weights (.safetensors, shards, index, .pdparams)")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:SCALE]",
                   help="LoRA file, SCALE default 1; repeatable (applied in order)")
    p.add_argument("--output", required=True, help="output .safetensors (written atomically)")
    p.add_argument("--dtype", choices=list(STORAGE_DTYPES), default=None,
                   help="float type of the output (default: the base file's)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    summary = merge_lora(args.base, [parse_lora_arg(v) for v in args.lora], args.output, dtype=args.dtype)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(run_main(main))
