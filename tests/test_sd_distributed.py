"""2-process CPU data parallel (gloo) under `python -m paddle.distributed.launch --nproc_per_node 2`
(the shared launch of tests/two_rank_runs.py): each rank trains on its own shard (disjoint records)
and both end with identical weights (UNet and the text encoder, trained here with its own learning
rate)."""
from pathlib import Path

import numpy as np
import pytest

N_RECORDS = 12


def prepare(folder):
    """The two_rank_runs job's folder: tiny SD components, 12 records in LAION part files."""
    import create_pretraining_data as prep
    from sd_tiny import build_tiny_sd, write_images_jsonl

    tmp_path = Path(folder)
    build_tiny_sd(tmp_path / "m")
    jsonl = write_images_jsonl(str(tmp_path / "img"), n=N_RECORDS)
    assert prep.main(["--input_path", jsonl, "--output_path", str(tmp_path / "data"), "--per_part_file_num", "4",
                      "--num_workers", "0"]) == 0
    return [folder]


def worker(folder):
    """One rank (tests/two_rank_runs.py): 2 ranks x batch 2 x 3 steps = 12 samples = exactly one pass
    over the 12 records."""
    from sd_dist_worker import run

    tmp_path = Path(folder)
    out, records = tmp_path / "out", tmp_path / "records"
    run(["--do_train", "--output_dir", str(out), "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
         "--max_steps", "3", "--lr_scheduler_type", "constant", "--image_logging_steps", "0", "--logging_steps", "1",
         "--resolution", "16", "--save_steps", "3", "--seed", "23", "--dataloader_num_workers", "0",
         "--pretrained_model_name_or_path", str(tmp_path / "m"),
         "--unet_name_or_path", str(tmp_path / "m" / "unet_config.json"),
         "--file_list", str(tmp_path / "data" / "filelist" / "custom_dataset.filelist.list"),
         "--model_max_length", "16", "--max_grad_norm", "-1", "--disable_tqdm", "True", "--caption_drop_prob", "0",
         "--recompute", "1", "--use_ema", "1", "--record_log_dir", str(records),
         "--train_text_encoder", "True", "--text_encoder_learning_rate", "1e-3"])


@pytest.mark.slow
def test_two_process_data_parallel(two_rank_runs):
    tmp_path = Path(two_rank_runs["sd_dp"])
    out, records = tmp_path / "out", tmp_path / "records"
    seen = {r: (records / f"rank{r}.txt").read_text().splitlines() for r in (0, 1)}
    assert len(seen[0]) == len(seen[1]) == 6, seen
    assert set(seen[0]).isdisjoint(seen[1]), seen
    assert set(seen[0]) | set(seen[1]) == {f"record {i:03d}" for i in range(N_RECORDS)}

    w0, w1 = np.load(out / "final_rank0.npz"), np.load(out / "final_rank1.npz")
    assert sorted(w0.files) == sorted(w1.files) and len(w0.files) > 100
    for k in w0.files:
        np.testing.assert_array_equal(w0[k], w1[k], err_msg=k)
    # identical weights are meaningful only if the run trained: every step had a non-zero gradient
    import json

    hist = json.loads((out / "history_rank0.json").read_text())
    norms = [h["grad_norm"] for h in hist if "grad_norm" in h]
    assert len(norms) == 3 and min(norms) > 0, hist
    assert (out / "checkpoint-3" / "checkpoint_complete.json").is_file()
    assert (out / "checkpoint-3" / "unet_ema" / "diffusion_paddle_model.safetensors").is_file()
    # the trained text encoder is saved (only_save_updated_model) and both ranks moved it identically
    assert (out / "checkpoint-3" / "text_encoder" / "config.json").is_file()
    assert any(k.startswith("text_encoder.") for k in w0.files)
    from ppdiffusers.transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(str(out / "checkpoint-3" / "text_encoder"))
    k = "text_model.encoder.layers.0.mlp.fc1.weight"
    np.testing.assert_array_equal(te.state_dict()[k].numpy(), w0[f"text_encoder.{k}"])
    from ldm.sd.loading import load_text_encoder

    original = load_text_encoder(str(tmp_path / "m" / "text_encoder")).state_dict()[k].numpy()
    assert np.abs(original - w0[f"text_encoder.{k}"]).max() > 1e-5  # it was trained
