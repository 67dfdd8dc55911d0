"""Encoder cache: frozen-encoder outputs computed once, trained from many times.

kohya-ss/sd-scripts' ``--cache_latents`` / ``--cache_text_encoder_outputs`` for this project's
recipes, and mosaicml/diffusion's precomputed latents for SD pretraining at scale (facts only;
the code is our own). One mechanism for every recipe: the Stable Cascade trainers (Stage C:
EfficientNet latents + CLIP text; Stage B: Stage A latents + EfficientNet latents per size +
pooled CLIP text) cache image folders; the SD trainer trains from VAE latent moments (mean and
std: a fresh sample per epoch) + CLIP text outputs of LAION part files / tar shards
(`scripts/precompute_latents.py`, `--latents_path`; issue 15 item 5), stored as "streams".

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

Streams (a "cached" spec whose ``source_kind`` is a `STREAM_SOURCES` kind: an
`ldm.data.stream.ShardedStream` of LAION part files or tar shards). The records of a stream are
keyed by (part file, position) instead of by image file, behind the same seam:

* one shard per part file, its entry key `entry_key` of the part file itself (path, bytes,
  mtime, geometry, fingerprint; a changed part file is recomputed); tensors
  ``<part key>/status`` (per record of the file: 0 valid, 1 + reason index if bad, negative for
  a file that ends early), ``<part key>/positions`` (line / sample number), ``<part key>/captions``
  (UTF-8 JSON of the valid records' captions) and ``<part key>.<i>/<field>`` of valid record i;
* ``cache_index.json`` ``"streams"``: ``{stream_id: {"source", "size", "center_crop", "normalize",
  "flip", "fingerprint", "reasons", "parts": [{"path", "weight", "source", "key"}], "complete"}}``:
  the source's file entries in listing order, so training needs neither the listing nor the
  images (`stream_id`: geometry + fingerprint);
* `CachedStream` reads it as the source reads its files (`ldm.data.stream`: the same entry
  order per pass, exactly-once dealing over rank x worker, shuffle buffer, resume, bad-record
  counts, flip draw), so a run from the stream sees the samples of a run from the files, in the
  same order; `select_stream` refuses other encoders, geometry, an unfinished pass or a changed
  part file with one error saying which.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import paddle

from ldm.data.folder import FolderDataset
from ldm.data.stream import (FileEntry, RecordError, ShardedStream, TruncatedFile, _buffer_shuffle, deal_records,
                             decode_record_image, pass_order)
from ldm.data.spec import DatasetSpec, build_dataset, check_options, register_dataset_kind
from ldm.utils import get_logger

logger = get_logger(__name__)

__all__ = ["CACHE_FORMAT", "INDEX_FILE", "FLIP_SUFFIX", "EncoderCache", "CachedDataset", "entry_key", "constant_key",
           "check_cacheable", "build_encoder_cache", "cached_spec", "missing_entries"]

CACHE_FORMAT, CACHE_VERSION = "ldm-encoder-cache", 1
INDEX_FILE = "cache_index.json"
FLIP_SUFFIX = "@flip"  # image fields of the mirrored image (random_flip runs)
CACHED_OPTIONS = ("source_kind", "source_path", "source_options", "fingerprint")
STREAM_OPTIONS = ("infinite", "max_pixels", "shuffle_files", "shuffle_buffer")  # of a stream source (ShardedStream's)

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
        self.streams: Dict[str, dict] = {}  # stream id -> its record (see "Streams")
        path = os.path.join(self.folder, INDEX_FILE)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                index = json.load(f)
            if index.get("format") != CACHE_FORMAT or index.get("version") != CACHE_VERSION:
                raise ValueError(f"{path} is not an encoder cache index of format {CACHE_FORMAT} v{CACHE_VERSION}")
            self.entries = {k: v for k, v in index["entries"].items()
                            if os.path.isfile(os.path.join(self.folder, v))}
            self.streams = dict(index.get("streams") or {})
        self._source = None
        self._pid = None
        self._shards: Dict[str, object] = {}  # shard name -> WeightSource (stream parts, read one shard at a time)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def _write_index(self) -> None:
        path = os.path.join(self.folder, INDEX_FILE)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            index = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": self.entries}
            if self.streams:
                index["streams"] = self.streams
            json.dump(index, f, indent=0)
        os.replace(tmp, path)

    def add(self, entries: Mapping[str, Mapping[str, np.ndarray]], index_keys: Optional[Sequence[str]] = None) -> str:
        """Write one shard of {key: {field: array}} and record its keys (or only `index_keys`: a
        stream part records its part key, see "Streams"); returns the shard name."""
        from ldm.weights import save_safetensors

        used = {int(v[6:11]) for v in set(self.entries.values()) if v.startswith("shard-")}
        name = f"shard-{max(used, default=-1) + 1:05d}.safetensors"
        state = {f"{k}/{f}": _stored(a) for k, fields in entries.items() for f, a in fields.items()}
        save_safetensors(state, os.path.join(self.folder, name), metadata={"format": CACHE_FORMAT})
        self.entries.update({k: name for k in (entries if index_keys is None else index_keys)})
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

    # -- stream parts (see "Streams" in the module docstring)
    def add_part(self, part_key: str, status: Sequence[int], positions: Sequence[int], captions: Sequence[str],
                 records: Sequence[Mapping[str, np.ndarray]]) -> str:
        """Write the shard of one part file: per record of the file its `status` (0: valid, else
        1 + the index of its reason in the stream's `reasons`, negative for the end of a file that
        ends early) and `position` (line / sample number), the captions and fields of its valid records."""
        status = np.asarray(status, dtype=np.int32)
        if int((status == 0).sum()) != len(records) or len(captions) != len(records):
            raise ValueError(f"part {part_key}: {int((status == 0).sum())} valid records, {len(records)} encoded, "
                             f"{len(captions)} captions")
        entries = {f"{part_key}.{i}": dict(fields) for i, fields in enumerate(records)}
        entries[part_key] = {"status": status, "positions": np.asarray(positions, dtype=np.int64),
                             "captions": np.frombuffer(json.dumps(list(captions)).encode("utf-8"), np.uint8)}
        return self.add(entries, index_keys=[part_key])

    def _shard(self, part_key: str):
        from ldm.weights import WeightSource

        if part_key not in self.entries:
            raise KeyError(f"part {part_key} is not in the encoder cache {self.folder}")
        name = self.entries[part_key]
        if self._pid != os.getpid():
            self._shards, self._source, self._pid = {}, None, os.getpid()
        if name not in self._shards:
            for old in list(self._shards)[:-1]:  # keep at most two shards open
                self._shards.pop(old).close()
            self._shards[name] = WeightSource(os.path.join(self.folder, name))
        return self._shards[name]

    def part_records(self, part_key: str):
        """(status int32 [records], positions int64 [records], captions of the valid records) of a part."""
        src = self._shard(part_key)
        captions = json.loads(np.asarray(src.get(f"{part_key}/captions")).tobytes().decode("utf-8"))
        return np.asarray(src.get(f"{part_key}/status")), np.asarray(src.get(f"{part_key}/positions")), captions

    def part_record(self, part_key: str, index: int, names: Sequence[str]) -> Dict[str, np.ndarray]:
        """The fields `names` of valid record `index` (0-based among the part's valid records)."""
        src = self._shard(part_key)
        return {n: np.asarray(src.get(f"{part_key}.{index}/{n}")) for n in names}

    def part_fields(self, part_key: str) -> List[str]:
        prefix = f"{part_key}.0/"
        return sorted(n[len(prefix):] for n in self._shard(part_key).keys() if n.startswith(prefix))

    def set_stream(self, stream: str, record: Mapping) -> None:
        self.streams[stream] = dict(record)
        self._write_index()


def _stored(a) -> np.ndarray:
    """How a field is stored: floats as float32, integers (a stream part's status, captions) as they are."""
    a = np.asarray(a)
    return np.ascontiguousarray(a, dtype=a.dtype if a.dtype.kind in "iub" else np.float32)


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


def _encode_batch(samples: Sequence[Mapping], encode_images: EncodeFn, encode_captions: EncodeFn,
                  flip: bool) -> List[Dict[str, np.ndarray]]:
    """{field: array} per sample: the image fields (and, with `flip`, those of the mirrored pixels:
    the folder and LAION kinds' flip is an exact mirror of the same centre crop) and the caption fields."""
    pixels = np.stack([s["pixel_values"] for s in samples])
    fields = {k: np.asarray(v) for k, v in encode_images(pixels).items()}
    if flip:
        flipped = encode_images(np.ascontiguousarray(pixels[:, :, ::-1]))  # mirror W of uint8 [B, H, W, 3]
        fields.update({k + FLIP_SUFFIX: np.asarray(v) for k, v in flipped.items()})
    fields.update({k: np.asarray(v) for k, v in encode_captions([s["caption"] for s in samples]).items()})
    return [{k: v[j] for k, v in fields.items()} for j in range(len(samples))]


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
    if opts.get("source_kind", "folder") in STREAM_SOURCES:
        _build_stream(spec, opts, cache, encode_images, encode_captions, batch_size)
        return cache
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
        for j, fields in enumerate(_encode_batch([source[i] for i in idx], encode_images, encode_captions,
                                                 spec.random_flip)):
            pending[keys[idx[j]]] = fields
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
    """Dataset kind "cached": map-style over a folder source (the Trainer's sampler shards it), a
    self-sharding `CachedStream` over a stream source ("laion", "tar")."""
    if spec.options.get("source_kind", "folder") in STREAM_SOURCES:
        return CachedStream(spec, rank, world_size)
    return CachedDataset(spec)


register_dataset_kind("cached", build_cached_dataset)


def missing_entries(spec: DatasetSpec) -> int:
    """How many entries (images + the constant entry) the "cached" `spec` lacks (0: complete);
    lists the source without decoding any image."""
    opts = check_options(spec, CACHED_OPTIONS)
    if not os.path.isfile(os.path.join(spec.path, INDEX_FILE)):
        return 1
    cache = EncoderCache(spec.path)
    if opts.get("source_kind", "folder") in STREAM_SOURCES:
        record = cache.streams.get(stream_id(spec, opts["fingerprint"]))
        if record is None:
            return 1
        return (constant_key(opts["fingerprint"]) not in cache) + sum(p["key"] not in cache for p in record["parts"])
    src_opts = {"verify_images": False, **dict(opts.get("source_options") or {})}
    source = build_dataset(_source_spec(spec, {**opts, "source_options": src_opts}))
    fp = opts["fingerprint"]
    return (constant_key(fp) not in cache) + sum(k not in cache for k in _source_keys(source, spec, fp))


# --------------------------------------------------------------------------- streams
STREAM_SOURCES = ("laion", "tar")  # ldm.data.stream.ShardedStream kinds: records keyed by (part, position)


def stream_id(spec: DatasetSpec, fingerprint: str) -> str:
    """The id of a stream in a cache folder: output size, crop, normalisation and encoder
    fingerprint (not the source's listing: training reads only the cache)."""
    ident = {"size": list(spec.size), "center_crop": spec.center_crop, "normalize": spec.normalize,
             "fingerprint": str(fingerprint)}
    return "stream-" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def _part_key(path: str, spec: DatasetSpec, fingerprint: str) -> str:
    """`entry_key` of a part file (path, bytes, mtime, geometry, fingerprint), the flips included."""
    return entry_key(path, spec, f"{fingerprint}|flip={bool(spec.random_flip)}")


def _entry_records(source: ShardedStream, path: str):
    """(position, reason or None, sample or None, truncated) of every record of one file of a
    stream source, in file order, through the source's own hooks (`read_file`, `parse_record`)
    and its decode limits and transform (a centre crop draws nothing)."""
    try:
        for position, record in source.read_file(path):
            try:
                caption, data = source.parse_record(record)
                img = decode_record_image(data, source.max_pixels, source.resolution,
                                          as_array=source.transform.prefers_array)
            except RecordError as e:
                yield position, e.reason, None, False
                continue
            yield position, None, {"pixel_values": source.transform(img, None), "caption": caption}, False
    except TruncatedFile as e:
        yield e.position, e.reason, None, True


def _build_stream(spec: DatasetSpec, opts: Mapping, cache: EncoderCache, encode_images: EncodeFn,
                  encode_captions: EncodeFn, batch_size: int) -> None:
    """Fill the stream of `spec` (see "Streams"): one shard per part file not yet in the cache,
    the stream record rewritten after each (a stopped pass continues where it stopped)."""
    fingerprint = opts["fingerprint"]
    source = build_dataset(_source_spec(spec, opts), rank=0, world_size=1)
    if not isinstance(source, ShardedStream):
        raise ValueError(f"dataset kind {opts.get('source_kind')!r} is no ldm.data.stream.ShardedStream")
    sid = stream_id(spec, fingerprint)
    old = cache.streams.get(sid, {})
    path = os.path.abspath(opts["source_path"])
    if old and path != old["source"]["path"]:
        raise ValueError(f"{spec.path} already holds the stream of {old['source']['path']} for these encoders and "
                         f"settings; write the one of {opts['source_path']} into another folder")
    reasons = list(old.get("reasons", ()))
    parts = [{"path": e.path, "weight": e.weight, "source": e.source, "key": _part_key(e.path, spec, fingerprint)}
             for e in source.entries]
    record = {"source": {"kind": opts["source_kind"], "path": path, "options": dict(opts.get("source_options") or {})},
              "size": list(spec.size), "center_crop": spec.center_crop, "normalize": spec.normalize,
              "flip": bool(spec.random_flip), "fingerprint": str(fingerprint), "reasons": reasons, "parts": parts,
              "complete": False}
    todo = {p["key"]: p["path"] for p in parts if p["key"] not in cache}
    logger.info("stream cache %s: %d of %d part entries to compute", spec.path, len(todo), len(parts))
    for key, part in todo.items():
        status, positions, captions, fields, batch = [], [], [], [], []
        for position, reason, sample, truncated in itertools.chain(_entry_records(source, part), [(0, None, None, 0)]):
            if reason is not None:
                if reason not in reasons:
                    reasons.append(reason)
                status.append((-1 if truncated else 1) * (1 + reasons.index(reason)))
                positions.append(position)
                continue
            if sample is not None:
                status.append(0)
                positions.append(position)
                captions.append(sample["caption"])
                batch.append(sample)
            if batch and (len(batch) == batch_size or sample is None):
                fields += _encode_batch(batch, encode_images, encode_captions, spec.random_flip)
                batch = []
        cache.add_part(key, status, positions, captions, fields)
        cache.set_stream(sid, record)
    record["complete"] = True
    cache.set_stream(sid, record)


def _fingerprint_diff(have: str, want: str) -> str:
    """What differs between two fingerprints: the differing fields of JSON objects, else the whole."""
    try:
        a, b = json.loads(have), json.loads(want)
    except (TypeError, ValueError):
        a = b = None
    if not isinstance(a, dict) or not isinstance(b, dict):
        return "the encoder fingerprint"
    return ", ".join(sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)))


