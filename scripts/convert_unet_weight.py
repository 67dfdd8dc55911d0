"""Convert Stable Cascade Stage B / Stage C weights to this project's Paddle safetensors.

Inputs: an original Stability-AI file (stage_c.safetensors, stage_c_lite.safetensors,
stage_b.safetensors, stage_b_lite.safetensors; bf16 or fp32), a diffusers model folder (prior/,
prior_lite/, decoder/, decoder_lite/: config.json + safetensors, sharded or not), shard files, or a
seed PaddleMIX .pdparams. The conversion streams tensor by tensor; any missing, unexpected or
mis-shaped key is an error that lists them.

    python scripts/convert_unet_weight.py --input stage_c_lite.safetensors --output stage_c_lite.paddle.safetensors
    python scripts/convert_unet_weight.py --input StableCascade/decoder_lite --stage b --dtype bfloat16 --output b_lite.safetensors
"""
from __future__ import annotations

import argparse
import json
import sys


from ldm.utils import quiet_third_party, run_main

if __name__ == "__main__":
    quiet_third_party()  # before paddle is imported (issue 12 item 15)

from ldm.cascade.convert import convert_unet_weights  # noqa: E402
from ldm.cascade.stage_b import STAGE_B_PRESETS  # noqa: E402
from ldm.cascade.stage_c import STAGE_C_PRESETS  # noqa: E402
from ldm.weights import STORAGE_DTYPES, WeightsError  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="a .safetensors file, shard files, a diffusers model folder, or a .pdparams")
    p.add_argument("--output", required=True, help="output .safetensors (written atomically)")
    p.add_argument("--stage", choices=["b", "c"], default=None, help="default: detected from the keys")
    presets = sorted(set(STAGE_B_PRESETS) | set(STAGE_C_PRESETS))
    p.add_argument("--preset", choices=["auto"] + presets, default="auto",
                   help="network size; auto = the diffusers config.json if present, else the preset whose shapes match")
    p.add_argument("--dtype", choices=list(STORAGE_DTYPES), default="float32", help="storage dtype of the output")
    p.add_argument("--source_format", choices=["auto", "original", "diffusers", "paddle"], default="auto")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not args.output.endswith(".safetensors"):
        raise SystemExit("--output must end with .safetensors")
    try:
        summary = convert_unet_weights(args.input, args.output, stage=args.stage, preset=args.preset,
                                       dtype=args.dtype, source_format=args.source_format)
    except WeightsError as e:
        raise SystemExit(f"conversion failed: {e}")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(run_main(main))
