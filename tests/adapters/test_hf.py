"""Hugging Face transformers subjects: features equal the model's own forward on the processor's
output, outputs by name, one-line errors. Every model is a tiny random-init config saved with
save_pretrained and loaded back offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fiber_plugins.errors import MissingFileError, UserError, UserKeyError, UserValueError
from tests.helpers import hook_count, model_state

tf = pytest.importorskip("transformers", reason="transformers not installed (extra 'hf')")

from fiber_plugins.adapters.hf import (  # noqa: E402
    hf_objective,
    hf_outputs,
    hf_subject,
    preprocess_from_processor,
)

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
CLIP_CROP = dict(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})


def _vit():
    return tf.ViTModel(tf.ViTConfig(intermediate_size=64, **TINY))


def _vit_cls():
    return tf.ViTForImageClassification(tf.ViTConfig(intermediate_size=64, num_labels=5, **TINY))


def _clip():
    return tf.CLIPVisionModel(tf.CLIPVisionConfig(intermediate_size=64, **TINY))


def _clip_proj():
    config = tf.CLIPVisionConfig(intermediate_size=64, projection_dim=16, **TINY)
    return tf.CLIPVisionModelWithProjection(config)


def _dinov2():
    return tf.Dinov2Model(tf.Dinov2Config(mlp_ratio=2, **TINY))


def _siglip():
    return tf.SiglipVisionModel(tf.SiglipVisionConfig(intermediate_size=64, **TINY))


def _vit_processor():  # exact 32x32 resize, bilinear, mean/std 0.5
    return tf.ViTImageProcessor(size={"height": 32, "width": 32})


def _clip_processor():  # shortest edge 36, center crop 32, bicubic, OpenAI CLIP mean/std
    return tf.CLIPImageProcessor(**CLIP_CROP)


def _dinov2_processor():  # as facebook/dinov2-*: shortest edge, crop, bicubic, ImageNet stats
    return tf.BitImageProcessor(
        **CLIP_CROP, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    )


def _siglip_processor():  # exact resize, bicubic, mean/std 0.5
    return tf.SiglipImageProcessor(size={"height": 32, "width": 32})


# name -> (model, processor, output, the processor's resize side: no resampling at that size)
CASES = {
    "vit": (_vit, _vit_processor, "pooler_output", 32),
    "vit-classifier": (_vit_cls, _vit_processor, "logits", 32),
    "clip": (_clip, _clip_processor, "pooler_output", 36),
    "clip-projection": (_clip_proj, _clip_processor, "image_embeds", 36),
    "dinov2": (_dinov2, _dinov2_processor, "pooler_output", 36),
    "siglip": (_siglip, _siglip_processor, "pooler_output", 32),
}


def save_tiny(folder, case: str = "vit", seed: int = 0):
    """Save the tiny model and processor of ``case`` into ``folder`` (returned)."""
    make_model, make_processor, _, _ = CASES[case]
    torch.manual_seed(seed)
    make_model().save_pretrained(folder)
    make_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {case: save_tiny(root / case, case) for case in CASES}


@pytest.fixture(scope="module")
def loaded(folders):
    return {case: hf_subject(folder) for case, folder in folders.items()}


def photo(side: int, top: int = 150, left: int = 250) -> np.ndarray:
    """A (side, side, 3) uint8 crop of a real photo (scikit-learn's china.jpg)."""
    datasets = pytest.importorskip("sklearn.datasets")
    image = datasets.load_sample_images().images[0]
    return np.ascontiguousarray(image[top : top + side, left : left + side])


def as_prior(image: np.ndarray) -> torch.Tensor:
    """A uint8 (H, W, 3) image as a prior-space batch (1, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


def _one_line(err) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


def _reference(model, folder, image, output, backend):
    """The model's own forward on the processor's output: (pixel_values, output)."""
    processor = tf.AutoImageProcessor.from_pretrained(folder, backend=backend)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return pixels, model(pixel_values=pixels)[output]


def _pixel_gap(pre, x, pixels) -> float:
    """Largest difference between the Preprocess output and the processor's, in [0, 1] units
    (the normalised difference times std)."""
    std = torch.tensor(pre.std).view(1, -1, 1, 1)
    return float(((pre(x) - pixels) * std).abs().max())


# ---------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("case", list(CASES))
def test_features_equal_the_models_forward_on_the_processors_output(folders, loaded, case, backend):
    """A 96-px photo crop, shrunk by the processor (PIL, or torchvision on uint8) and by the
    Preprocess (float, antialiased). Measured on this photo for all six models and both
    backends: the inputs differ by at most 3.6e-3 in [0, 1] units (0.92 grey level: the
    processor rounds to uint8 after resampling), the features by at most 0.4% (relative L2,
    SigLIP; 0.1% for the others). The bounds are 2 grey levels and 2%."""
    model, pre = loaded[case]
    output = CASES[case][2]
    image = photo(96)
    x = as_prior(image)
    pixels, reference = _reference(model, folders[case], image, output, backend)
    assert _pixel_gap(pre, x, pixels) <= 2 / 255
    with torch.no_grad():
        features = hf_objective(model, output, preprocess=pre).features(x)
    assert features.shape == (1, reference[0].numel())
    rel = float((features - reference.flatten(1)).norm() / reference.norm())
    assert rel < 2e-2, rel


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("case", list(CASES))
def test_features_exact_at_the_processors_size(folders, loaded, case, backend):
    """At the processor's resize size nothing is resampled: equal to float precision."""
    model, pre = loaded[case]
    output, side = CASES[case][2], CASES[case][3]
    image = photo(side)
    x = as_prior(image)
    pixels, reference = _reference(model, folders[case], image, output, backend)
    torch.testing.assert_close(pre(x), pixels, atol=1e-5, rtol=0)
    with torch.no_grad():
        features = hf_objective(model, output, preprocess=pre).features(x)
    torch.testing.assert_close(features, reference.flatten(1), atol=1e-5, rtol=1e-5)


def test_upsampling_gap_is_bounded(folders, loaded):
    """A 16-px image (a small prior) upsampled to the processor's 36 px: the Preprocess resamples
    as PIL does (antialiased bicubic, a = -0.5, clamped), so the gap is the processor's uint8
    rounding: measured 0.0040-0.0041 in [0, 1] units (about 1 grey level) for CLIP, DINOv2 and
    SigLIP, features 0.07-0.34% apart; bounded at 2 grey levels."""
    model, pre = loaded["clip"]
    image = photo(16)
    pixels, _ = _reference(model, folders["clip"], image, "pooler_output", "pil")
    assert _pixel_gap(pre, as_prior(image), pixels) < 2 / 255


# ---------------------------------------------------------------------------- named outputs
@pytest.mark.parametrize("case", ["vit", "clip", "dinov2", "siglip"])
def test_hidden_states_equal_output_hidden_states(folders, case):
    """hidden_states.N, read with the objective's own hooks, equals the model's
    ``output_hidden_states=True`` (N = 0 the input of the first layer, e.g. after CLIP's
    pre-layernorm); no hook is left on the model."""
    model, pre = hf_subject(folders[case])
    x = as_prior(photo(CASES[case][3]))
    objectives = [
        hf_objective(model, f"hidden_states.{n}", token="all", preprocess=pre)
        for n in (0, 1, 2, -1)
    ]
    with torch.no_grad():
        features = [obj.features(x) for obj in objectives]
    assert hook_count(model) == 0
    with torch.no_grad():
        hidden = model(pixel_values=pre(x), output_hidden_states=True).hidden_states
    for n, got in zip((0, 1, 2, -1), features):
        torch.testing.assert_close(got, hidden[n].flatten(1), atol=1e-5, rtol=1e-5)


def test_outputs_by_name_with_token_reductions(folders, loaded):
    model, pre = loaded["vit"]
    image = photo(32)
    x = as_prior(image)
    processor = tf.AutoImageProcessor.from_pretrained(folders["vit"])
    with torch.no_grad():
        out = model(**processor(images=image, return_tensors="pt"), output_hidden_states=True)
        hidden = out.hidden_states
        cases = [
            (("last_hidden_state", None, None), out.last_hidden_state[:, 0]),  # default: cls
            (("last_hidden_state", "mean", None), out.last_hidden_state.mean(1)),
            (("last_hidden_state", "max", 3), out.last_hidden_state.amax(1)[:, 3]),
            (("last_hidden_state", 5, [1, 2]), out.last_hidden_state[:, 5, [1, 2]]),
            (("last_hidden_state", "all", None), out.last_hidden_state.flatten(1)),
            (("hidden_states.0", "cls", None), hidden[0][:, 0]),
            (("hidden_states.1", "mean", 7), hidden[1].mean(1)[:, 7]),
            (("hidden_states.-1", None, None), hidden[-1][:, 0]),
            (("pooler_output", None, 4), out.pooler_output[:, 4]),
        ]
        for (output, token, index), expected in cases:
            obj = hf_objective(model, output, token=token, index=index, preprocess=pre)
            features = obj.features(x)
            torch.testing.assert_close(features, expected.reshape(1, -1), atol=1e-5, rtol=1e-5)
    described = obj.describe()
    assert described["adapter"] == "hf" and described["output"] == "pooler_output"
    assert described["index"] == "4" and obj.name == "ViTModel:pooler_output[4]"


def test_siglip_has_no_cls_token(loaded):
    model, pre = loaded["siglip"]
    x = as_prior(photo(32))
    obj = hf_objective(model, "last_hidden_state", preprocess=pre)  # default: mean
    with torch.no_grad():
        tokens = model(pixel_values=pre(x)).last_hidden_state
        torch.testing.assert_close(obj.features(x), tokens.mean(1), atol=1e-5, rtol=1e-5)
    with pytest.raises(UserValueError) as err:
        hf_objective(model, "last_hidden_state", token="cls", preprocess=pre)
    assert "no CLS token" in _one_line(err) and "'mean'" in _one_line(err)


def test_hf_outputs_lists_names_and_shapes(loaded):
    model, _ = loaded["vit"]
    assert hf_outputs(model) == [
        ("last_hidden_state", (1, 17, 32)),
        ("pooler_output", (1, 32)),
        ("hidden_states.0", (1, 17, 32)),
        ("hidden_states.1", (1, 17, 32)),
        ("hidden_states.2", (1, 17, 32)),
    ]
    names = [n for n, _ in hf_outputs(loaded["clip-projection"][0])]
    assert names[:2] == ["image_embeds", "last_hidden_state"] and "pooler_output" not in names


def test_unknown_output_lists_the_models_outputs(loaded):
    model, pre = loaded["vit"]
    with pytest.raises(UserKeyError) as err:
        hf_objective(model, "image_embeds", preprocess=pre)
    message = _one_line(err)
    assert "unknown output 'image_embeds' of ViTModel" in message
    assert "last_hidden_state, pooler_output, hidden_states.0..2" in message
    with pytest.raises(UserKeyError, match="unknown output 'hidden_states.3'"):
        hf_objective(model, "hidden_states.3", preprocess=pre)


def test_token_refused_for_pooled_outputs(loaded):
    model, pre = loaded["vit"]
    with pytest.raises(UserValueError) as err:
        hf_objective(model, "pooler_output", token="mean", preprocess=pre)
    assert "needs (B, tokens, D)" in _one_line(err) and "(1, 32)" in _one_line(err)
    with pytest.raises(UserValueError, match="unknown token 'first'"):
        hf_objective(model, "last_hidden_state", token="first", preprocess=pre)


def test_default_preprocess_is_read_from_the_models_folder(loaded):
    model, pre = loaded["clip"]
    assert hf_objective(model, "pooler_output").preprocess == pre
    assert pre.resize == 36 and pre.crop == (32, 32) and pre.interpolation == "bicubic"


def test_full_clip_folder_gives_the_vision_tower_with_projection(tmp_path):
    torch.manual_seed(0)
    vision = dict(intermediate_size=64, **TINY)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config = tf.CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)
    clip = tf.CLIPModel(config).eval()
    clip.save_pretrained(tmp_path)
    _clip_processor().save_pretrained(tmp_path)
    model, pre = hf_subject(tmp_path)
    assert type(model).__name__ == "CLIPVisionModelWithProjection"
    x = as_prior(photo(36))
    with torch.no_grad():
        expected = clip.get_image_features(pixel_values=pre(x))
        expected = getattr(expected, "pooler_output", expected)  # transformers 5: an output
        torch.testing.assert_close(hf_objective(model, "image_embeds").features(x), expected)


