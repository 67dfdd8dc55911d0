"""Encoder cache: frozen-encoder outputs computed once, trained from many times.

kohya-ss/sd-scripts' ``--cache_latents`` / ``--cache_text_encoder_outputs`` for this project's
recipes (facts only; the code is our own). One mechanism for every recipe: the Stable Cascade
trainers (Stage C: EfficientNet latents + CLIP text; Stage B: Stage A latents + EfficientNet
latents per size + pooled CLIP text) use it today; the SD trainer can store VAE latent
moments + CLIP text outputs the same way (issue 15 item 5).

Layout of a cache folder:

* ``cache_index.json``: ``{"format": "ldm-encoder-cache", "version": 1, "entries": {key: shard}}``,
  rewritten atomically after each shard;
* ``shard-NNNNN.safetensors``: tensors named ``<key>/<field>`` (float32, written by
  `ldm.weights.save_safetensors`, atomic), read one tensor at a time through `ldm.weights.WeightSource`.

Keys (`entry_key`): sha256 of the image's absolute path, byte size, mtime (ns), the output
size (resolution / bucket), crop and normalisation settings and the recipe's encoder
`fingerprint` (weights, max length, ...). A changed image gets a new key, so it is recomputed
and its old entry is ignored (`EncoderCache.prune` drops unreferenced entries from the index).
The recipe-wide constants (the empty caption's outputs, for caption dropout in the step) are
the entry ``constant_key(fingerprint)``.

What can be cached: the encoders must see deterministic pixels, so a random crop is refused
(`check_cacheable`); a random flip is handled by caching both orientations (image fields
``<field>`` and ``<field>@flip``) and drawing the flip exactly as the "folder" kind does
(``default_rng([seed, epoch, index]).random() < 0.5`` with a centre crop).

Dataset kind "cached" (`CachedDataset`): ``DatasetSpec("cached", cache_folder, <the geometry of the
source>, options={"source_kind": "folder", "source_path": ..., "source_options": {...},
"fingerprint": ...})`` yields ``{"caption": str, <field>: float32 ndarray, ...}`` with the
source's caption; ``dataset.constants`` holds the constant entry. `build_encoder_cache` fills
the missing entries first.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import paddle

from ldm.data.folder import FolderDataset
from ldm.data.spec import DatasetSpec, build_dataset, check_options, register_dataset_kind
from ldm.utils import get_logger

logger = get_logger(__name__)

__all__ = ["CACHE_FORMAT", "INDEX_FILE", "FLIP_SUFFIX", "EncoderCache", "CachedDataset", "entry_key", "constant_key",
           "check_cacheable", "build_encoder_cache", "cached_spec", "missing_entries"]

CACHE_FORMAT, CACHE_VERSION = "ldm-encoder-cache", 1
INDEX_FILE = "cache_index.json"
FLIP_SUFFIX = "@flip"  # image fields of the mirrored image (random_flip runs)
CACHED_OPTIONS = ("source_kind", "source_path", "source_options", "fingerprint")

EncodeFn = Callable[..., Mapping[str, np.ndarray]]


def check_cacheable(spec: DatasetSpec) -> None:
    """ValueError unless the encoders would see the same pixels every epoch (centre crop)."""
    if not spec.center_crop:
        raise ValueError("the encoder cache needs a deterministic crop: a random crop gives other pixels each epoch "
                         "(use --center_crop True with --cache_dir, or train without the cache)")


def entry_key(image_path: str, spec: DatasetSpec, fingerprint: str, size: Optional[Sequence[int]] = None) -> str:
    """The cache key of one image (see the module docstring); stats the file. `size`: the
    image's (h, w) when it differs from `spec.size` (its aspect bucket)."""
    st = os.stat(image_path)
    ident = {"path": os.path.abspath(image_path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
             "size": [int(v) for v in (size or spec.size)], "center_crop": spec.center_crop,
             "normalize": spec.normalize, "fingerprint": str(fingerprint)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:40]


def constant_key(fingerprint: str) -> str:
    return "const-" + hashlib.sha256(str(fingerprint).encode()).hexdigest()[:34]


class EncoderCache:
    """The index + shards of one cache folder (see the module docstring)."""

    def __init__(self, folder: str):
        self.folder = os.fspath(folder)
        os.makedirs(self.folder, exist_ok=True)
        self.entries: Dict[str, str] = {}
        path = os.path.join(self.folder, INDEX_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                index = json.load(f)
            if index.get("format") != CACHE_FORMAT or index.get("version") != CACHE_VERSION:
                raise ValueError(f"{path} is not an encoder cache index of format {CACHE_FORMAT} v{CACHE_VERSION}")
            self.entries = {k: v for k, v in index["entries"].items()
                            if os.path.isfile(os.path.join(self.folder, v))}
        self._source = None
        self._pid = None

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def _write_index(self) -> None:
        path = os.path.join(self.folder, INDEX_FILE)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": self.entries}, f, indent=0)
        os.replace(tmp, path)

    def add(self, entries: Mapping[str, Mapping[str, np.ndarray]]) -> str:
        """Write one shard of {key: {field: array}} and record its keys; returns the shard name."""
        from ldm.weights import save_safetensors

        used = {int(v[6:11]) for v in set(self.entries.values()) if v.startswith("shard-")}
        name = f"shard-{max(used, default=-1) + 1:05d}.safetensors"
        state = {f"{k}/{f}": np.ascontiguousarray(a, dtype=np.float32) for k, fields in entries.items()
                 for f, a in fields.items()}
        save_safetensors(state, os.path.join(self.folder, name), metadata={"format": CACHE_FORMAT})
        self.entries.update({k: name for k in entries})
        self._write_index()
        self._source = None
        return name

    def prune(self, keep: Sequence[str]) -> int:
        """Forget the entries not in `keep` (their shards stay until no entry refers to them)."""
        keep = set(keep)
        dropped = [k for k in self.entries if k not in keep]
        for k in dropped:
            del self.entries[k]
        if dropped:
            self._write_index()
            self._source = None
        return len(dropped)

    def _reader(self):
        from ldm.weights import WeightSource

        if self._source is None or self._pid != os.getpid():  # one reader per (DataLoader worker) process
            shards = sorted(set(self.entries.values()))
            self._source, self._pid = WeightSource([os.path.join(self.folder, s) for s in shards]), os.getpid()
        return self._source

    def fields(self, key: str) -> List[str]:
        prefix = key + "/"
        return sorted(n[len(prefix):] for n in self._reader().keys() if n.startswith(prefix))

    def get(self, key: str, names: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
        if key not in self.entries:
            raise KeyError(f"{key} is not in the encoder cache {self.folder}")
        src = self._reader()
        return {n: np.asarray(src.get(f"{key}/{n}")) for n in (names or self.fields(key))}


def _source_spec(spec: DatasetSpec, opts: Mapping) -> DatasetSpec:
    return DatasetSpec(opts.get("source_kind", "folder"), opts["source_path"], resolution=spec.resolution,
                       normalize=spec.normalize, center_crop=spec.center_crop, random_flip=False, seed=spec.seed,
                       options=dict(opts.get("source_options") or {}))


def cached_spec(source: DatasetSpec, cache_dir: str, fingerprint: str) -> DatasetSpec:
    """The "cached" spec of `source` (a "folder" spec) in `cache_dir`."""
    return DatasetSpec("cached", cache_dir, resolution=source.resolution, normalize=source.normalize,
                       center_crop=source.center_crop, random_flip=source.random_flip, seed=source.seed,
                       options={"source_kind": source.kind, "source_path": source.path,
                                "source_options": dict(source.options), "fingerprint": str(fingerprint)})


def _source_keys(dataset, spec: DatasetSpec, fingerprint: str) -> List[str]:
    """The entry key of every sample of a map-style source (.samples [(image_path, caption)],
    optional .item_sizes: the aspect bucket of each)."""
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise ValueError(f"the encoder cache needs a map-style source with .samples [(image_path, caption)], got "
                         f"{type(dataset).__name__}")
    sizes = getattr(dataset, "item_sizes", None) or [None] * len(samples)
    return [entry_key(p, spec, fingerprint, hw) for (p, _), hw in zip(samples, sizes)]


def build_encoder_cache(spec: DatasetSpec, encode_images: EncodeFn, encode_captions: EncodeFn,
                        constants: Optional[Callable[[], Mapping[str, np.ndarray]]] = None, batch_size: int = 8,
                        shard_size: int = 256) -> EncoderCache:
    """Fill the missing entries of the "cached" `spec`; returns its EncoderCache.

    encode_images(pixel_values uint8 [B, H, W, 3], the collated schema) -> {field: [B, ...]};
    encode_captions(captions [B] str) -> {field: [B, ...]}; constants() -> {field: array} (e.g.
    the empty caption's outputs), stored once per fingerprint. With `spec.random_flip`, the
    image fields of the mirrored images are stored too (``<field>@flip``).
    """
    opts = check_options(spec, CACHED_OPTIONS)
    check_cacheable(spec)
    cache = EncoderCache(spec.path)
    fingerprint = opts["fingerprint"]
    ckey = constant_key(fingerprint)
    if constants is not None and ckey not in cache:
        cache.add({ckey: dict(constants())})
    source = build_dataset(_source_spec(spec, opts))
    keys = _source_keys(source, spec, fingerprint)
    todo = [i for i, k in enumerate(keys) if k not in cache]
    if not todo:
        return cache
    logger.info("encoder cache %s: computing %d of %d entries", spec.path, len(todo), len(keys))
    sizes = getattr(source, "item_sizes", None)
    if sizes:  # one batch holds one aspect bucket
        todo.sort(key=lambda i: (tuple(sizes[i]), i))
    batches, batch = [], []
    for i in todo:
        if batch and (len(batch) == batch_size or (sizes and sizes[i] != sizes[batch[0]])):
            batches.append(batch)
            batch = []
        batch.append(i)
    batches.append(batch)
    pending: Dict[str, Dict[str, np.ndarray]] = {}
    for idx in batches:
        samples = [source[i] for i in idx]
        pixels = np.stack([s["pixel_values"] for s in samples])
        fields = {k: np.asarray(v) for k, v in encode_images(pixels).items()}
        if spec.random_flip:  # the folder kind's flip is an exact mirror of the same crop
            flipped = encode_images(np.ascontiguousarray(pixels[:, :, ::-1]))  # mirror W of uint8 [B, H, W, 3]
            fields.update({k + FLIP_SUFFIX: np.asarray(v) for k, v in flipped.items()})
        fields.update({k: np.asarray(v) for k, v in encode_captions([s["caption"] for s in samples]).items()})
        for j, i in enumerate(idx):
            pending[keys[i]] = {k: v[j] for k, v in fields.items()}
        if len(pending) >= shard_size:
            cache.add(pending)
            pending = {}
    if pending:
        cache.add(pending)
    return cache


class CachedDataset(paddle.io.Dataset):
    """Map-style dataset of cached encoder outputs, in the order of its source (see the module
    docstring). Every image of the source must be in the cache (`build_encoder_cache`)."""

    def __init__(self, spec: DatasetSpec):
        super().__init__()
        opts = check_options(spec, CACHED_OPTIONS)
        check_cacheable(spec)
        self.spec, self.seed, self.random_flip, self.epoch = spec, spec.seed, spec.random_flip, 0
        self.cache = EncoderCache(spec.path)
        src_opts = dict(opts.get("source_options") or {})
        src_opts.setdefault("verify_images", False)  # the images were decoded when the cache was built
        source = build_dataset(_source_spec(spec, {**opts, "source_options": src_opts}))
        fp = opts["fingerprint"]
        self.samples = [(p, c) for p, c in source.samples]
        self.item_sizes = getattr(source, "item_sizes", None)  # aspect buckets: the Trainer batches by size
        self.keys = _source_keys(source, spec, fp)
        missing = [p for (p, _), k in zip(self.samples, self.keys) if k not in self.cache]
        if missing:
            raise ValueError(f"{len(missing)} image(s) are not in the encoder cache {spec.path} (new or changed since "
                             f"it was built; build_encoder_cache fills them), e.g. {missing[:3]}")
        ckey = constant_key(fp)
        self.constants = self.cache.get(ckey) if ckey in self.cache else {}
        all_fields = self.cache.fields(self.keys[0])
        self.flip_fields = [f for f in all_fields if f.endswith(FLIP_SUFFIX)]
        if self.random_flip and not self.flip_fields:
            raise ValueError(f"the encoder cache {spec.path} has no mirrored entries for random_flip")
        self.fields = [f for f in all_fields if not f.endswith(FLIP_SUFFIX)]

    set_epoch = FolderDataset.set_epoch  # (the epoch of the flip draws)
    __len__ = FolderDataset.__len__

    def __getitem__(self, index: int) -> dict:
        index = range(len(self.samples))[index]  # IndexError out of range; negative counts from the end
        key = self.keys[index]
        out = self.cache.get(key, self.fields)
        # the folder kind's draw with a centre crop: the flip is the generator's first number
        if self.random_flip and np.random.default_rng([self.seed, self.epoch, index]).random() < 0.5:
            out.update({f[:-len(FLIP_SUFFIX)]: v for f, v in self.cache.get(key, self.flip_fields).items()})
        return {"caption": self.samples[index][1], **out}


def build_cached_dataset(spec: DatasetSpec, rank: Optional[int] = None, world_size: Optional[int] = None):
    """Dataset kind "cached" (map-style: the Trainer's sampler shards it)."""
    return CachedDataset(spec)


register_dataset_kind("cached", build_cached_dataset)


def missing_entries(spec: DatasetSpec) -> int:
    """How many entries (images + the constant entry) the "cached" `spec` lacks (0: complete);
    lists the source without decoding any image."""
    opts = check_options(spec, CACHED_OPTIONS)
    if not os.path.isfile(os.path.join(spec.path, INDEX_FILE)):
        return 1
    cache = EncoderCache(spec.path)
    src_opts = {"verify_images": False, **dict(opts.get("source_options") or {})}
    source = build_dataset(_source_spec(spec, {**opts, "source_options": src_opts}))
    fp = opts["fingerprint"]
    return (constant_key(fp) not in cache) + sum(k not in cache for k in _source_keys(source, spec, fp))
