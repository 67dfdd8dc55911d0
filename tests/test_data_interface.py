"""ldm.data's one interface: DatasetSpec -> build_dataset through the kind registry, one sample
schema, one collator, a new kind plugged in without touching the trainers."""
import collections

import numpy as np
import paddle
import pytest
from PIL import Image

import ldm.data.spec as spec_mod
from laion_fixtures import make_parts, write_filelist
from ldm.data import DatasetSpec, build_dataset, collate, dataset_kinds, register_dataset_kind
from ldm.data.folder import FolderDataset
from ldm.data.laion import LaionDataset
from ldm.data.transforms import normalize_pixels


def _folder(root, n=3):
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20 + 4 * i, 28, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"caption {i}")
    return str(root)


def _assert_same_samples(a, b, normalize="minus_one_one"):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y) == ["caption", "pixel_values"]
        assert x["caption"] == y["caption"]
        assert x["pixel_values"].dtype == np.uint8 and x["pixel_values"].shape[-1] == 3  # the schema: uint8 HWC
        xn, yn = normalize_pixels(x["pixel_values"], normalize), normalize_pixels(y["pixel_values"], normalize)
        assert xn.dtype == np.float32 and xn.ndim == 3
        np.testing.assert_array_equal(xn, yn)


@pytest.fixture
def scoped_registry(monkeypatch):
    """Registrations made in a test vanish after it."""
    monkeypatch.setattr(spec_mod, "_KINDS", dict(spec_mod._KINDS))


def test_builtin_kinds_registered():
    assert {"folder", "laion"} <= set(dataset_kinds())


# ----------------------------------------------------------------------------- same samples
@pytest.mark.parametrize("normalize", ["minus_one_one", "zero_one"])
def test_folder_kind_matches_constructor(tmp_path, normalize):
    root = _folder(tmp_path)
    spec = DatasetSpec("folder", root, resolution=(16, 12), normalize=normalize, random_flip=True, seed=5,
                       options={"skip_missing_captions": True, "verify_images": False})
    built = build_dataset(spec)
    direct = FolderDataset(root, resolution=(16, 12), normalize=normalize, random_flip=True, seed=5,
                           skip_missing_captions=True, verify_images=False)
    assert isinstance(built, FolderDataset)
    for epoch in (0, 3):  # set_epoch is part of the contract
        built.set_epoch(epoch)
        direct.set_epoch(epoch)
        _assert_same_samples([built[i] for i in range(len(built))], [direct[i] for i in range(len(direct))], normalize)
    assert normalize_pixels(built[0]["pixel_values"], normalize).shape == (3, 16, 12)


def test_laion_kind_matches_constructor_sharded(tmp_path):
    parts = make_parts(tmp_path / "parts", [3, 4, 2])
    fl = write_filelist(tmp_path / "d.filelist", parts)
    spec = DatasetSpec("laion", fl, resolution=8, random_flip=True, seed=3,
                       options={"infinite": False, "shuffle_buffer": 2})
    seen = collections.Counter()
    for rank in range(2):
        built = build_dataset(spec, rank=rank, world_size=2)
        direct = LaionDataset(fl, resolution=8, random_flip=True, seed=3, infinite=False, shuffle_buffer=2,
                              rank=rank, world_size=2)
        assert isinstance(built, LaionDataset)
        for w in range(2):
            a = list(built.iter_consumer(w, 2, epoch=1))
            _assert_same_samples(a, list(direct.iter_consumer(w, 2, epoch=1)))
            seen.update(s["caption"] for s in a)
    # exactly once over 2 ranks x 2 workers through the spec as well
    assert seen == collections.Counter(f"f{i}-r{j}" for i, n in enumerate([3, 4, 2]) for j in range(n))


def test_laion_normalize_zero_one(tmp_path):
    (part,) = make_parts(tmp_path / "parts", [2])
    kw = dict(resolution=8, seed=1, options={"infinite": False})
    a = list(iter(build_dataset(DatasetSpec("laion", part, **kw), rank=0, world_size=1)))
    b = list(iter(build_dataset(DatasetSpec("laion", part, normalize="zero_one", **kw), rank=0, world_size=1)))
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):  # the same uint8 pixels, normalised as each spec names
        x, y = normalize_pixels(x["pixel_values"], "minus_one_one"), normalize_pixels(y["pixel_values"], "zero_one")
        assert 0.0 <= y.min() and y.max() <= 1.0
        np.testing.assert_allclose((x + 1) / 2, y, atol=1e-6)


# ----------------------------------------------------------------------------- errors
def test_unknown_kind_names_it_and_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset kind 'tarballs'.*folder, laion"):
        build_dataset(DatasetSpec("tarballs", str(tmp_path)))


@pytest.mark.parametrize("kind", ["folder", "laion"])
def test_unknown_options_named(tmp_path, kind):
    root = _folder(tmp_path) if kind == "folder" else make_parts(tmp_path / "p", [1])[0]
    spec = DatasetSpec(kind, root, resolution=8, options={"skip_missing_caption": True, "zzz": 1})
    with pytest.raises(ValueError, match=rf"unknown option\(s\) 'skip_missing_caption', 'zzz' for dataset kind '{kind}'"):
        build_dataset(spec, rank=0, world_size=1)


