"""Datasets behind one interface, transforms and offline data preparation.

- `spec.py`: `DatasetSpec` (kind + path + image options + kind-specific options), `build_dataset`,
  `register_dataset_kind`, the sample schema and the one collator `collate` (both trainers use
  these and nothing else of this package).
- Kinds, each registering itself at import: `folder.py` ("folder": NAME.jpg + NAME.txt pairs),
  `laion.py` ("laion": LAION-format part files and listings), `tars.py` ("tar": webdataset /
  img2dataset tar shards; both stream through `stream.py`'s exactly-once sharded reader), `cache.py` ("cached": precomputed
  encoder outputs, the one encoder cache of every recipe). A new data format is one module
  that calls `register_dataset_kind` plus its import line below.
- `transforms.py` (decode, resize/crop/flip, normalise), `fsio.py` (opening paths, s3:// and
  other schemes through fsspec), `prepare.py` (jsonl, tar shards or parquet -> LAION part
  files), `check.py` (the pass behind scripts/check_data.py).
"""
from ldm.data.spec import (SAMPLE_KEYS, DatasetSpec, build_dataset, check_options, collate, dataset_kinds,
                           register_dataset_kind)
from ldm.data import cache, folder, laion, tars  # noqa: E402,F401  (the built-in kinds register themselves)

__all__ = ["DatasetSpec", "build_dataset", "register_dataset_kind", "dataset_kinds", "check_options", "collate",
           "SAMPLE_KEYS"]
