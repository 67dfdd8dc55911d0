"""A guidance-scale sweep: generate images for a caption file at several guidance scales, score each
scale by FID and CLIP score, and report the runs as JSON, CSV and a plot of FID against CLIP score.

Layout of an output folder (one folder can hold several runs, which share the table and the plot):

    <output_dir>/<run>/g<scale>/<k:05d>.png   caption k at that scale, sampled from seed + k
    <output_dir>/<run>/settings.json          what made the images (a rerun must match it)
    <output_dir>/results.json                 {"runs": {run: {"settings", "points": [...]}}}
    <output_dir>/results.csv                  one row per (run, guidance scale)
    <output_dir>/fid_clip.png                 FID (y) against CLIP score (x), one line per run,
                                              one point per guidance scale

Generation is resumable: existing image files are kept (they are written atomically, so a file
that exists is complete) and only the missing captions are sampled, in batches of consecutive
captions. Scoring reads the images back one batch at a time (Inception features and CLIP
embeddings are streamed; the image set is never held in memory).
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Callable, Iterator, Optional, Sequence

from ldm.eval.fid import FeatureStats, FrechetReference, inception_features
from ldm.eval.images import load_image
from ldm.utils import atomic_open, get_logger, save_png, special_file_problem

__all__ = ["read_captions", "scale_dir", "image_path", "check_run_settings", "generate_missing", "score_images", "scale_point",
           "reference_statistics", "update_results", "write_table", "plot_runs", "RESULTS_JSON", "RESULTS_CSV", "RESULTS_PLOT", "CAPTION_COLUMNS"]

logger = get_logger(__name__)

RESULTS_JSON, RESULTS_CSV, RESULTS_PLOT = "results.json", "results.csv", "fid_clip.png"
CAPTION_COLUMNS = ("caption_en", "caption")  # COCO TSV (PaddleMIX coco30k.tsv) / generic, first found wins
CSV_FIELDS = ("run", "family", "guidance_scale", "fid", "clip_score", "num_images")


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------
def _caption_of(record: dict, where: str) -> str:
    for key in CAPTION_COLUMNS:
        if key in record:
            return str(record[key]).strip()
    raise ValueError(f"{where}: no {' or '.join(CAPTION_COLUMNS)} field (found {sorted(record)})")


def read_captions(path, limit: Optional[int] = None) -> list[str]:
    """Captions from a COCO-style .tsv / .csv with a header (column `caption_en`, else `caption`), a
    .jsonl (objects with one of those keys, or JSON strings), or a text file (one caption per
    non-empty line). At most `limit` (the first ones)."""
    path = os.fspath(path)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    ext = os.path.splitext(path)[1].lower()
    if special_file_problem(path):  # a FIFO or device would block or never end (issue 12 item 6)
        raise ValueError(f"captions file {special_file_problem(path)}")
    with open(path, encoding="utf-8-sig", newline="") as f:
        if ext in (".tsv", ".csv"):
            reader = csv.DictReader(f, delimiter="\t" if ext == ".tsv" else ",")
            if not reader.fieldnames or not any(c in reader.fieldnames for c in CAPTION_COLUMNS):
                raise ValueError(f"{path}: the header has no {' or '.join(CAPTION_COLUMNS)} column "
                                 f"(found {reader.fieldnames})")
            captions = [_caption_of(row, f"{path}:{i + 2}") for i, row in enumerate(reader)]
        elif ext == ".jsonl":
            captions = []
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                rec = json.loads(line)
                captions.append(rec.strip() if isinstance(rec, str) else _caption_of(rec, f"{path}:{i + 1}"))
        else:
            captions = [line.strip() for line in f if line.strip()]
    if not captions:
        raise ValueError(f"{path}: no captions")
    return captions[:limit]


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
def scale_dir(run_dir, guidance_scale: float) -> str:
    return os.path.join(os.fspath(run_dir), f"g{float(guidance_scale):g}")


def image_path(folder, index: int) -> str:
    return os.path.join(folder, f"{index:05d}.png")


def _runs(indices: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Consecutive indices in chunks of at most batch_size (a batch's image i gets seed + first + i)."""
    chunk: list[int] = []
    for i in indices:
        if chunk and (i != chunk[-1] + 1 or len(chunk) == batch_size):
            yield chunk
            chunk = []
        chunk.append(i)
    if chunk:
        yield chunk


