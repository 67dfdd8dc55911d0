"""FID statistics of an image set, and the FID between two statistics files.

    python scripts/fid_stats.py --images coco_val_256/ --inception weights/inception_fid.safetensors \
        --output coco_val_256.npz [--resolution 256] [--limit 30000]
    python scripts/fid_stats.py --compare generated.npz coco_256_30k.npz     # last line: {"fid": ...}

--images is a folder of image files (sorted, not recursive) or a LAION part file / .filelist /
.filelist.list. The .npz holds `mu` and `sigma` (pytorch-fid `--save-stats` and PaddleMIX
`coco_*.npz` read and write the same) plus `num_images`. --inception is our converted
inception_fid.safetensors (scripts/convert_other_weight.py --inception) or PaddleMIX's
pp_inception-2015-12-05-6726825d.pdparams. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import sys


from ldm.utils import quiet_third_party, run_main

if __name__ == "__main__":
    quiet_third_party()  # before paddle is imported (issue 12 item 15)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", help="image folder or LAION file list")
    p.add_argument("--inception", help="FID Inception weights (.safetensors from the converter, or PaddleMIX .pdparams)")
    p.add_argument("--output", help="statistics file to write (.npz)")
    p.add_argument("--resolution", type=int, default=None,
                   help="resize the shorter side to this and centre-crop a square first (default: images as they are)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many images")
    p.add_argument("--batch_size", type=int, default=50)
    p.add_argument("--compare", nargs=2, metavar=("A.npz", "B.npz"), help="print the FID between two statistics files")
    p.add_argument("--no_progress", action="store_true")
    args = p.parse_args(argv)
    if args.compare:
        if args.images or args.output:
            p.error("--compare takes two .npz files and nothing else")
    elif not (args.images and args.inception and args.output):
        p.error("give --images, --inception and --output (or --compare A.npz B.npz)")
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        p.error("--batch_size and --limit must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from ldm.eval.fid import frechet_distance, load_stats

    if args.compare:
        a, b = (load_stats(f) for f in args.compare)
        out = {"fid": frechet_distance(*a, *b), "a": args.compare[0], "b": args.compare[1]}
    else:
        from ldm.eval.fid import image_statistics, save_stats
        from ldm.eval.images import count_images, iter_images
        from ldm.eval.inception import load_inception

        model = load_inception(args.inception)
        stats = image_statistics(model, iter_images(args.images, args.resolution, args.limit), args.batch_size,
                                 not args.no_progress, total=count_images(args.images, args.limit))
        save_stats(args.output, stats.mu, stats.sigma, stats.n)
        out = {"output": args.output, "num_images": stats.n}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    sys.exit(run_main(main))
