"""The CLIP BPE tokenizer, rebuilt offline from OpenAI's merges file (tests/data, from the
open_clip_torch wheel), loaded the way ModelC loads it (`ldm.clip.load_tokenizer`), gives
the same ids as transformers' CLIPTokenizer on tricky captions, including truncation and padding
to 77. Also the tiny offline tokenizer used by the tiny presets."""
import hashlib
import json
import os

import pytest

from ldm.clip import load_tokenizer, write_clip_bpe_tokenizer, write_tiny_clip_tokenizer

BPE = os.path.join(os.path.dirname(__file__), "data", "bpe_simple_vocab_16e6.txt.gz")
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"

CAPTIONS = [
    "a photo of a cat",
    "",
    "   A  Beauty   girl in WINTER,   snow!!! ",
    "Café déjà vu: naïve façade, Ångström & Øresund — “quotes” ‘single’ …",
    "emoji 🐱🐶🚀👩‍👩‍👧 ❤️ ✨ and flags 🇯🇵",
    "中文提示词：一只可爱的猫，日本語のテキスト、한국어 텍스트",
    "numbers 3.14159, 1,000,000 and 2024-02-13 at 10:30pm; 42nd #1 @home $5 50% x^2",
    "punctuation... (brackets) [square] {curly} <angle> 'quote' \"double\" don't it's we're I'll",
    "Ελληνικά κείμενο, русский текст, עִברִית, العربية",
    "tabs\tand\nnewlines\r\nmixed   whitespace",
    " ".join(f"word{i} with some-hyphenated_tokens" for i in range(40)),  # far more than 77 tokens
]


@pytest.fixture(scope="module")
def real_tok_dir(tmp_path_factory):
    with open(BPE, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == BPE_SHA256
    d = tmp_path_factory.mktemp("clip_tok")
    assert write_clip_bpe_tokenizer(BPE, d) == 49408
    return d


def test_vocab_rebuilt_exactly(real_tok_dir):
    with open(real_tok_dir / "vocab.json", encoding="utf-8") as f:
        vocab = json.load(f)
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["photo</w>"] == 1125
    with open(real_tok_dir / "merges.txt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + 48894


def test_ids_match_transformers(real_tok_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.CLIPTokenizer(str(real_tok_dir / "vocab.json"), str(real_tok_dir / "merges.txt"),
                                     model_max_length=77)
    ours = load_tokenizer(real_tok_dir)
    assert ours.model_max_length == 77
    want = ref(CAPTIONS, truncation=True, padding="max_length", max_length=77)["input_ids"]
    got = ours(CAPTIONS, truncation=True, padding="max_length", max_length=ours.model_max_length)["input_ids"]
    assert got[0][:7] == [49406, 320, 1125, 539, 320, 2368, 49407]  # known CLIP ids for "a photo of a cat"
    assert all(len(row) == 77 for row in got)
    for caption, g, w in zip(CAPTIONS, got, want):
        assert g == w, caption
    assert got[-1][-1] == 49407 and 49407 not in got[-1][1:-1]  # truncated, eos kept last
    assert got[1][:3] == [49406, 49407, 49407]  # empty caption: bos, eos, padding
    # untruncated ids agree too
    for caption in CAPTIONS:
        assert ours(caption)["input_ids"] == ref(caption)["input_ids"], caption


def test_tiny_tokenizer_offline(tmp_path):
    n = write_tiny_clip_tokenizer(tmp_path)
    assert n == 514
    tok = load_tokenizer(tmp_path)
    ids = tok(["a cat", "x" * 200], truncation=True, padding="max_length", max_length=77)["input_ids"]
    assert ids[0][:5] == [512, 320, 66, 64, 339] and ids[0][5:] == [513] * 72
    assert len(ids[1]) == 77 and ids[1][-1] == 513
    transformers = pytest.importorskip("transformers")
    ref = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert ref(["a cat"])["input_ids"][0] == ids[0][:6]
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
