"""The recipes under examples/ run end to end at toy size: random-init stand-ins for the published
weights (a tiny guided-diffusion checkpoint converted with ``fiber-plugins convert adm``, a tiny
DINOv2 folder, small timm networks), a few photos, a few steps. Each recipe's missing weights are
one line and exit code 2."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers", reason="transformers not installed (extra 'hf')")
pytest.importorskip("timm", reason="timm not installed (extra 'timm')")
pytest.importorskip("deepinv", reason="deepinv builds the tiny ADM checkpoint")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FAST = ["-n", "2", "--steps", "3", "--inner-steps", "1", "--device", "cpu"]


def recipe(name: str):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def _photos(folder: Path, count: int, side: int, offset: int = 0) -> Path:
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    images = load_sample_images().images
    for i in range(count):
        img = images[(i + offset) % 2]
        top, left = 40 * (i + offset) % 300, 60 * (i + offset) % 500
        Image.fromarray(np.ascontiguousarray(img[top : top + side, left : left + side])).save(
            folder / f"img{i:02d}.png"
        )
    return folder


def _timm_weights(path: Path, arch: str, **kw) -> Path:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file(timm.create_model(arch, pretrained=False, **kw).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Stand-ins for the published weights, built once for the module."""
    from fiber_plugins.cli.main import main
    from tests.adapters.test_hf import save_tiny
    from tests.priors.test_adm import _flags, small_checkpoint

    root = tmp_path_factory.mktemp("recipes")
    ckpt, _, _ = small_checkpoint(root, "uncond")
    prior = root / "adm"
    assert main(["convert", "adm", str(ckpt), str(prior), *_flags("uncond")]) == 0
    return {
        "root": root,
        "prior": prior,
        "dinov2": save_tiny(root / "dinov2", "dinov2"),
        "resnet": _timm_weights(root / "resnet10t.safetensors", "resnet10t"),
        "refs": _photos(root / "refs", 2, 48),
        "pool": _photos(root / "pool", 6, 40, offset=3),
    }


def _common(toy, out: Path) -> list[str]:
    return ["--prior", str(toy["prior"]), *FAST, "--out", str(out)]


def test_imagenet_fibers(toy, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "--references", str(toy["refs"]), "--pool", str(toy["pool"]),
        "--dinov2", str(toy["dinov2"]),
        "--resnet50", str(toy["resnet"]), "--resnet50-arch", "resnet10t",
        *_common(toy, out),
    ]  # fmt: skip
    assert recipe("imagenet_fibers").main(args) == 0, capsys.readouterr().err
    rows = json.loads((out / "table.json").read_text())
    assert [r["subject"] for r in rows] == ["dinov2", "resnet50"]
    for row in rows:
        assert row["references"] == 2 and row["samples"] == 4
        for key in ("NDTM", "nearest neighbour", "augmentation"):
            assert np.isfinite(row[key]) and row[key] >= 0
        run = out / row["subject"]
        assert (run / "report.html").exists() and (run / "samples.safetensors").exists()
        ev = json.loads((run / "evaluation.json").read_text())
        assert len(ev["nearest_neighbour"]) == 2  # the pool was searched for each reference
    assert "| dinov2 | ImageNet | 2 | 4 |" in (out / "table.md").read_text()


def test_imagenet_fibers_missing_weights_is_one_line(toy, tmp_path, capsys):
    args = ["--references", str(toy["refs"]), "--dinov2", str(tmp_path / "nope"),
            *_common(toy, tmp_path / "run")]  # fmt: skip
    assert recipe("imagenet_fibers").main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "huggingface-cli download facebook/dinov2-base" in err
    assert not (tmp_path / "run").exists()  # nothing started


