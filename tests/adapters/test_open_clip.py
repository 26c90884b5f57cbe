"""OpenCLIP subjects: features equal ``model.encode_image(preprocess(image))`` of open_clip's own
model and eval transform, layers by name, one-line errors. Every model is a tiny random-init
config (image size 32) saved to a local folder; nothing is downloaded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fiber_plugins.errors import MissingFileError, UserKeyError, UserValueError
from tests.helpers import hook_count, model_state

oc = pytest.importorskip("open_clip", reason="open_clip not installed (extra 'openclip')")

from fiber_plugins.adapters.open_clip import (  # noqa: E402
    open_clip_objective,
    open_clip_outputs,
    open_clip_subject,
    preprocess_from_transform,
)

from .test_hf import as_prior, photo  # noqa: E402

TINY_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}
PREPROCESS_CFG = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def save_tiny_open_clip(folder, seed: int = 0, model_cfg: dict | None = None):
    """A folder as ``huggingface-cli download ... --local-dir`` writes it for an OpenCLIP model:
    ``open_clip_config.json`` and ``open_clip_model.safetensors`` (returned: the folder)."""
    cfg = TINY_CFG if model_cfg is None else model_cfg
    torch.manual_seed(seed)
    model = oc.CLIP(**cfg)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": cfg, "preprocess_cfg": PREPROCESS_CFG}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    save_file(model.state_dict(), str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_open_clip(tmp_path_factory.mktemp("open_clip") / "tiny")


@pytest.fixture(scope="module")
def subject(folder):
    return open_clip_subject(folder)


@pytest.fixture(scope="module")
def reference(folder):
    """open_clip's own model (weights loaded by open_clip) and eval transform."""
    model, _, transform = oc.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval(), transform


def _one_line(err) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


def _embed(reference, image: np.ndarray, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    model, transform = reference
    pixels = transform(Image.fromarray(image))[None]
    with torch.no_grad():
        return pixels, model.encode_image(pixels, normalize=normalize)


# ---------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("normalize", [False, True])
def test_embedding_exact_at_the_models_size(subject, reference, normalize):
    model, pre = subject
    image = photo(32)
    pixels, expected = _embed(reference, image, normalize)
    x = as_prior(image)
    torch.testing.assert_close(pre(x), pixels, atol=1e-5, rtol=0)
    with torch.no_grad():
        features = open_clip_objective(model, normalize=normalize, preprocess=pre).features(x)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_embedding_after_resizing(subject, reference, normalize):
    """A 96-px photo crop shrunk to 32 px by torchvision/PIL (the eval transform) and by the
    Preprocess: measured 3.4e-3 in [0, 1] units (0.86 grey level) and 0.12% apart in the
    embedding (relative L2); the bounds are 2 grey levels and 2%."""
    model, pre = subject
    image = photo(96)
    pixels, expected = _embed(reference, image, normalize)
    x = as_prior(image)
    std = torch.tensor(pre.std).view(1, -1, 1, 1)
    assert float(((pre(x) - pixels) * std).abs().max()) <= 2 / 255
    with torch.no_grad():
        features = open_clip_objective(model, normalize=normalize).features(x)  # default pre
    rel = float((features - expected).norm() / expected.norm())
    assert rel < 2e-2, rel


def test_embedding_after_upsampling(subject, reference):
    """A 16-px image (a small prior) upsampled to 32 px: the Preprocess resamples as PIL does
    (antialiased bicubic, a = -0.5, clamped), so the gap stays at the uint8 rounding level."""
    model, pre = subject
    image = photo(16)
    pixels, expected = _embed(reference, image, False)
    x = as_prior(image)
    std = torch.tensor(pre.std).view(1, -1, 1, 1)
    gap = float(((pre(x) - pixels) * std).abs().max())
    with torch.no_grad():
        features = open_clip_objective(model, preprocess=pre).features(x)
    rel = float((features - expected).norm() / expected.norm())
    print(f"open_clip upsampling 16 -> 32 px: pixel gap {gap:.4f}, features {rel:.4f}")
    assert gap <= 2 / 255 and rel < 1e-2, (gap, rel)


def test_builtin_name_with_a_weights_file(folder, reference, monkeypatch, tmp_path):
    """An architecture from open_clip's registry (a tiny one added for the test) with a torch
    checkpoint as training scripts write it: nested under 'state_dict', 'module.' prefixes."""
    monkeypatch.setitem(oc.factory._MODEL_CONFIGS, "fiber-tiny-ViT", dict(TINY_CFG))
    state = reference[0].state_dict()
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model, pre = open_clip_subject("fiber-tiny-ViT", weights=path)
    image = photo(32)
    _, expected = _embed(reference, image, False)
    with torch.no_grad():
        features = open_clip_objective(model, preprocess=pre).features(as_prior(image))
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match="randomly initialised"):
        open_clip_subject("fiber-tiny-ViT")