def select_stream(cache: EncoderCache, spec: DatasetSpec, fingerprint: str) -> dict:
    """The complete stream record of `spec` in `cache`, or one ValueError saying what differs
    (other encoders, size, crop, normalisation), what is unfinished or which part file changed."""
    record = cache.streams.get(stream_id(spec, fingerprint))
    fix = "recompute them with scripts/precompute_latents.py (into a new folder), or train from the images"
    if record is None:
        if not cache.streams:
            raise ValueError(f"{cache.folder} holds no precomputed stream (scripts/precompute_latents.py writes one)")
        diffs = []
        for r in cache.streams.values():
            d = [f"{n} {r[n]} (this run: {v})" for n, v in (("size", list(spec.size)), ("center_crop", spec.center_crop),
                                                           ("normalize", spec.normalize)) if r[n] != v]
            if r["fingerprint"] != str(fingerprint):
                d.insert(0, f"other encoders ({_fingerprint_diff(r['fingerprint'], str(fingerprint))} differ)")
            diffs.append("; ".join(d))
        raise ValueError(f"the precomputed latents in {cache.folder} do not match this run: {' | '.join(diffs)}; {fix}")
    if not record["complete"] or any(p["key"] not in cache for p in record["parts"]):
        done = sum(p["key"] in cache for p in record["parts"])
        raise ValueError(f"the precomputed stream in {cache.folder} is unfinished ({done} of {len(record['parts'])} "
                         f"part entries): run scripts/precompute_latents.py again to finish it")
    if spec.random_flip and not record["flip"]:
        raise ValueError(f"the precomputed stream in {cache.folder} has no mirrored entries for random_flip "
                         f"(precompute with --random_flip True)")
    made = dataclasses.replace(spec, random_flip=record["flip"])
    for p in record["parts"]:
        if os.path.isfile(p["path"]) and _part_key(p["path"], made, fingerprint) != p["key"]:
            raise ValueError(f"part file {p['path']} changed since its latents were computed; {fix}")
    return record