def test_missing_prior_names_the_conversion(toy, tmp_path, capsys):
    args = ["--references", str(toy["refs"]), "--subject", "dinov2",
            "--dinov2", str(toy["dinov2"]), "--prior", str(tmp_path / "adm"),
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert recipe("imagenet_fibers").main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "fiber-plugins convert adm" in err


def test_inception_fid(toy, tmp_path, capsys):
    out = tmp_path / "run"
    labels = tmp_path / "labels.csv"
    labels.write_text("file,class\nimg00.png,3\nimg01.png,7\n")
    args = [
        "--references", str(toy["refs"]), "--labels", str(labels),
        "--inception", str(toy["resnet"]), "--inception-arch", "resnet10t",
        "--dinov2", str(toy["dinov2"]),
        "--classifier", str(toy["resnet"]), "--classifier-arch", "resnet10t",
        *_common(toy, out),
    ]  # fmt: skip
    assert recipe("inception_fid").main(args) == 0, capsys.readouterr().err
    rows = json.loads((out / "table.json").read_text())
    assert [r["images"] for r in rows] == ["originals", "inception fiber", "dinov2 fiber"]
    for row in rows[1:]:
        assert row["samples"] == 4
        assert np.isfinite(row["PT FID"]) and np.isfinite(row["DINOv2 FID"])
        assert 0 <= row["top-5"] <= 1
    assert "TF FID" not in rows[1]  # no torch-fidelity weights given


def test_inception_fid_bad_labels_is_one_line(toy, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("img00.png,3\n")
    args = ["--references", str(toy["refs"]), "--labels", str(labels),
            "--inception", str(toy["resnet"]), "--inception-arch", "resnet10t",
            *_common(toy, tmp_path / "run")]  # fmt: skip
    assert recipe("inception_fid").main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'img01.png'" in err


def _stimuli(folder: Path) -> Path:
    names = ["cat/cat1-dog2", "cat/cat2-clock1", "dog/dog1-cat1", "car/car1-car2"]
    _photos(folder / "tmp", len(names), 40)
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "tmp" / f"img{i:02d}.png").rename(folder / f"{name}.png")
    (folder / "tmp").rmdir()
    return folder


def test_cue_conflict(toy, tmp_path, capsys):
    """A classifier that always says class 281 (a cat class): every decision is 'cat', so the
    cat-shaped stimuli count for shape on originals and fibers alike."""
    import timm
    from safetensors.torch import save_file

    cat_only = timm.create_model("resnet10t", pretrained=False)
    state = cat_only.state_dict()
    state["fc.weight"].zero_()
    state["fc.bias"].zero_()
    state["fc.bias"][281] = 10.0
    save_file(state, str(tmp_path / "cat.safetensors"))
    out = tmp_path / "run"
    args = [
        "--stimuli", str(_stimuli(tmp_path / "stimuli")), "--num-references", "3",
        "--subject", "resnet50", "--resnet50", str(toy["resnet"]), "--resnet50-arch", "resnet10t",
        "--classifier", str(tmp_path / "cat.safetensors"), "--classifier-arch", "resnet10t",
        "--pool", str(toy["pool"]),
        *_common(toy, out),
    ]  # fmt: skip
    assert recipe("cue_conflict").main(args) == 0, capsys.readouterr().err
    rows = {r["image set"]: r for r in json.loads((out / "table.json").read_text())}
    assert set(rows) == {"originals", "resnet50 fiber"}
    # the first 3 of the sorted names: car1-car2 has no conflict and is left out
    assert rows["originals"]["images"] == 2
    assert rows["resnet50 fiber"]["images"] == 4  # 2 conflicting images x 2 samples
    for row in rows.values():  # cat1-dog2 and cat2-clock1: 'cat' is the shape label
        assert row["shape"] == 1.0 and row["texture"] == 0.0
        assert row["decided"] == row["images"]
    losses = json.loads((out / "fiber_loss.json").read_text())
    assert np.isfinite(losses[0]["NDTM"]) and np.isfinite(losses[0]["nearest neighbour"])
    assert Image.open(out / "label_preference.png").size[0] > 100


def test_cue_conflict_badly_named_stimulus_is_one_line(toy, tmp_path, capsys):
    folder = _photos(tmp_path / "stimuli", 1, 32)  # img00.png: not <shape>N-<texture>M
    args = ["--stimuli", str(folder), "--subject", "resnet50",
            *_common(toy, tmp_path / "run")]  # fmt: skip
    assert recipe("cue_conflict").main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'img00.png'" in err and "'airplane'" in err


def _agreement_args(toy, tmp_path, labels_text: str, thresholds_b: str = "0.5") -> list[str]:
    from safetensors.torch import save_file

    from tests.examples.toy_classifiers import BIAS, classifier

    weights = {}
    for side, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        model, _ = classifier()
        state = model.state_dict()
        state["4.bias"] = BIAS.clone()
        weights[side] = tmp_path / f"{side}.safetensors"
        save_file(state, str(weights[side]))
    labels = tmp_path / "labels.csv"
    labels.write_text(labels_text)
    spec = "module:tests.examples.toy_classifiers:classifier"
    return [
        "--model-a", spec, "--weights-a", str(weights["a"]), "--name-a", "BiomedCLIP",
        "--model-b", spec, "--weights-b", str(weights["b"]), "--name-b", "ConvNeXt",
        "--thresholds-b", thresholds_b,
        "--references", str(toy["refs"]), "--labels", str(labels),
        *_common(toy, tmp_path / "run"),
    ]  # fmt: skip


HEADER = "file,atelectasis,cardiomegaly,consolidation,edema,effusion\n"


def test_classifier_agreement(toy, tmp_path, capsys):
    """Both toy classifiers say [1, 0, 1, 0, 0] whatever the image (large biases), so every
    fiber sample keeps every label under both; img01 is labelled otherwise and left out."""
    text = HEADER + "img00.png,1,0,1,0,0\nimg01.png,0,0,1,0,0\n"
    assert recipe("classifier_agreement").main(_agreement_args(toy, tmp_path, text)) == 0, (
        capsys.readouterr().err
    )
    assert "1 of 2 references are right under both classifiers" in capsys.readouterr().out
    out = tmp_path / "run"
    rows = json.loads((out / "table.json").read_text())
    assert [r["class"] for r in rows] == [*HEADER.strip().split(",")[1:], "mean"]
    for row in rows:
        assert set(row) == {
            "class",
            "BiomedCLIP on BiomedCLIP's fiber",
            "ConvNeXt on BiomedCLIP's fiber",
            "ConvNeXt on ConvNeXt's fiber",
            "BiomedCLIP on ConvNeXt's fiber",
        }
        assert all(v == 1.0 for k, v in row.items() if k != "class")
    assert (out / "fiber-BiomedCLIP" / "samples.safetensors").exists()
    assert (out / "agreement.png").exists()


@pytest.mark.parametrize(
    "labels, thresholds_b, message",
    [
        (HEADER + "img00.png,0,0,0,0,0\n", "0.5", "no reference is classified correctly by both"),
        (HEADER + "img00.png,1,0,1\n", "0.5", "needs 5 labels of 0 or 1"),
        (HEADER + "img00.png,1,0,1,0,0\n", "0.5,0.5", "--thresholds-b '0.5,0.5' needs 1 or 5"),
        (HEADER + "missing.png,1,0,1,0,0\n", "0.5", "reference image not found"),
    ],
)
def test_classifier_agreement_mistakes_are_one_line(
    toy, tmp_path, capsys, labels, thresholds_b, message
):
    args = _agreement_args(toy, tmp_path, labels, thresholds_b)
    assert recipe("classifier_agreement").main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    from tests.adapters.test_qwen2_vl import save_tiny_qwen

    folder = tmp_path_factory.mktemp("qwen") / "tiny"
    save_tiny_qwen(folder)
    return folder


def test_vlm_vision_tower(toy, qwen_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--qwen", str(qwen_folder), "--references", str(toy["refs"]),
            "--typical", str(toy["pool"]), "--num-typical", "2", *_common(toy, out)]  # fmt: skip
    assert recipe("vlm_vision_tower").main(args) == 0, capsys.readouterr().err
    rows = {r["references"]: r for r in json.loads((out / "table.json").read_text())}
    assert set(rows) == {"rare", "typical"}
    for row in rows.values():
        assert row["count"] == 2 and row["samples"] == 4
        assert np.isfinite(row["fiber loss"]) and row["mirrored reference"] > 0
    assert np.isfinite(rows["rare"]["nearest typical reference"])
    assert (out / "rare" / "grid.png").exists()


def test_vlm_missing_qwen_is_one_line(toy, tmp_path, capsys):
    args = ["--qwen", str(tmp_path / "Qwen2-VL-2B-Instruct"), "--references", str(toy["refs"]),
            *_common(toy, tmp_path / "run")]  # fmt: skip
    assert recipe("vlm_vision_tower").main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "huggingface-cli download Qwen/Qwen2-VL-2B-Instruct" in err
