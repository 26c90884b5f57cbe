"""Evaluation metrics against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fiber_plugins as fp
from fiber_plugins.evaluation import (
    NearestNeighbourBaseline,
    augmentation_baseline,
    diversity,
    histogram_kl,
    wasserstein1,
)


def _uniform_pdf(x):
    return np.ones_like(x)


def _uniform_cdf(x):
    return np.clip(x, 0, 1)


def test_histogram_kl_hand_computation():
    # all samples in the first of 2 bins vs a uniform reference: p = (1, 0), q = (1/2, 1/2)
    eps = 1e-3
    kl = histogram_kl(np.full(10, 0.1), _uniform_pdf, bins=2, eps=eps)
    p = np.array([1 + eps, eps]) / (1 + 2 * eps)
    q = np.array([0.5 + eps, 0.5 + eps]) / (1 + 2 * eps)
    assert abs(kl - float(np.sum(p * np.log(p / q)))) < 1e-9
    assert histogram_kl(np.linspace(0.01, 0.99, 1000), _uniform_pdf, bins=10) < 1e-3


def test_wasserstein1_hand_computation():
    # point mass at 0.25 vs uniform on [0, 1]: W1 = E|U - 0.25| = 0.25^2/2 + 0.75^2/2 = 0.3125
    assert abs(wasserstein1(np.array([0.25]), _uniform_cdf) - 0.3125) < 1e-3
    assert wasserstein1(np.linspace(0, 1, 5001), _uniform_cdf) < 1e-3


def test_diversity_hand_computation():
    x = torch.zeros(3, 1, 1, 2)
    x[1, 0, 0, 0] = 3.0
    x[2, 0, 0, 1] = 4.0
    # pairwise distances 3, 4, 5 -> mean 4
    assert abs(diversity(x) - 4.0) < 1e-6


def test_nearest_neighbour_baseline_finds_the_closest(subject):
    obj = fp.FiberObjective(subject)
    pool = torch.rand(20, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    nn_base = NearestNeighbourBaseline(obj, pool)
    target = obj.target(pool[7:8] * 2 - 1)
    loss, idx = nn_base(target)
    assert int(idx[0]) == 7 and float(loss[0]) < 1e-10
    loss2, idx2 = nn_base(target, exclude=torch.tensor([[7]]))
    d = ((nn_base.features - target) ** 2).sum(1)
    d[7] = float("inf")
    assert int(idx2[0]) == int(d.argmin()) and abs(float(loss2[0]) - float(d.min())) < 1e-6


def test_augmentation_baseline_shape_and_positive(subject):
    obj = fp.FiberObjective(subject)
    refs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    losses = augmentation_baseline(obj, refs, obj.target(refs * 2 - 1), n=3)
    assert losses.shape == (2, 3) and (losses >= 0).all() and losses.sum() > 0


def test_lowpass_curve_shape_and_identity_limit(subject):
    from fiber_plugins.evaluation import lowpass_curve

    obj = fp.FiberObjective(subject)
    imgs = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = obj.target(imgs * 2 - 1)
    curve = lowpass_curve(obj, imgs, y, cutoffs=(0.2, 0.6, 1.0))
    assert curve.shape == (3, 3)
    assert curve[-1].abs().max() < 1e-10  # cutoff 1 is the identity: the reference's own loss
    assert (curve[0] > 0).all()


def test_classifier_agreement_hand_computation():
    from fiber_plugins.evaluation import classifier_agreement

    def model_a(x):  # label = 1 if the mean is above 0.5
        m = x.mean((1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], 1)

    def model_b(x):  # looks only at the first pixel
        p = x[:, 0, 0, 0]
        return torch.stack([0.5 - p, p - 0.5], 1)

    refs = torch.full((1, 1, 2, 2), 0.8)
    samples = torch.full((1, 4, 1, 2, 2), 0.8)
    samples[0, :2, 0, 0, 0] = 0.1  # first pixel dark in two samples: mean stays 0.625
    out = classifier_agreement(model_a, model_b, refs, samples)
    assert out == {"a": 1.0, "b": 0.5}


def test_frechet_distance_matches_hand_computation():
    scipy_linalg = pytest.importorskip(
        "scipy.linalg", reason="scipy not installed (extra 'metrics')"
    )

    from fiber_plugins.evaluation import frechet_distance

    class Flat(torch.nn.Module):
        num_features = 4

        def forward(self, x):
            return x.flatten(1)[:, :4].double()

    g = torch.Generator().manual_seed(0)
    real = torch.rand(64, 1, 2, 2, generator=g)
    fake = torch.rand(64, 1, 2, 2, generator=g) * 0.5 + 0.2
    a, b = real.flatten(1).double().numpy(), fake.flatten(1).double().numpy()
    ma, mb = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy_linalg.sqrtm(ca @ cb).real
    want = float(((ma - mb) ** 2).sum() + np.trace(ca + cb - 2 * covmean))
    assert abs(frechet_distance(real, fake, Flat()) - want) < 1e-3 * max(1.0, want)


def test_diversity_in_a_feature_space():
    x = torch.zeros(2, 1, 1, 2)
    x[1, 0, 0, 0] = 3.0
    # features double the first pixel: distance 6
    assert abs(diversity(x, features=lambda t: t[..., :1] * 2) - 6.0) < 1e-6


def test_frechet_distance_tf_inception_weights_read_safely(tmp_path, monkeypatch):
    """``feature=64`` (2048 works alike; 64 keeps the matrix square root small) with a weights file: the FID of torchmetrics' TF Inception with those
    weights (a random-init stand-in here), equal to the same network used as a custom extractor;
    the file is read as tensors (a pickle with code in it is refused)."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    pytest.importorskip("scipy")
    from safetensors.torch import save_file

    from fiber_plugins.errors import MissingFileError, UserError
    from fiber_plugins.evaluation import frechet_distance

    # torch-fidelity downloads at construction without a path: build a random-init one instead
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    torch.manual_seed(0)
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["64"])
    save_file(
        {k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors")
    )
    monkeypatch.undo()

    class Same(torch.nn.Module):  # what torchmetrics feeds its Inception: uint8 images
        num_features = 64

        def forward(self, x):
            return net((x * 255).byte())[0].double()

    g = torch.Generator().manual_seed(1)
    real, fake = torch.rand(6, 3, 32, 32, generator=g), torch.rand(6, 3, 32, 32, generator=g)
    got = frechet_distance(real, fake, 64, weights=tmp_path / "w.safetensors")
    want = frechet_distance(real, fake, Same())
    assert abs(got - want) < 1e-3 * max(1.0, abs(want))

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(UserError):
        frechet_distance(real, fake, 64, weights=tmp_path / "evil.pt")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(MissingFileError, match="weights-inception-2015-12-05"):
        frechet_distance(real, fake, 64)