def test_spec_validated_up_front(tmp_path):
    with pytest.raises(ValueError, match="normalize"):
        DatasetSpec("folder", str(tmp_path), normalize="imagenet")
    for bad in (0, -8, (8,) * 3, (8, 0), "256", True):
        with pytest.raises(ValueError, match="resolution"):
            DatasetSpec("folder", str(tmp_path), resolution=bad)
    with pytest.raises(ValueError, match="kind"):
        DatasetSpec("", str(tmp_path))
    with pytest.raises(ValueError, match="options"):
        DatasetSpec("folder", str(tmp_path), options=[("a", 1)])
    with pytest.raises(ValueError, match="square"):
        build_dataset(DatasetSpec("laion", make_parts(tmp_path / "p", [1])[0], resolution=(8, 16)), 0, 1)
    with pytest.raises(ValueError, match="DatasetSpec"):
        build_dataset({"kind": "folder"})


def test_spec_is_frozen_and_keeps_its_own_options(tmp_path):
    opts = {"verify_images": False}
    spec = DatasetSpec("folder", tmp_path, resolution=[16, 8], options=opts)
    opts["verify_images"] = True
    assert spec.options == {"verify_images": False} and spec.path == str(tmp_path)
    assert spec.resolution == (16, 8) and spec.size == (16, 8) and DatasetSpec("x", "p", 4).size == (4, 4)
    with pytest.raises(AttributeError):
        spec.kind = "laion"


# ----------------------------------------------------------------------------- plug-in kind
class _Squares(paddle.io.Dataset):
    def __init__(self, spec, n):
        h, w = spec.size
        self.n, self.h, self.w, self.epoch = n, h, w, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"pixel_values": np.full((3, self.h, self.w), i, np.float32), "caption": f"square {i}"}


def test_registered_kind_plugs_into_the_trainer_unchanged(tmp_path, scoped_registry):
    from paddlenlp.trainer import TrainingArguments

    from ldm.train.task import TrainingTask
    from ldm.train.trainer import DiffusionTrainer

    class Task(TrainingTask):
        def __init__(self):
            super().__init__()
            self.add_trained("net", paddle.nn.Linear(1, 1))

        def forward(self, pixel_values, caption):
            return self.net(pixel_values.mean().reshape([1, 1])).sum()

    def factory(spec, rank, world_size):
        return _Squares(spec, **spec_mod.check_options(spec, ("n",)))

    register_dataset_kind("squares", factory)
    register_dataset_kind("squares", factory)  # the same factory again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        register_dataset_kind("squares", lambda s, r, w: None)
    with pytest.raises(ValueError, match="not callable"):
        register_dataset_kind("other", "not a function")
    assert "squares" in dataset_kinds()

    ds = build_dataset(DatasetSpec("squares", "-", resolution=4, options={"n": 6}))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=3,
                             dataloader_num_workers=0, seed=1)
    trainer = DiffusionTrainer(model=Task(), args=args, train_dataset=ds)
    batches = list(trainer.get_train_dataloader())
    assert len(batches) == 2
    captions = sorted(c for b in batches for c in b["caption"])
    assert captions == [f"square {i}" for i in range(6)]
    for b in batches:
        pv = np.asarray(b["pixel_values"])
        assert pv.shape == (3, 3, 4, 4) and pv.dtype == np.float32
        assert [f"square {int(v)}" for v in pv[:, 0, 0, 0]] == b["caption"]  # rows stay with their captions


def test_factory_without_set_epoch_refused(scoped_registry):
    register_dataset_kind("plain", lambda spec, rank, world_size: [1, 2, 3])
    with pytest.raises(TypeError, match="'plain' built a list without set_epoch"):
        build_dataset(DatasetSpec("plain", "-"))


# ----------------------------------------------------------------------------- collate
def test_collate_stacks_pixels_keeps_captions():
    samples = [{"pixel_values": np.full((3, 2, 4), i, np.float32), "caption": f"c{i}", "step": np.int64(i)}
               for i in range(3)]
    out = collate(samples)
    assert out["pixel_values"].shape == (3, 3, 2, 4) and out["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(out["pixel_values"][:, 0, 0, 0], [0, 1, 2])
    assert out["caption"] == ["c0", "c1", "c2"]
    assert out["step"].tolist() == [0, 1, 2] and out["step"].dtype == np.int64
    assert collate([{"caption": np.str_("x")}])["caption"] == ["x"]  # numpy strings stay strings


def test_collate_errors_name_the_problem():
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
    a = {"pixel_values": np.zeros((3, 2, 2), np.float32), "caption": "a"}
    with pytest.raises(ValueError, match=r"sample 1 has keys \['pixel_values'\]"):
        collate([a, {"pixel_values": a["pixel_values"]}])
    with pytest.raises(ValueError, match=r"cannot stack 'pixel_values'.*\(3, 2, 2\).*\(3, 4, 4\)"):
        collate([a, {"pixel_values": np.zeros((3, 4, 4), np.float32), "caption": "b"}])