def test_checkpoint_fixes(folder, reference):
    """open_clip's tensor-only checkpoint fixes: a 1-d logit_scale for a scalar one, and the
    text tower's position_ids buffer that the model no longer keeps, are accepted."""
    state = dict(reference[0].state_dict())
    state["logit_scale"] = state["logit_scale"].reshape(1)
    state["text.transformer.embeddings.position_ids"] = torch.arange(8)[None]
    model, _ = open_clip_subject(folder, weights=state)
    torch.testing.assert_close(model.logit_scale, reference[0].logit_scale)


# ---------------------------------------------------------------------------- layers
def test_layers_by_name_with_token_reductions(subject):
    model, pre = subject
    x = as_prior(photo(32))
    recorded = {}
    block = model.visual.transformer.resblocks[1]
    handle = block.register_forward_hook(lambda m, a, out: recorded.update(out=out))
    try:
        with torch.no_grad():
            model.encode_image(pre(x))
    finally:
        handle.remove()
    tokens = recorded["out"]
    name = "visual.transformer.resblocks.1"
    cases = [
        ({}, tokens[:, 0]),  # default: the class token
        ({"token": "mean"}, tokens.mean(1)),
        ({"token": 3, "index": [2, 5]}, tokens[:, 3, [2, 5]]),
        ({"token": "all"}, tokens.flatten(1)),
    ]
    with torch.no_grad():
        for kwargs, expected in cases:
            obj = open_clip_objective(model, layer=name, **kwargs)
            torch.testing.assert_close(obj.features(x), expected.reshape(1, -1))
        # a layer name given as the output is read as layer=
        same = open_clip_objective(model, name, token="mean").features(x)
        torch.testing.assert_close(same, tokens.mean(1))
    assert obj.describe()["output"] == name and obj.describe()["adapter"] == "open_clip"


def test_outputs_list_embedding_and_layers(subject):
    outputs = dict(open_clip_outputs(subject[0]))
    assert list(outputs)[0] == "image_embedding" and outputs["image_embedding"] == (1, 16)
    assert outputs["visual.transformer.resblocks.1"] == (1, 17, 32)
    assert outputs["visual.conv1"] == (1, 32, 4, 4)


