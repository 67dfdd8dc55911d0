"""Evaluation of text-to-image models: FID and CLIP score over guidance scales.

- `inception.py`: the FID InceptionV3 (pytorch-fid's, pool3 2048-d) in Paddle, its key table
  (pytorch-fid .pth / PaddleMIX .pdparams / ours) and `load_inception`.
- `fid.py`: streamed feature statistics (`FeatureStats`), `.npz` statistics files (pytorch-fid and
  PaddleMIX compatible), `frechet_distance`, `inception_features` / `image_statistics`.
- `clip_score.py`: `ClipScorer` over the project's CLIP towers (ldm.clip): 100 * max(cos, 0).
- `images.py`: image folders and LAION file lists, one image at a time.
- `generators.py`: SD and Stable Cascade generators with one call signature.
- `sweep.py`: captions, resumable generation per guidance scale, scoring, results table and plot.
- `online.py`: `OnlineEvaluation`, the same metrics during training, sampling shared over
  data-parallel ranks and features gathered.

Command lines: scripts/fid_stats.py, scripts/evaluate.py; weight conversion:
scripts/convert_other_weight.py --inception. Submodules are imported on demand (this package
imports nothing, so comparing two .npz files does not load Paddle).
"""
