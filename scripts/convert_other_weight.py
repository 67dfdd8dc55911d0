"""Convert the non-UNet Stable Cascade weights to Paddle-layout safetensors.

Inputs (each optional, at least one):
  --effnet      original effnet_encoder.safetensors
  --stage_a     original stage_a.safetensors            (latent scale 0.43)
  --vqgan_dir   diffusers vqgan/ folder (PaellaVQModel)  (latent scale from its config.json, 0.3764)
  --previewer   original previewer.safetensors
  --clip_text_dir / --clip_image_dir   transformers CLIP folders (safetensors)
  --inception   pytorch-fid's pt_inception-2015-12-05-6726825d.pth (the FID Inception, for
                scripts/evaluate.py; read with torch.load(weights_only=True), stored as float32)
Outputs go to --output_dir (effnet_encoder.safetensors, stage_a.safetensors, previewer.safetensors,
clip_text/, clip_image/, inception_fid.safetensors) unless a per-output path is given.
Logic: ldm/cascade/convert.py, ldm/clip.py, ldm/eval/inception.py.

Example:
  python scripts/convert_other_weight.py --effnet sc/effnet_encoder.safetensors \
      --stage_a sc/stage_a.safetensors --previewer sc/previewer.safetensors \
      --clip_text_dir hf/clip-bigG --clip_image_dir hf/clip-vit-large-patch14 --output_dir weights
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ldm.utils import quiet_third_party, run_main

if __name__ == "__main__":
    quiet_third_party()  # before paddle is imported (issue 12 item 15)

from ldm.cascade import convert  # noqa: E402
from ldm.clip import convert_clip_dir  # noqa: E402
from ldm.weights import STORAGE_DTYPES  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--effnet", help="original effnet_encoder.safetensors")
    p.add_argument("--stage_a", help="original stage_a.safetensors")
    p.add_argument("--vqgan_dir", help="diffusers vqgan/ folder (PaellaVQModel)")
    p.add_argument("--previewer", help="original previewer.safetensors")
    p.add_argument("--clip_text_dir", help="transformers CLIPTextModelWithProjection (or CLIPModel) folder")
    p.add_argument("--clip_image_dir", help="transformers CLIPVisionModelWithProjection (or CLIPModel) folder")
    p.add_argument("--inception", help="pytorch-fid pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--output_dir", help="default folder for every output")
    p.add_argument("--effnet_out", help="output file (default OUTPUT_DIR/effnet_encoder.safetensors)")
    p.add_argument("--stage_a_out", help="output file (default OUTPUT_DIR/stage_a.safetensors)")
    p.add_argument("--previewer_out", help="output file (default OUTPUT_DIR/previewer.safetensors)")
    p.add_argument("--clip_text_out", help="output folder (default OUTPUT_DIR/clip_text)")
    p.add_argument("--clip_image_out", help="output folder (default OUTPUT_DIR/clip_image)")
    p.add_argument("--inception_out", help="output file (default OUTPUT_DIR/inception_fid.safetensors)")
    p.add_argument("--stage_a_scale", type=float, default=None,
                   help="override the Stage A latent scale (default 0.43 for --stage_a, config.json for --vqgan_dir)")
    p.add_argument("--dtype", default="float32", choices=list(STORAGE_DTYPES), help="storage dtype")
    args = p.parse_args(argv)
    if args.stage_a and args.vqgan_dir:
        p.error("give either --stage_a or --vqgan_dir, not both (they are two sources of the same model)")
    jobs = [args.effnet, args.stage_a, args.vqgan_dir, args.previewer, args.clip_text_dir, args.clip_image_dir,
            args.inception]
    if not any(jobs):
        p.error("nothing to convert: give at least one input")
    defaults = {"effnet_out": "effnet_encoder.safetensors", "stage_a_out": "stage_a.safetensors",
                "previewer_out": "previewer.safetensors", "clip_text_out": "clip_text", "clip_image_out": "clip_image",
                "inception_out": "inception_fid.safetensors"}
    for dest, name in defaults.items():
        if getattr(args, dest) is None:
            if args.output_dir is None:
                setattr(args, dest, None)
            else:
                setattr(args, dest, os.path.join(args.output_dir, name))
    needed = [("effnet", "effnet_out"), ("stage_a", "stage_a_out"), ("vqgan_dir", "stage_a_out"),
              ("previewer", "previewer_out"), ("clip_text_dir", "clip_text_out"), ("clip_image_dir", "clip_image_out"),
              ("inception", "inception_out")]
    for src, dst in needed:
        if getattr(args, src) and not getattr(args, dst):
            p.error(f"--{src} needs --{dst} or --output_dir")
    return args


def convert_inception_pth(pth: str, out: str) -> str:
    """pytorch-fid's Inception .pth -> our inception_fid.safetensors. torch is imported here only,
    and the pickle is read with weights_only=True (tensors and containers, no code)."""
    try:
        import torch
    except ImportError:
        raise ValueError("--inception FILE.pth needs torch (this conversion only, once): pip install torch "
                         "(CPU build; requirements.txt). PaddleMIX's pp_inception .pdparams needs no conversion.") from None

    from ldm.eval.inception import convert_inception_state

    state = torch.load(pth, map_location="cpu", weights_only=True)
    return convert_inception_state({k: v.numpy() for k, v in state.items()}, out, "torch", source=pth)


def main(argv=None) -> dict:
    args = parse_args(argv)
    done = {}
    if args.effnet:
        done["effnet"] = [args.effnet_out, convert.convert_effnet(args.effnet, args.effnet_out, args.dtype)]
    if args.stage_a:
        cfg = convert.convert_stage_a(args.stage_a, args.stage_a_out, args.dtype, args.stage_a_scale)
        done["stage_a"] = [args.stage_a_out, cfg]
    if args.vqgan_dir:
        cfg = convert.convert_vqgan_dir(args.vqgan_dir, args.stage_a_out, args.dtype, args.stage_a_scale)
        done["stage_a"] = [args.stage_a_out, cfg]
    if args.previewer:
        done["previewer"] = [args.previewer_out, convert.convert_previewer(args.previewer, args.previewer_out, args.dtype)]
    if args.clip_text_dir:
        convert_clip_dir(args.clip_text_dir, args.clip_text_out, "text", args.dtype)
        done["clip_text"] = [args.clip_text_out]
    if args.clip_image_dir:
        convert_clip_dir(args.clip_image_dir, args.clip_image_out, "vision", args.dtype)
        done["clip_image"] = [args.clip_image_out]
    if args.inception:
        done["inception"] = [convert_inception_pth(args.inception, args.inception_out)]
    print(json.dumps(done, indent=1))
    return done


if __name__ == "__main__":
    sys.exit(run_main(main))
