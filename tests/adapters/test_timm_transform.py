"""Preprocess.from_timm is timm's eval transform (resize by crop_pct, center crop, mean/std),
checked against ``timm.data.create_transform`` on real photos (issue 14, item 5)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fiber_plugins.objectives.preprocess import Preprocess

timm = pytest.importorskip("timm")
datasets = pytest.importorskip("sklearn.datasets")


def _photos():
    china, flower = datasets.load_sample_images().images  # 427 x 640 RGB uint8
    return [china, flower[:300, 50:450], china[:240, :240]]  # landscape, cropped, square


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "convnext_atto"])
def test_from_timm_matches_timms_eval_transform(name):
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(name, pretrained=False)
    cfg = resolve_data_config({}, model=model)
    transform = create_transform(**cfg)
    pre = Preprocess.from_timm(model)
    direct = dataclasses.replace(pre, resize=None, crop=None, size=tuple(cfg["input_size"][-2:]))
    for photo in _photos():
        expected = transform(Image.fromarray(photo))[None]
        x = torch.from_numpy(photo.copy()).permute(2, 0, 1)[None].float() / 255 * 2 - 1
        ours = pre(x)
        assert ours.shape == expected.shape
        err = (ours - expected).abs().mean().item()
        # what is left is PIL's uint8 rounding and its bicubic kernel (a = -0.5; torch's is
        # -0.75), in normalised units; resizing straight to the input size (no crop) is far off
        assert err < 0.01, (name, photo.shape, err)
        assert (direct(x) - expected).abs().mean().item() > 10 * err


def test_resize_and_crop_follow_torchvision():
    from torchvision.transforms import v2

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 37, 53, generator=g)
    for resize, crop in [(41, 32), (20, 24), ((30, 40), (16, 50))]:
        ours = Preprocess(resize=resize, crop=crop, interpolation="bilinear")(x * 2 - 1)
        ref = v2.CenterCrop(crop)(v2.Resize(resize, antialias=True)(x))
        assert ours.shape == ref.shape, (resize, crop)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -3, (224,) * 3, 2.5, True])
def test_bad_sizes_are_one_line_errors(bad):
    with pytest.raises(ValueError, match=r"must be a positive int or \(H, W\)"):
        Preprocess(crop=bad)