RUN_SETTINGS = "settings.json"
GROWABLE = ("num_captions",)  # a run may be extended to more captions, nothing else may change


def check_run_settings(run_dir, settings: dict) -> None:
    """Record `settings` in <run_dir>/settings.json, or, when the folder already holds a run, check
    that it was made with the same settings: kept images of other settings would mix silently."""
    path = os.path.join(os.fspath(run_dir), RUN_SETTINGS)
    settings = json.loads(json.dumps(settings))  # as JSON reads it back (tuples -> lists)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        diff = sorted(k for k in set(old) | set(settings) if k not in GROWABLE and old.get(k) != settings.get(k))
        if diff:
            raise ValueError(f"{run_dir} holds images made with other settings ({', '.join(diff)}: "
                             f"{[old.get(k) for k in diff]} -> {[settings.get(k) for k in diff]}); "
                             "use another --run_name or remove that folder")
    os.makedirs(os.fspath(run_dir), exist_ok=True)
    with atomic_open(path, "w") as f:
        json.dump(settings, f, indent=1)


def generate_missing(generator: Callable, captions: Sequence[str], guidance_scales: Sequence[float], run_dir,
                     seed: int = 0, batch_size: int = 4, progress: bool = True, meta: Optional[dict] = None) -> int:
    """Write every missing `<run_dir>/g<scale>/<k:05d>.png`; caption k uses seed + k at every scale.
    Returns the number of images generated."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    todo = []
    for g in guidance_scales:
        folder = scale_dir(run_dir, g)
        todo.append((g, folder, [k for k in range(len(captions)) if not os.path.exists(image_path(folder, k))]))
    total = sum(len(m) for _, _, m in todo)
    kept = len(captions) * len(guidance_scales) - total
    if kept:
        logger.info("%s: %d images exist and are kept, %d to generate", run_dir, kept, total)
    bar = None
    if progress and total:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="generating", unit="img")
    try:
        for g, folder, missing in todo:
            for chunk in _runs(missing, batch_size):
                images = generator([captions[k] for k in chunk], seed + chunk[0], float(g))
                for k, img in zip(chunk, images):
                    save_png(image_path(folder, k), img, {**(meta or {}), "caption": captions[k], "seed": seed + k,
                                                          "guidance_scale": g})
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return total


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------
def score_images(files: Sequence[str], captions: Sequence[str], inception, reference, clip_scorer=None,
                 batch_size: int = 50, progress: bool = True, desc: str = "scoring") -> dict:
    """FID of the image files against `reference` (a FrechetReference), and the mean CLIP score of
    image k against caption k (None without a scorer). Images are read one batch at a time."""
    if len(files) != len(captions):
        raise ValueError(f"{len(files)} images for {len(captions)} captions")
    stats, clip_sum = FeatureStats(), 0.0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc=desc, unit="img")
    try:
        for start in range(0, len(files), batch_size):
            images = [load_image(f) for f in files[start:start + batch_size]]
            for feats in inception_features(inception, images, batch_size):
                stats.update(feats)
            if clip_scorer is not None:
                clip_sum += float(clip_scorer.scores(images, captions[start:start + batch_size]).sum())
            if bar is not None:
                bar.update(len(images))
    finally:
        if bar is not None:
            bar.close()
    return {"fid": reference.distance(stats.mu, stats.sigma),
            "clip_score": clip_sum / len(files) if clip_scorer is not None else None, "num_images": len(files)}


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------
def update_results(output_dir, run: str, settings: dict, points: list[dict]) -> dict:
    """Put (replace) `run` in <output_dir>/results.json, keeping the other runs; returns all runs."""
    path = os.path.join(os.fspath(output_dir), RESULTS_JSON)
    results = {"runs": {}}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    results.setdefault("runs", {})[run] = {"settings": settings, "points": points}
    with atomic_open(path, "w") as f:
        json.dump(results, f, indent=1)
    return results


def write_table(output_dir, results: dict) -> str:
    """<output_dir>/results.csv from the results dict: one row per run and guidance scale."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for run, r in results["runs"].items():
        for p in r["points"]:
            w.writerow({"run": run, "family": r["settings"].get("family", ""), **{k: p.get(k) for k in CSV_FIELDS[2:]}})
    path = os.path.join(os.fspath(output_dir), RESULTS_CSV)
    with atomic_open(path, "w") as f:
        f.write(buf.getvalue())
    return path


