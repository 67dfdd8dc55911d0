"""Read one full pass of a training data set exactly as training shards it, and count problems.

    python scripts/check_data.py --file_list data/filelist/train.filelist.list \\
        --world_size 2 --num_workers 4 [--strict]
    python scripts/check_data.py --file_list 'shards/{00000..00099}.tar' --world_size 2 --num_workers 4

Every (rank, worker) consumer is simulated in this process (no processes are spawned). The LAST
line printed is a JSON object: records, valid, invalid ({reason: {count, first: "file:line"}}),
per_consumer ([{rank, worker, records, valid}]). Exit status: 1 with --strict when any record is
invalid, 2 when no record is valid or (file lists) a consumer gets no valid record - training's
infinite stream would stop with an error there -, 3 when the data cannot be read at all (a missing
or empty file list, a listed file not found, a bad listing line, a missing folder ...: the JSON
line then has an "error" field and zero counts), and 0 otherwise.
"""
import argparse
import json
import sys


from ldm.utils import quiet_third_party, run_main

if __name__ == "__main__":
    quiet_third_party()  # before paddle is imported (issue 12 item 15)

from ldm.data.check import check_folder, check_stream_source  # noqa: E402
from ldm.data.tars import is_tar_source  # noqa: E402
from ldm.data.transforms import DEFAULT_MAX_PIXELS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--file_list", help="a .filelist.list, a .filelist or one part file; or tar shards: a tar, a "
                     "listing of tars or a pattern such as 'shards/{00000..00099}.tar'")
    src.add_argument("--dataset_path", help="a Stage C image/caption folder (ldm.data.folder), or a folder / pattern "
                     "of tar shards")
    p.add_argument("--world_size", type=int, default=1)
    p.add_argument("--num_workers", type=int, default=1, help="DataLoader workers per rank (0 counts as 1)")
    p.add_argument("--batch_size", type=int, default=1, help="--dataset_path only: per-rank batch size")
    p.add_argument("--resolution", type=int, default=256, help="training resolution (JPEG draft decoding)")
    p.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb limit (0: none)")
    p.add_argument("--strict", action="store_true", help="exit non-zero when anything is invalid")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    num_workers = max(args.num_workers, 1)
    try:
        report = _check(args, num_workers)
    except (ValueError, OSError) as e:  # LaionDataError is a ValueError; folder errors are both kinds
        source = {"dataset_path": args.dataset_path} if args.dataset_path else {"file_list": args.file_list}
        print(f"error: {e}", file=sys.stderr)
        print(json.dumps({
            **source, "error": f"{type(e).__name__}: {e}", "records": 0, "valid": 0, "invalid": {},
            "per_consumer": [],
        }, ensure_ascii=False))
        return 3
    print(json.dumps(report, ensure_ascii=False))
    if report["valid"] == 0 or report.get("consumers_without_valid", 0):
        return 2
    if args.strict and report["invalid"]:
        return 1
    return 0


def _check(args, num_workers: int) -> dict:
    stream = dict(world_size=args.world_size, num_workers=num_workers, resolution=args.resolution,
                  max_pixels=args.max_pixels or None)
    if args.dataset_path and not is_tar_source(args.dataset_path):
        return check_folder(args.dataset_path, batch_size=args.batch_size, **stream)
    return check_stream_source(args.dataset_path or args.file_list, **stream)  # LAION parts or tar shards


if __name__ == "__main__":
    sys.exit(run_main(main))
