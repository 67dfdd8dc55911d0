"""Export a trained UNet (checkpoint-N/unet or unet_ema) to the diffusers PyTorch layout.

    python scripts/export_diffusers.py --unet_path out/checkpoint-5000/unet --output_dir exported/unet \
        [--dtype float16]

The result loads with diffusers `UNet2DConditionModel.from_pretrained("exported/unet")`.
"""
import argparse
import json
import os
import sys


from ldm.utils import quiet_third_party, run_main

if __name__ == "__main__":
    quiet_third_party()  # before paddle is imported (issue 12 item 15)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unet_path", required=True, help="trained UNet folder (ppdiffusers or diffusers layout)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None, help="storage dtype (default: as trained)")
    args = p.parse_args(argv)
    from ldm.sd.export import export_unet_to_diffusers
    from ldm.sd.loading import load_unet, set_offline

    set_offline()
    if args.unet_path.endswith(".json"):
        p.error("--unet_path must be a folder with trained weights, not a config")
    path = export_unet_to_diffusers(load_unet(args.unet_path), args.output_dir, args.dtype)
    print(json.dumps({"weights": path, "config": os.path.join(args.output_dir, "config.json")}))
    return path


if __name__ == "__main__":
    sys.exit(run_main(main))