class CachedStream(ShardedStream):
    """The records of a precomputed stream (kind "cached" over a "laion" / "tar" source), read
    as the source reads its files: `ldm.data.stream.ShardedStream` with the same file entries
    (weights, order per pass), the same exactly-once split over (rank x DataLoader worker)
    consumers (`deal_records`), shuffle buffer, resume (`set_start`) and checks; each file's
    records come from its cache shard instead (`read_file`: position, status, caption).
    Yields {"caption": str, <field>: float32 ndarray}; `constants` holds the constant entry."""

    def __init__(self, spec: DatasetSpec, rank: Optional[int] = None, world_size: Optional[int] = None):
        opts = check_options(spec, CACHED_OPTIONS)
        check_cacheable(spec)
        src = dict(opts.get("source_options") or {})
        unknown = sorted(set(src) - set(STREAM_OPTIONS))
        if unknown:
            raise ValueError(f"unknown source option(s) {unknown} of a cached stream; it accepts {STREAM_OPTIONS}")
        self.cache = EncoderCache(spec.path)
        fp = opts["fingerprint"]
        self.record = select_stream(self.cache, spec, fp)
        ckey = constant_key(fp)
        self.constants = self.cache.get(ckey) if ckey in self.cache else {}
        self.entries = [FileEntry(p["path"], p["weight"], p["source"]) for p in self.record["parts"]]
        self.part_keys = {p["path"]: p["key"] for p in self.record["parts"]}
        self.reasons = list(self.record["reasons"])
        super().__init__(spec.path, resolution=max(spec.size), normalize=spec.normalize, center_crop=True,
                         random_flip=spec.random_flip, seed=spec.seed, rank=rank, world_size=world_size, **src)
        self.random_flip = spec.random_flip
        first = next((k for k in self.part_keys.values() if (self.cache.part_records(k)[0] == 0).any()), None)
        self.first_key = first  # a part with a valid record (None: no valid record at all)
        names = self.cache.part_fields(first) if first else []
        self.fields = [f for f in names if not f.endswith(FLIP_SUFFIX)]
        self.flip_fields = [f for f in names if f.endswith(FLIP_SUFFIX)]
        # a flipped record: the mirrored image fields, the caption fields as they are
        self.flipped_names = self.flip_fields + [f for f in self.fields if f + FLIP_SUFFIX not in self.flip_fields]

    def read_file(self, path: str):
        """(position, (status, index among the valid records, caption)) of every record of a part,
        from its shard; a part whose source file ended early raises TruncatedFile there, as the
        source did."""
        status, positions, captions = self.cache.part_records(self.part_keys[path])
        index = 0
        for s, position in zip(status.tolist(), positions.tolist()):
            if s < 0:
                raise TruncatedFile(self.reasons[-s - 1], position)
            yield position, (s, index, captions[index] if s == 0 else None)
            index += s == 0

    def _iter_pass(self, worker, num_workers, epoch, stats, decode_only: bool):
        consumer, num_consumers = self.rank * num_workers + worker, self.world_size * num_workers
        rng = np.random.default_rng([self.seed, epoch, self.rank, self.world_size, worker, num_workers])
        records = deal_records(pass_order(self.entries, self.seed, epoch, self.shuffle_files), consumer,
                               num_consumers, stats, self.read_file)
        if self.shuffle_buffer > 0:
            records = _buffer_shuffle(records, self.shuffle_buffer, rng)
        for path, position, (status, index, caption) in records:
            stats.records += 1
            if status:
                stats.add_invalid(self.reasons[status - 1], f"{path}:{position}")
                continue
            stats.valid += 1
            if decode_only:
                yield None
                continue
            key = self.part_keys[path]
            # the source transform's one draw with a centre crop: the flip
            flip = self.random_flip and rng.random() < 0.5
            out = self.cache.part_record(key, index, self.flipped_names if flip else self.fields)
            yield {"caption": caption, **{f[:-len(FLIP_SUFFIX)] if f.endswith(FLIP_SUFFIX) else f: v
                                          for f, v in out.items()}}