def test_gradient_reaches_the_image_and_the_model_is_given_back(folders):
    model, pre = hf_subject(folders["dinov2"])
    model.train()
    model.embeddings.eval()
    before = (model_state(model), hook_count(model))
    obj = hf_objective(model, "hidden_states.1", token="mean", index=[0, 3], preprocess=pre)
    x = as_prior(photo(40)).requires_grad_(True)
    with pytest.warns(UserWarning, match="train mode"), obj.attached():
        obj.loss(x, torch.zeros(1, 2)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert (model_state(model), hook_count(model)) == before


# ---------------------------------------------------------------------------- preprocessing
def test_preprocess_from_processor_fields():
    pre = preprocess_from_processor(_dinov2_processor())
    assert (pre.resize, pre.crop, pre.size) == (36, (32, 32), None)
    assert pre.value_range == (0.0, 1.0) and pre.mean == (0.485, 0.456, 0.406)
    assert pre.interpolation == "bicubic" and pre.channels == 3
    pre = preprocess_from_processor(
        tf.ViTImageProcessor(
            size={"height": 24, "width": 20}, do_rescale=False, do_normalize=False, resample=0
        )
    )
    assert (pre.size, pre.resize, pre.crop) == ((24, 20), None, None)
    assert pre.value_range == (0.0, 255.0) and pre.mean is None and pre.interpolation == "nearest"
    crop_exact = tf.CLIPImageProcessor(
        size={"height": 40, "width": 40}, crop_size={"height": 32, "width": 32}
    )
    pre = preprocess_from_processor(crop_exact)
    assert (pre.resize, pre.crop, pre.size) == ((40, 40), (32, 32), None)


# ---------------------------------------------------------------------------- loading errors
def test_missing_folder_is_one_line(tmp_path):
    with pytest.raises(MissingFileError) as err:
        hf_subject(str(tmp_path / "nope"))
    assert "does not exist" in _one_line(err)


def test_hub_id_not_in_cache_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserValueError) as err:
        hf_subject("fiber-test-org/no-such-model")
    message = _one_line(err)
    assert "not in the local Hugging Face cache" in message
    assert "huggingface-cli download fiber-test-org/no-such-model --local-dir" in message


def test_folder_without_config_or_processor(tmp_path, folders):
    with pytest.raises(UserValueError, match="has no config.json"):
        hf_subject(tmp_path)
    bare = tmp_path / "bare"
    torch.manual_seed(0)
    _vit().save_pretrained(bare)  # no preprocessor_config.json
    with pytest.raises(UserValueError) as err:
        hf_subject(bare)
    assert "no image processor" in _one_line(err) and "preprocess=" in _one_line(err)
    model, pre = hf_subject(bare, processor=_vit_processor())
    assert pre.size == (32, 32)
    with pytest.raises(UserValueError, match="is a file"):
        hf_subject(folders["vit"] / "config.json")


def test_text_model_refused(tmp_path):
    config = tf.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    tf.BertModel(config).save_pretrained(tmp_path)
    with pytest.raises(UserError) as err:
        hf_subject(tmp_path)
    assert "takes no pixel_values" in _one_line(err)
