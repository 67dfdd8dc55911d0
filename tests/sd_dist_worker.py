"""Worker for the SD 2-rank runs (test_sd_distributed.py through tests/two_rank_runs.py,
test_train_robust.py's resume): runs the SD trainer under paddle.distributed.launch, then writes this
rank's final UNet + text encoder weights (final_rank<k>.npz) and log history (history_rank<k>.json)."""
import importlib.util
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(argv):
    spec = importlib.util.spec_from_file_location("train", os.path.join(ROOT, "train_txt2img_laion400m_trainer.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    trainer = train.main(argv)
    rank = max(trainer.args.process_index, 0)
    state = {f"unet.{k}": v.numpy() for k, v in trainer.model.unet.state_dict().items()}
    state.update({f"text_encoder.{k}": v.numpy() for k, v in trainer.model.text_encoder.state_dict().items()})
    with open(os.path.join(trainer.args.output_dir, f"history_rank{rank}.json"), "w") as f:
        json.dump(trainer.state.log_history, f)
    np.savez(os.path.join(trainer.args.output_dir, f"final_rank{rank}.npz"), **state)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    from ldm.utils import skip_unused_torch

    skip_unused_torch()  # as every entry point does: the ranks import ppdiffusers
    run(sys.argv[1:])
