"""Training-time evaluation under 2-process data parallel (gloo, CPU; issue 13 item 3): a job of
the shared launch of tests/two_rank_runs.py (`prepare` writes the files, `worker` runs on both
ranks): the tiny Stage C recipe (`train_stage_c_trainer.main`, 2 steps) with
`--eval_steps 2 --eval_captions ... --eval_num_images 3 --eval_guidance_scales 1 4`. Every call of
the recipe's sampling hook is recorded per rank. After training, rank 0 scores the same weights in
one process (a fresh OnlineEvaluation built from the files, world size 1). The test checks that
generation was shared (rank 0 sampled caption 0, rank 1 captions 1 and 2, each from seed + k, at
every scale; nothing twice), that both ranks got the same metrics, and that the FID / CLIP score
logged to VisualDL at step 2 equal the 1-process evaluation.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED, SCALES, NUM_IMAGES = 7, (1.0, 4.0), 3


def _files(d):
    """Tiny CLIP towers, a random-weight FID Inception, reference statistics, 4 captions."""
    import paddle

    from ldm.clip import make_tiny_clip_text, make_tiny_clip_vision
    from ldm.eval.clip_score import CLIP_TEXT_SUBDIR, CLIP_VISION_SUBDIR
    from ldm.eval.fid import save_stats
    from ldm.eval.inception import MODEL_NAME, InceptionV3
    from ldm.weights import save_safetensors, weights_metadata

    make_tiny_clip_text(os.path.join(d, "clip", CLIP_TEXT_SUBDIR))
    make_tiny_clip_vision(os.path.join(d, "clip", CLIP_VISION_SUBDIR))
    paddle.seed(0)
    save_safetensors(InceptionV3().initialize_weights().state_dict(), os.path.join(d, "inception.safetensors"),
                     metadata=weights_metadata(MODEL_NAME))
    feats = np.random.default_rng(0).standard_normal((30, 2048)) + 5.0
    save_stats(os.path.join(d, "ref.npz"), feats.mean(0), np.cov(feats, rowvar=False))
    with open(os.path.join(d, "captions.txt"), "w", encoding="utf-8") as f:
        f.write("a red circle\na blue square\na green triangle\nunused\n")


def _eval_flags(d):
    return ["--eval_steps", "2", "--eval_captions", os.path.join(d, "captions.txt"),
            "--eval_reference", os.path.join(d, "ref.npz"), "--eval_num_images", str(NUM_IMAGES),
            "--eval_inception", os.path.join(d, "inception.safetensors"), "--eval_clip_dir", os.path.join(d, "clip"),
            "--per_device_eval_batch_size", "2", "--eval_guidance_scales", *[f"{g:g}" for g in SCALES]]


def worker(d):
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import paddle

    import train_stage_c_trainer as script
    from ldm.eval.clip_score import ClipScorer
    from ldm.eval.inception import load_inception
    from ldm.eval.online import OnlineEvaluation
    from ldm.train.callbacks import EvaluationCallback
    from ldm.train.stage_c import StageCTask
    from test_train_stage_c import tiny_argv

    calls = []
    real = StageCTask.sample_images

    def recording(self, captions, seed, guidance_scale, **kwargs):
        calls.append([list(captions), int(seed), float(guidance_scale)])
        return real(self, captions, seed, guidance_scale, **kwargs)

    StageCTask.sample_images = recording
    try:
        trainer = script.main(tiny_argv(os.path.join(d, "train"), "--max_steps", "2", "--seed", str(SEED),
                                        "--num_inference_steps", "2", "--report_to", "visualdl", *_eval_flags(d)))
    finally:  # the next job of the launch samples unrecorded
        StageCTask.sample_images = real
    rank = paddle.distributed.get_rank()
    (cb,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, EvaluationCallback)]
    params = trainer.model.stage_c.state_dict()
    digest = float(sum(np.abs(v.numpy()).astype("float64").sum() for v in params.values()))
    result = {"history": cb.history, "calls": calls, "world": paddle.distributed.get_world_size(), "digest": digest}
    if rank == 0:  # the same weights, scored in one process by an evaluation built afresh from the files
        single = OnlineEvaluation(os.path.join(d, "captions.txt"), os.path.join(d, "ref.npz"),
                                  load_inception(os.path.join(d, "inception.safetensors")),
                                  ClipScorer.from_dir(os.path.join(d, "clip")), NUM_IMAGES, SCALES, seed=SEED,
                                  batch_size=NUM_IMAGES)
        model = trainer.model
        with model.evaluating(cb.ema):
            result["single"] = single.run(lambda c, s, g: real(model, c, s, g, **cb.sample_kwargs),
                                          rank=0, world_size=1)
    with open(os.path.join(d, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(result, f)


def prepare(folder):  # the two_rank_runs job: its files, the worker's arguments
    _files(folder)
    return [folder]


@pytest.mark.slow
def test_two_process_training_evaluation(two_rank_runs):
    from test_eval_training import _scalars

    tmp_path = Path(two_rank_runs["eval_training"])
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["digest"] == r1["digest"]  # data parallel: both ranks hold the same weights
    captions = (tmp_path / "captions.txt").read_text().splitlines()
    # generation shared: rank 0 caption 0, rank 1 captions 1-2 (one call of 2), caption k from seed + k
    assert r0["calls"] == [[captions[:1], SEED, g] for g in SCALES]
    assert r1["calls"] == [[captions[1:3], SEED + 1, g] for g in SCALES]
    # both ranks computed the same metrics from all 3 images, at step 2
    assert [s for s, _ in r0["history"]] == [s for s, _ in r1["history"]] == [2]
    m0, m1 = r0["history"][0][1], r1["history"][0][1]
    assert sorted(m0) == sorted(f"eval/{k}_g{g:g}" for k in ("fid", "clip_score") for g in SCALES)
    assert m1 == pytest.approx(m0, rel=1e-6)
    # ... equal to one process scoring the same weights, and that is what rank 0 logged to VisualDL
    single = r0["single"]
    assert sorted(single) == sorted(m0)
    for tag in m0:
        assert m0[tag] == pytest.approx(single[tag], rel=1e-5), tag
    assert m0["eval/fid_g1"] != m0["eval/fid_g4"]
    logged = _scalars(tmp_path / "train")
    assert sorted(logged) == sorted(m0)
    for tag, points in logged.items():
        assert [s for s, _ in points] == [2]
        assert points[0][1] == pytest.approx(single[tag], rel=1e-5), tag
