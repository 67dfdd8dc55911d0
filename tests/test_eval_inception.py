"""The FID Inception against pytorch-fid (PyPI `pytorch-fid`, test-only) on the same random weights.

pytorch-fid downloads its weights at run time; here `load_state_dict_from_url` returns a random
state dict in the layout of `pt_inception-2015-12-05-6726825d.pth` (torchvision Inception3 names,
BN running statistics and num_batches_tracked, the 1008-way fc), written with torch.save and
converted by scripts/convert_other_weight.py --inception. Also: PaddleMIX's .pdparams layout
(checked against paddle.vision's InceptionV3 names), strict loading, and scripts/fid_stats.py
against pytorch-fid's statistics of the same image files."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")
pfi = pytest.importorskip("pytorch_fid.inception")
fid_score = pytest.importorskip("pytorch_fid.fid_score")

import paddle  # noqa: E402
from PIL import Image  # noqa: E402

from ldm.eval.inception import FEATURE_DIM, InceptionV3, load_inception  # noqa: E402
from ldm.weights import WeightsError, load_state_dict, save_safetensors  # noqa: E402
from scripts import fid_stats  # noqa: E402
from scripts.convert_other_weight import main as convert_main  # noqa: E402

REL_TOL = 1e-4


def _torch_name(ours: str) -> str:
    return ours.replace(".bn._mean", ".bn.running_mean").replace(".bn._variance", ".bn.running_var")


def random_fid_state_dict(seed: int = 0) -> dict:
    """pytorch-fid's weight-file layout with random values that keep activations O(1)."""
    with paddle.LazyGuard():
        shapes = {k: tuple(v.shape) for k, v in InceptionV3().state_dict().items()}
    rng = np.random.default_rng(seed)
    sd = {}
    for k, s in shapes.items():
        if k.endswith("conv.weight"):
            v = rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[1:]))
        elif k.endswith(("bn.weight", "bn._variance")):
            v = rng.uniform(0.5, 1.5, s)
        else:  # bn.bias, bn._mean
            v = rng.normal(0.0, 0.2, s)
        sd[_torch_name(k)] = torch.from_numpy(v.astype(np.float32))
        if k.endswith("bn._variance"):
            sd[_torch_name(k).replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    sd["fc.weight"] = torch.from_numpy(rng.standard_normal((1008, FEATURE_DIM)).astype(np.float32))
    sd["fc.bias"] = torch.zeros(1008)
    return sd


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("inception")
    pth = str(d / "pt_inception-2015-12-05-6726825d.pth")
    torch.save(random_fid_state_dict(), pth)
    done = convert_main(["--inception", pth, "--output_dir", str(d)])
    return pth, done["inception"][0]


@pytest.fixture(scope="module")
def reference(weights, monkeypatch_module):
    pth = weights[0]
    monkeypatch_module.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: torch.load(pth, weights_only=True))
    return pfi.InceptionV3([3]).eval()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def model(weights):
    return load_inception(weights[1])


def _rel(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("hw", [(64, 64), (240, 320)])
def test_features_match_pytorch_fid(model, reference, hw):
    x = np.random.default_rng(hw[0]).uniform(0, 1, (2, 3, *hw)).astype(np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x))[0].squeeze(3).squeeze(2).numpy()  # (2, 2048), resized inside
    with paddle.no_grad():
        got = model(paddle.to_tensor(x)).numpy()
    assert got.shape == want.shape == (2, FEATURE_DIM)
    assert want.std() > 0.1 and np.abs(want[0] - want[1]).max() > 0.1  # non-degenerate random network
    rel = _rel(got, want)
    print(f"Inception pool3 {hw}: max |paddle - pytorch-fid| / max |pytorch-fid| = {rel:.2e}")
    assert rel <= REL_TOL


