"""The SD training step owns caption handling (ldm.data yields raw captions): it drops captions with
its own seeded generator (--caption_drop_prob), tokenizes them, and the caption record shows what
it trained on. Moved here from the LAION dataset tests, same numbers."""
import json

import numpy as np
import paddle
import pytest

from ldm.train.sd import SDTask


class _FakeTokenizer:
    """ids = the characters' code points, padded with 0 to model_max_length (as the old dataset test)."""

    model_max_length = 6

    def __call__(self, texts, padding, max_length, truncation, return_tensors):
        assert (padding, truncation, max_length, return_tensors) == ("max_length", True, 6, "np")
        rows = [([ord(c) for c in t] + [0] * max_length)[:max_length] for t in texts]
        return type("Encoding", (), {"input_ids": np.asarray(rows)})()


@pytest.fixture(scope="module")
def parts():
    from ppdiffusers import AutoencoderKL, UNet2DConditionModel
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModel
    from sd_tiny import TINY_CLIP, TINY_UNET, TINY_VAE

    paddle.seed(0)
    return UNet2DConditionModel(**TINY_UNET), AutoencoderKL(**TINY_VAE), CLIPTextModel(CLIPTextConfig(**TINY_CLIP))


def _model(parts, tokenizer=None, **kw):
    return SDTask(*parts, tokenizer=tokenizer or _FakeTokenizer(), **kw)


def test_step_tokenizes_captions(parts):
    model = _model(parts)
    captions = ["f0-r0", "f0-r1", "ab"]
    ids = model.tokenize(captions)
    assert ids.dtype == paddle.int64 and tuple(ids.shape) == (3, 6)
    assert ids.numpy()[0].tolist() == [ord(c) for c in captions[0]] + [0]
    assert ids.numpy()[2].tolist() == [97, 98, 0, 0, 0, 0]


def test_step_tokenizes_with_the_clip_tokenizer(parts, tmp_path):
    from sd_tiny import write_tokenizer

    from ldm.sd.loading import load_tokenizer

    write_tokenizer(str(tmp_path / "tok"))
    tok = load_tokenizer(str(tmp_path / "tok"), 16)
    ids = _model(parts, tok).tokenize(["record 001", ""])
    assert tuple(ids.shape) == (2, 16) and ids.dtype == paddle.int64
    for row, caption in zip(ids.numpy(), ["record 001", ""]):
        want = tok(caption, padding="max_length", truncation=True, max_length=16)["input_ids"]
        assert row.tolist() == list(want)


def test_caption_dropout_all_and_range(parts):
    model = _model(parts, caption_dropout=1.0)
    assert model.drop_captions([f"f0-r{j}" for j in range(4)]) == [""] * 4
    assert _model(parts, caption_dropout=0.0).drop_captions(["a", "b"]) == ["a", "b"]
    with pytest.raises(ValueError, match="caption_dropout"):
        _model(parts, caption_dropout=1.5)


def test_caption_dropout_rate_and_determinism(parts):
    captions = [f"c{i}" for i in range(20000)]
    a = _model(parts, caption_dropout=0.1, seed=7, rank=0)
    kept = a.drop_captions(captions)
    rate = sum(k == "" for k in kept) / len(captions)
    assert abs(rate - 0.1) < 0.01, rate  # binomial sd 0.002
    assert all(k in ("", c) for k, c in zip(kept, captions))
    # the same (seed, rank) replays the same draws; another rank or seed draws differently
    assert _model(parts, caption_dropout=0.1, seed=7, rank=0).drop_captions(captions) == kept
    assert _model(parts, caption_dropout=0.1, seed=7, rank=1).drop_captions(captions) != kept
    assert _model(parts, caption_dropout=0.1, seed=8, rank=0).drop_captions(captions) != kept


def test_train_state_round_trip_continues_the_stream(parts):
    captions = [f"c{i}" for i in range(64)]
    a = _model(parts, caption_dropout=0.5, seed=3)
    a.drop_captions(captions)
    state = json.loads(json.dumps(a.train_state()))  # JSON, as the checkpoint stores it
    want = a.drop_captions(captions)
    b = _model(parts, caption_dropout=0.5, seed=3)
    b.set_train_state(state)
    assert b.drop_captions(captions) == want


def test_forward_drops_before_encoding_and_reports_what_it_saw(parts):
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.uniform(-1, 1, (2, 3, 16, 16)).astype("float32"))
    dropped = _model(parts, caption_dropout=1.0)
    paddle.seed(5)
    loss_dropped = float(dropped(pixel_values=x, caption=["a red cube", "a blue ball"]))
    assert dropped.last_captions == ["", ""]
    plain = _model(parts, caption_dropout=0.0)
    paddle.seed(5)
    loss_empty = float(plain(pixel_values=x, caption=["", ""]))
    assert loss_dropped == loss_empty
    with pytest.raises(ValueError, match="2 captions for 1 images"):
        plain(pixel_values=x[:1], caption=["a", "b"])
    with pytest.raises(ValueError, match="tokenizer"):
        SDTask(*parts)(pixel_values=x, caption=["a", "b"])


def test_caption_record_shows_the_captions_the_step_saw(tmp_path):
    from paddlenlp.trainer import TrainingArguments

    from ldm.train.task import TrainingTask
    from ldm.train.trainer import DiffusionTrainer

    class Step(TrainingTask):
        def __init__(self):
            super().__init__()
            self.add_trained("net", paddle.nn.Linear(1, 1))

        def forward(self, pixel_values, caption):
            self.last_captions = ["" if i % 2 else c for i, c in enumerate(caption)]  # "drops" every second one
            return self.net(pixel_values.mean().reshape([1, 1])).sum()

    args = TrainingArguments(output_dir=str(tmp_path / "out"))
    args.record_log_dir = str(tmp_path / "records")
    trainer = DiffusionTrainer(model=Step(), args=args)
    batch = {"pixel_values": paddle.ones([3, 3, 2, 2]), "caption": ["a", "b", "c"]}
    trainer.compute_loss(trainer.model, batch)
    assert (tmp_path / "records" / "rank0.txt").read_text().splitlines() == ["a", "", "c"]
