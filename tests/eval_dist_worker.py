"""Worker of tests/test_eval_online.py's 2-process run (a job of tests/two_rank_runs.py):
OnlineEvaluation under paddle.distributed.launch (gloo on CPU); writes rank<k>.json with the metrics and the calls."""
import json
import os
import sys

import paddle
import paddle.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_eval_online import CAPTIONS, FakeGenerator, LengthScorer, TinyFeatures, reference_stats  # noqa: E402

from ldm.eval.online import OnlineEvaluation  # noqa: E402


def main(out_dir):
    dist.init_parallel_env()
    paddle.seed(0)
    gen = FakeGenerator()
    ev = OnlineEvaluation(CAPTIONS, reference_stats(), TinyFeatures().eval(), LengthScorer(), num_images=len(CAPTIONS),
                          guidance_scales=[1.0, 4.0], seed=10, batch_size=3)
    res = ev.run(gen)
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"metrics": res, "calls": [[c, s, g] for c, s, g in gen.calls],
                   "world": dist.get_world_size()}, f)


if __name__ == "__main__":
    main(sys.argv[1])