def plot_runs(output_dir, results: dict) -> Optional[str]:
    """<output_dir>/fid_clip.png: FID against CLIP score, one line per run, points labelled with
    their guidance scale. Lower is better for FID, higher for CLIP score: the best trade-offs sit
    at the bottom right. Runs without CLIP scores are left out (None if none is left). Without
    matplotlib (requirements.txt) nothing is plotted: a warning says so and None is returned."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: no %s written (results.json / results.csv are); "
                       "`pip install 'matplotlib>=3.7,<4'` (requirements.txt), then rerun to plot", RESULTS_PLOT)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {run: [p for p in r["points"] if p.get("clip_score") is not None and p.get("fid") is not None]
            for run, r in results["runs"].items()}
    runs = {k: sorted(v, key=lambda p: p["guidance_scale"]) for k, v in runs.items() if v}
    if not runs:
        logger.warning("no run has both FID and CLIP score: no plot written")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
    for run, pts in runs.items():
        x, y = [p["clip_score"] for p in pts], [p["fid"] for p in pts]
        ax.plot(x, y, marker="o", label=run)
        for p in pts:
            ax.annotate(f"{p['guidance_scale']:g}", (p["clip_score"], p["fid"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
    ax.set_xlabel("CLIP score (higher is better)")
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("FID against CLIP score (point labels: guidance scale)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(os.fspath(output_dir), RESULTS_PLOT)
    with atomic_open(path) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


def reference_statistics(reference, inception, cache_dir, resolution: Optional[int] = None,
                         limit: Optional[int] = None, batch_size: int = 50, progress: bool = True):
    """(mu, sigma) of `reference`: a .npz (pytorch-fid / PaddleMIX / ours), or an image folder /
    LAION file list, whose statistics are computed once and cached in `cache_dir`."""
    from ldm.eval.fid import image_statistics, load_stats, save_stats
    from ldm.eval.images import count_images, iter_images

    reference = os.fspath(reference)
    if reference.endswith(".npz"):
        return load_stats(reference)
    tag = f"_{resolution}px" if resolution else ""
    cache = os.path.join(os.fspath(cache_dir), f"reference_{os.path.basename(os.path.normpath(reference))}{tag}"
                         f"{'_' + str(limit) if limit else ''}.npz")
    if os.path.exists(cache):
        logger.info("reference statistics from %s", cache)
        return load_stats(cache)
    stats = image_statistics(inception, iter_images(reference, resolution, limit), batch_size, progress,
                             total=count_images(reference, limit))
    save_stats(cache, stats.mu, stats.sigma, stats.n)
    logger.info("reference statistics of %d images -> %s", stats.n, cache)
    return stats.mu, stats.sigma


def scale_point(run_dir, guidance_scale: float, captions: Sequence[str], inception, reference, clip_scorer,
                batch_size: int, progress: bool) -> dict:
    folder = scale_dir(run_dir, guidance_scale)
    files = [image_path(folder, k) for k in range(len(captions))]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(f"{folder}: {len(missing)} images missing (first {missing[0]})")
    point = score_images(files, captions, inception, reference, clip_scorer, batch_size, progress,
                         desc=f"scoring g={guidance_scale:g}")
    return {"guidance_scale": float(guidance_scale), **point, "images": folder}