def test_converted_file_and_loading_are_strict(weights, tmp_path):
    pth, st = weights
    state = load_state_dict(st)
    src = torch.load(pth, weights_only=True)
    assert len(state) == len([k for k in src if not k.startswith("fc.") and "num_batches" not in k]) == 470
    np.testing.assert_array_equal(state["Mixed_7c.branch_pool.bn._variance"],
                                  src["Mixed_7c.branch_pool.bn.running_var"].numpy())
    del state["Mixed_6b.branch7x7_2.conv.weight"]
    bad = str(tmp_path / "bad.safetensors")
    save_safetensors(state, bad)
    with pytest.raises(WeightsError, match="1 missing"):
        load_inception(bad)
    with pytest.raises(WeightsError, match="torch pickle is not read"):
        load_inception(pth)


def _paddlemix_name(ours: str) -> str:
    mixed = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
             "Mixed_7a", "Mixed_7b", "Mixed_7c"]
    block, rest = ours.split(".", 1)
    layer, param = rest.rsplit(".", 1)
    seq = {"conv": "0", "bn": "1"}
    if block.startswith("Conv2d_"):
        return f"inception_stem.conv_{block[len('Conv2d_'):]}.{seq[layer]}.{param}"
    branch, part = layer.rsplit(".", 1)
    branch = "branch_pool_conv" if branch == "branch_pool" else branch
    return f"inception_block_list.{mixed.index(block)}.{branch}.{seq[part]}.{param}"


def test_paddlemix_pdparams(weights, model, tmp_path):
    """PaddleMIX's pp_inception .pdparams holds paddle.vision InceptionV3 names (its FID blocks keep
    them): our table maps exactly that key set (minus the classifier), and the file loads to the
    same weights."""
    with paddle.LazyGuard():
        vision = paddle.vision.models.inception_v3(num_classes=1008, with_pool=True)
    want = {k: tuple(v.shape) for k, v in vision.state_dict().items()}
    ours = load_state_dict(weights[1])
    mapped = {_paddlemix_name(k): v for k, v in ours.items()}
    assert {k: v.shape for k, v in mapped.items()} == {k: s for k, s in want.items() if not k.startswith("fc.")}
    mapped["fc.weight"] = np.zeros(want["fc.weight"], np.float32)
    mapped["fc.bias"] = np.zeros(want["fc.bias"], np.float32)
    pd = str(tmp_path / "pp_inception-2015-12-05-6726825d.pdparams")
    paddle.save(mapped, pd)
    loaded = load_inception(pd)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[k].numpy(), v.numpy())


def test_fid_stats_script_matches_pytorch_fid(weights, reference, tmp_path):
    """scripts/fid_stats.py on a folder of PNGs = pytorch-fid's calculate_activation_statistics on
    the same files (image reading, ToTensor, resize, features, mean and covariance)."""
    rng = np.random.default_rng(5)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = str(tmp_path / "ours.npz")
    fid_stats.main(["--images", str(folder), "--inception", weights[1], "--output", out, "--batch_size", "3",
                    "--no_progress"])
    files = sorted(str(p) for p in folder.glob("*.png"))
    mu, sigma = fid_score.calculate_activation_statistics(files, reference, batch_size=4, device="cpu",
                                                          num_workers=0)
    with np.load(out) as f:
        assert int(f["num_images"]) == 4
        rel_mu, rel_sigma = _rel(f["mu"], mu), _rel(f["sigma"], sigma)
    print(f"fid_stats vs pytorch-fid: mu {rel_mu:.2e}, sigma {rel_sigma:.2e} (relative to the largest entry)")
    assert rel_mu <= REL_TOL and rel_sigma <= REL_TOL


def test_fid_stats_compare_prints_fid(tmp_path, capsys):
    rng = np.random.default_rng(6)
    paths = []
    for i in range(2):
        feats = rng.standard_normal((40, 16)) * (i + 1) + i
        paths.append(str(tmp_path / f"{i}.npz"))
        np.savez_compressed(paths[-1], mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))  # pytorch-fid's format
    res = fid_stats.main(["--compare", *paths])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (m1, s1), (m2, s2) = [(np.load(p)["mu"], np.load(p)["sigma"]) for p in paths]
    want = fid_score.calculate_frechet_distance(m1, s1, m2, s2)
    assert last["fid"] == res["fid"] and abs(res["fid"] - want) <= 1e-6 * abs(want)
