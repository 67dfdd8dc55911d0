"""Convert a caption/image jsonl, or img2dataset output (webdataset tar shards or parquet files),
into LAION-format part files (seed §3.1 of the SD README).

    python create_pretraining_data.py --input_path ./coco_data/coco_data.jsonl \\
        --output_path ./processed_data --caption_key caption --image_key image \\
        --per_part_file_num 1000 --save_gzip_file
    python create_pretraining_data.py --input_path 'shards/{00000..00099}.tar' --output_path ./processed_data
    python create_pretraining_data.py --input_path ./laion_parquet/ --image_column jpg --caption_column caption \\
        --output_path ./processed_data

Writes processed_data/filelist/custom_dataset.filelist(.list) and
processed_data/laion400m_format_data/part-000001.gz. Logic: ldm/data/prepare.py.
"""
import argparse
import os
import sys

from ldm.utils import quiet_third_party, run_main

if __name__ == "__main__":
    quiet_third_party()  # before paddle is imported (issue 12 item 15)

from ldm.data.prepare import create_pretraining_data  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_path", required=True,
                   help="a jsonl file (one {caption, image} object per line); or tar shards (a tar, a folder of tars, a "
                        "pattern such as 'shards/{00000..00099}.tar', a listing of tars); or parquet files (a file, a "
                        "folder or a pattern) with image bytes and captions. s3:// etc. need fsspec")
    p.add_argument("--output_path", required=True, help="output folder")
    p.add_argument("--output_name", default="custom_dataset", help="name of the .filelist/.filelist.list")
    p.add_argument("--caption_key", default="caption", help="json key of the caption (jsonl; a tar sample's .json)")
    p.add_argument("--image_column", default="jpg", help="parquet column of the image bytes (img2dataset: jpg)")
    p.add_argument("--caption_column", default="caption", help="parquet column of the caption")
    p.add_argument("--image_key", default="image", help="json key of the image path (relative to the jsonl's folder)")
    p.add_argument("--per_part_file_num", type=int, default=1000, help="records per part file")
    p.add_argument("--save_gzip_file", action="store_true", help="gzip the part files (part-000001.gz)")
    p.add_argument("--num_repeat", type=int, default=1,
                   help="lines per part in the .filelist (accepted for the seed; the dataset does not need it)")
    p.add_argument("--num_workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes that read and verify images (0 or 1: in this process)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = create_pretraining_data(
        input_path=args.input_path,
        output_path=args.output_path,
        output_name=args.output_name,
        caption_key=args.caption_key,
        image_key=args.image_key,
        per_part_file_num=args.per_part_file_num,
        save_gzip_file=args.save_gzip_file,
        num_repeat=args.num_repeat,
        num_workers=args.num_workers,
        image_column=args.image_column,
        caption_column=args.caption_column,
    )
    if result.written == 0:
        print("error: no record was written; no filelist created", file=sys.stderr)
    else:
        print(f"file list: {result.filelist_list}")
    print(result.summary())
    return 0 if result.written else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