def test_gradient_reaches_the_image_and_the_model_is_given_back(folder):
    model, pre = open_clip_subject(folder)
    model.train()
    model.visual.conv1.eval()
    before = (model_state(model), hook_count(model))
    obj = open_clip_objective(model, layer="visual.transformer.resblocks.0", token="mean")
    x = as_prior(photo(40)).requires_grad_(True)
    with pytest.warns(UserWarning, match="train mode"), obj.attached():
        obj.loss(x, torch.zeros(1, 32)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert (model_state(model), hook_count(model)) == before


# ---------------------------------------------------------------------------- preprocessing
def test_preprocess_from_transform_modes():
    shortest = preprocess_from_transform(oc.image_transform(32, is_train=False))
    assert (shortest.resize, shortest.crop, shortest.interpolation) == (32, (32, 32), "bicubic")
    assert shortest.mean == oc.OPENAI_DATASET_MEAN and shortest.channels == 3
    squash = preprocess_from_transform(
        oc.image_transform(32, is_train=False, resize_mode="squash", interpolation="bilinear")
    )
    assert (squash.resize, squash.crop, squash.interpolation) == ((32, 32), None, "bilinear")
    longest = preprocess_from_transform(
        oc.image_transform(32, is_train=False, resize_mode="longest")
    )
    assert (longest.resize, longest.crop) == ((32, 32), (32, 32))
    with pytest.raises(UserValueError) as err:
        preprocess_from_transform(oc.image_transform(32, is_train=True))
    assert "'RandomResizedCrop'" in _one_line(err)


# ---------------------------------------------------------------------------- errors
def test_unknown_architecture_lists_close_names():
    with pytest.raises(UserValueError) as err:
        open_clip_subject("ViT-B-322")
    message = _one_line(err)
    assert "unknown OpenCLIP architecture 'ViT-B-322'" in message and "'ViT-B-32'" in message


def test_hub_ids_are_refused():
    with pytest.raises(UserValueError) as err:
        open_clip_subject("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")
    message = _one_line(err)
    assert "never downloads" in message
    assert "huggingface-cli download microsoft/BiomedCLIP-PubMedBERT_256" in message


def test_unknown_output_and_bad_options(subject):
    model, pre = subject
    with pytest.raises(UserKeyError) as err:
        open_clip_objective(model, layer="visual.transformer.resblock.1")
    assert "closest: 'visual.transformer.resblocks.1'" in _one_line(err)
    with pytest.raises(UserKeyError, match="unknown output 'logits' of CLIP"):
        open_clip_objective(model, "logits")
    with pytest.raises(UserValueError, match="normalize=True applies to the image embedding"):
        open_clip_objective(model, layer="visual.ln_post", normalize=True)
    with pytest.raises(UserValueError, match="applies to layer outputs"):
        open_clip_objective(model, token="mean")


def test_weights_of_the_wrong_kind(tmp_path):
    hf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vit = hf.ViTModel(
        hf.ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    )
    save_file(vit.state_dict(), str(tmp_path / "model.safetensors"))  # a transformers ViT
    folder = save_tiny_open_clip(tmp_path / "clip")
    with pytest.raises(UserValueError) as err:
        open_clip_subject(folder, weights=tmp_path / "model.safetensors")
    message = _one_line(err)
    assert "do not match" in message and "missing key(s)" in message
    np.savez(tmp_path / "big_vision.npz", w=np.zeros(3))
    with pytest.raises(UserValueError, match="suffix '.npz'"):
        open_clip_subject(folder, weights=tmp_path / "big_vision.npz")
    with pytest.raises(MissingFileError):
        open_clip_subject(folder, weights=tmp_path / "nope.safetensors")


def test_folder_errors(tmp_path):
    with pytest.raises(UserValueError, match="has no open_clip_config.json"):
        open_clip_subject(tmp_path)
    folder = save_tiny_open_clip(tmp_path / "clip")
    (folder / "open_clip_model.safetensors").unlink()
    with pytest.raises(UserValueError, match="holds no weights file"):
        open_clip_subject(folder)
    with pytest.raises(MissingFileError):
        open_clip_subject(str(tmp_path / "no" / "such"))


def test_hugging_face_text_tower_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    cfg = dict(TINY_CFG, text_cfg={"hf_model_name": "fiber-test-org/no-such-bert"})
    folder = tmp_path / "biomed-like"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserValueError) as err:
        open_clip_subject(folder)
    message = _one_line(err)
    assert "'fiber-test-org/no-such-bert'" in message
    assert "huggingface-cli download fiber-test-org/no-such-bert config.json" in message
