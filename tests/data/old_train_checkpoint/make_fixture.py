"""Write `checkpoint-2/`: a Stage C training checkpoint made by the training code BEFORE the one
training task refactor (commit ec1deb9: `ldm/cascade/train_c.py`, PaddleNLP's pickled optimizer,
scheduler and RNG files, `param_names.json`), so tests/test_train_stage_c.py can check that such a
checkpoint still resumes. Run from a checkout of that commit:

    cd /path/to/checkout-at-ec1deb9 && OMP_NUM_THREADS=1 python /path/to/tests/data/old_train_checkpoint/make_fixture.py OUT_DIR

Two steps of the demo images at 64 px with a micro Stage C (MICRO_STAGE_C below, a few thousand
parameters; the other parts are the tiny preset), EMA and the adaptive loss weight on, so every
kind of state file is there; the checkpoint is copied to OUT_DIR/checkpoint-2.
"""
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.getcwd())  # the old checkout

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = os.path.join(HERE, "..", "..", "..", "assets", "demo_dataset")
MICRO_STAGE_C = dict(c_in=16, c_out=16, c_r=8, patch_size=1, c_cond=8, c_hidden=[8, 16], nhead=[1, 2],
                     blocks=[[1, 1], [1, 1]], block_repeat=[[1, 1], [1, 1]], level_config=["CT", "CTA"],
                     c_clip_text=32, c_clip_text_pooled=32, c_clip_img=32, c_clip_seq=2, kernel_size=3,
                     dropout=[0.0, 0.0], self_attn=True, t_conds=["sca", "crp"], switch_level=[False])
ARGV = ["--do_train", "--dataset_path", DEMO, "--model_version", "tiny", "--resolution", "64",
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--max_grad_norm", "0",
        "--logging_steps", "1", "--seed", "3", "--report_to", "none", "--disable_tqdm", "True",
        "--image_logging_steps", "0", "--use_ema", "True", "--ema_decay", "0.5", "--adaptive_loss_weight", "True",
        "--lr_scheduler_type", "linear", "--warmup_steps", "1", "--save_steps", "2"]


def main(out):
    import paddle

    from ldm.cascade.presets import tiny_components
    from ldm.cascade.stage_c import StageC
    from ldm.cascade.train_c import build_stage_c_trainer, parse_stage_c_args
    from ldm.utils import set_seed

    work = tempfile.mkdtemp()
    m, d, t = parse_stage_c_args(ARGV + ["--output_dir", work, "--max_steps", "2"])
    set_seed(t.seed)
    comps = tiny_components()
    paddle.seed(11)
    micro = StageC(**MICRO_STAGE_C)
    for p in micro.parameters():  # no zero-initialised output: every parameter gets a gradient
        p.set_value(paddle.randn(p.shape) * 0.1)
    comps.builders["stage_c"] = lambda: micro
    trainer, _, _ = build_stage_c_trainer(m, d, t, components=comps, config=MICRO_STAGE_C)
    trainer.train()
    os.makedirs(out, exist_ok=True)
    shutil.copytree(os.path.join(work, "checkpoint-2"), os.path.join(out, "checkpoint-2"))
    shutil.rmtree(work)


if __name__ == "__main__":
    main(sys.argv[1])
