"""Qwen2-VL's vision tower: patches equal the image processor's ``pixel_values``, features equal
the tower's own forward on them, one tower call per batch, one-line errors. The model is a tiny
random-init Qwen2VLForConditionalGeneration saved with save_pretrained (the layout of a real
checkpoint: ``visual.*`` keys next to the language model's) and read back offline."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fiber_plugins.errors import (
    MissingFileError,
    UserIndexError,
    UserKeyError,
    UserTypeError,
    UserValueError,
)
from tests.helpers import hook_count, model_state

tf = pytest.importorskip("transformers", reason="transformers not installed (extra 'hf')")
safetensors_torch = pytest.importorskip("safetensors.torch")

from fiber_plugins.adapters.hf import (  # noqa: E402
    Qwen2VLPreprocess,
    qwen2_vl_objective,
    qwen2_vl_vision_subject,
)
from tests.adapters.test_hf import as_prior, photo  # noqa: E402

VISION = dict(depth=2, embed_dim=32, num_heads=2, hidden_size=32, mlp_ratio=2)
VISION.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
TEXT.update(num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=1)
TEXT["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
PIXELS = dict(min_pixels=56 * 56, max_pixels=112 * 112)  # smart sizes 56..112 px a side
BACKENDS = ["torchvision", "pil"]


def _processor():
    return tf.Qwen2VLImageProcessor(**PIXELS)


def save_tiny_qwen(folder):
    """Save a tiny random-init Qwen2-VL (full model and processor) into ``folder``; return the
    model."""
    torch.manual_seed(0)
    config = tf.Qwen2VLConfig(vision_config=VISION, text_config=TEXT)
    full = tf.Qwen2VLForConditionalGeneration(config).eval()
    full.save_pretrained(folder)
    _processor().save_pretrained(folder)
    return full


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, the full model it was saved from)."""
    folder = tmp_path_factory.mktemp("qwen2_vl") / "tiny"
    return folder, save_tiny_qwen(folder)


@pytest.fixture(scope="module")
def loaded(saved):
    return qwen2_vl_vision_subject(saved[0])


def crop(height: int, width: int, top: int = 150, left: int = 250):
    return photo(max(height, width), top, left)[:height, :width]


def _processed(folder, images, backend):
    processor = tf.AutoImageProcessor.from_pretrained(folder, backend=backend)
    return processor(images=images, return_tensors="pt")


def _tower_outputs(full, inputs, n: int):
    """The tower's own forward: (merged embeddings, hidden states), each (n, tokens, D)."""
    with torch.no_grad():
        out = full.model.visual(
            hidden_states=inputs["pixel_values"],
            grid_thw=inputs["image_grid_thw"],
            output_hidden_states=True,
        )
    per_image = [h.reshape(n, -1, h.shape[-1]) for h in out.hidden_states]
    return out.pooler_output.reshape(n, -1, out.pooler_output.shape[-1]), per_image


def _pixel_gap(pre: Qwen2VLPreprocess, ours, theirs) -> float:
    """Largest patch difference in [0, 1] units (the normalised difference times std)."""
    per_channel = ours.shape[1] // 3
    std = torch.tensor(pre.base.std).repeat_interleave(per_channel)
    return float(((ours - theirs) * std).abs().max())


def _one_line(err) -> str:
    message = str(err.value)
    assert message and "\n" not in message, message
    return message


# ---------------------------------------------------------------------------- patches
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [(56, 84), (84, 84), (112, 56)])
def test_patches_equal_the_processors_at_its_size(saved, loaded, backend, size):
    _, pre = loaded
    image = crop(*size)
    inputs = _processed(saved[0], image, backend)
    patches, grid = pre(as_prior(image))
    assert torch.equal(grid, inputs["image_grid_thw"])
    torch.testing.assert_close(patches, inputs["pixel_values"], atol=1e-5, rtol=0)


# (H, W), bound in grey levels. Measured on these photo crops, the largest patch difference in
# [0, 1] units (torchvision / PIL backend): 16x16 -> 56x56 (a small prior, upsampled) 1.05 /
# 1.05 grey levels; 200x150 -> 112x84 1.00 / 1.00; 70x90 -> 56x84 3.08 / 3.37 (the two
# backends differ from each other by 3 there); 96x96 -> 84x84 5.0 / 5.0. The processor resizes
# uint8 images in two passes, rounding and clamping in between; Preprocess resizes floats in one
# antialiased bicubic pass and clamps once. Features differ by at most 1.0% (relative L2).
RESIZED = [((16, 16), 2), ((200, 150), 2), ((70, 90), 4), ((96, 96), 6)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size,levels", RESIZED)
def test_resized_patches_and_features_are_close(saved, loaded, backend, size, levels):
    model, pre = loaded
    image = crop(*size)
    inputs = _processed(saved[0], image, backend)
    patches, grid = pre(as_prior(image))
    assert torch.equal(grid, inputs["image_grid_thw"])
    assert _pixel_gap(pre, patches, inputs["pixel_values"]) <= levels / 255
    expected, _ = _tower_outputs(saved[1], inputs, 1)
    with torch.no_grad():
        features = qwen2_vl_objective(model, pre).features(as_prior(image))
    rel = float((features - expected.flatten(1)).norm() / expected.norm())
    assert rel < 2e-2, rel


def test_smart_resize_matches_the_processor():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    pre = Qwen2VLPreprocess(**PIXELS)
    for h, w in [(16, 16), (28, 300), (500, 90), (57, 57), (112, 112), (1000, 1000)]:
        assert pre.size_for(h, w) == smart_resize(h, w, 28, **PIXELS)
    assert Qwen2VLPreprocess.from_processor(_processor()) == pre


# ---------------------------------------------------------------------------- features
@pytest.mark.parametrize("backend", BACKENDS)
def test_features_equal_the_towers_forward_at_the_processors_size(saved, loaded, backend):
    model, pre = loaded
    image = crop(56, 84)
    x = as_prior(image)
    embeddings, hidden = _tower_outputs(saved[1], _processed(saved[0], image, backend), 1)
    cases = [
        (("embeddings", "all", None), embeddings.flatten(1)),
        (("embeddings", "mean", [1, 5]), embeddings.mean(1)[:, [1, 5]]),
        (("embeddings", 3, None), embeddings[:, 3]),
        (("last_hidden_state", "max", None), hidden[-1].amax(1)),
        (("hidden_states.0", "all", None), hidden[0].flatten(1)),
        (("hidden_states.1", "mean", None), hidden[1].mean(1)),
        (("hidden_states.-1", 7, 2), hidden[2][:, 7, 2:3]),
    ]
    for (output, token, index), expected in cases:
        obj = qwen2_vl_objective(model, pre, output, token=token, index=index)
        with torch.no_grad():
            features = obj.features(x)
        torch.testing.assert_close(features, expected.reshape(1, -1), atol=1e-5, rtol=1e-5)
    assert embeddings.shape == (1, 6, 32)  # 56x84 px: 4x6 patches, 2x3 merged tokens
    assert hook_count(model) == 0


def test_a_batch_equals_separate_calls_and_the_processors_batch(saved, loaded):
    """Two images in one tower call (grid_thw repeated); the full model and its processor
    give the same objective."""
    model, pre = loaded
    images = [crop(84, 84), crop(84, 84, top=20, left=40)]
    x = torch.cat([as_prior(i) for i in images])
    for output in ("embeddings", "hidden_states.2"):
        obj = qwen2_vl_objective(model, pre, output)
        with torch.no_grad():
            batch = obj.features(x)
            single = torch.cat([obj.features(x[i : i + 1]) for i in range(2)])
        torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)
    embeddings, _ = _tower_outputs(saved[1], _processed(saved[0], images, "pil"), 2)
    with torch.no_grad():
        features = qwen2_vl_objective(model, pre).features(x)
        whole = qwen2_vl_objective(saved[1], tf.AutoImageProcessor.from_pretrained(saved[0]))
        torch.testing.assert_close(whole.features(x), features, atol=1e-6, rtol=0)
    torch.testing.assert_close(features, embeddings.flatten(1), atol=1e-5, rtol=1e-5)


def test_fixed_image_size(loaded):
    model, pre = loaded
    x = as_prior(crop(40, 40))
    assert pre.size_for(40, 40) == (56, 56)
    fixed = qwen2_vl_objective(model, pre, token="mean", image_size=56)
    assert fixed.preprocess.fixes_size and fixed.preprocess.size == (56, 56)
    assert not qwen2_vl_objective(model, pre).preprocess.fixes_size
    with torch.no_grad():
        free = qwen2_vl_objective(model, pre, token="mean").features(x)
        torch.testing.assert_close(fixed.features(x), free, atol=1e-6, rtol=0)
        wide = qwen2_vl_objective(model, pre, image_size=(56, 112)).features(x)
    assert wide.shape == (1, 8 * 32)
    with pytest.raises(UserValueError) as err:
        qwen2_vl_objective(model, pre, image_size=(50, 56))
    assert "multiples of 28" in _one_line(err) and "(56, 56)" in _one_line(err)


def test_gradient_reaches_the_image_and_the_model_is_given_back(saved):
    model, pre = qwen2_vl_vision_subject(saved[0])
    model.train()
    model.patch_embed.eval()
    before = (model_state(model), hook_count(model))
    obj = qwen2_vl_objective(model, pre, "hidden_states.1", token="mean", index=[0, 3])
    x = as_prior(crop(40, 60)).requires_grad_(True)
    with pytest.warns(UserWarning, match="train mode"), obj.attached():
        obj.loss(x, torch.zeros(1, 2)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert (model_state(model), hook_count(model)) == before


def test_describe_is_json(loaded):
    model, pre = loaded
    obj = qwen2_vl_objective(model, pre, "hidden_states.-1", token="mean", index=4)
    described = json.loads(json.dumps(obj.describe()))
    assert described["adapter"] == "qwen2_vl" and described["output"] == "hidden_states.-1"
    assert described["layer"] == "hidden_states.-1" and described["index"] == "4"
    assert described["qwen2_vl"]["max_pixels"] == 112 * 112 and described["image_size"] is None


# ---------------------------------------------------------------------------- loading
def _rewrite(src, dst, edit):
    """Copy the folder and rewrite its weights as ``edit(state dict)`` -> {file: state dict}."""
    shutil.copytree(src, dst)
    weights = safetensors_torch.load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    for name, part in edit(weights).items():
        safetensors_torch.save_file(part, dst / name)
    return dst


def test_sharded_folder_with_model_visual_keys(saved, loaded, tmp_path):
    def shard(weights):
        renamed = {("model." + k if k.startswith("visual.") else k): v for k, v in weights.items()}
        keys = sorted(renamed)
        parts = {f"model-0000{i + 1}-of-00002.safetensors": keys[i::2] for i in range(2)}
        index = {k: name for name, ks in parts.items() for k in ks}
        (tmp_path / "sharded" / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": index})
        )
        return {name: {k: renamed[k].contiguous() for k in ks} for name, ks in parts.items()}

    folder = _rewrite(saved[0], tmp_path / "sharded", shard)
    model, pre = qwen2_vl_vision_subject(folder)
    assert pre == loaded[1]
    for (name, got), (_, want) in zip(model.state_dict().items(), loaded[0].state_dict().items()):
        assert torch.equal(got, want), name
    half, _ = qwen2_vl_vision_subject(str(folder), dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16 and not half.training


def test_vision_weights_are_strict(saved, tmp_path):
    def drop(weights):
        return {"model.safetensors": {k: v for k, v in weights.items() if "merger.mlp.2" not in k}}

    with pytest.raises(UserValueError) as err:
        qwen2_vl_vision_subject(_rewrite(saved[0], tmp_path / "missing", drop))
    assert "2 missing vision weight(s)" in _one_line(err)
    assert "the first visual.merger.mlp.2.bias" in _one_line(err)

    def extra(weights):
        return {"model.safetensors": {**weights, "visual.blocks.9.norm1.weight": torch.ones(32)}}

    with pytest.raises(UserValueError) as err:
        qwen2_vl_vision_subject(_rewrite(saved[0], tmp_path / "extra", extra))
    assert "1 unexpected vision weight(s)" in _one_line(err)
    assert "visual.blocks.9.norm1.weight" in _one_line(err)

    def text_only(weights):
        return {"model.safetensors": {k: v for k, v in weights.items() if "visual" not in k}}

    with pytest.raises(UserValueError, match="no vision weights"):
        qwen2_vl_vision_subject(_rewrite(saved[0], tmp_path / "text", text_only))


def test_folder_errors_are_one_line_and_say_how_to_download(saved, tmp_path):
    hint = "huggingface-cli download Qwen/Qwen2-VL-2B-Instruct --local-dir"
    with pytest.raises(MissingFileError) as err:
        qwen2_vl_vision_subject(tmp_path / "nope")
    assert "does not exist" in _one_line(err) and hint in _one_line(err)
    with pytest.raises(UserValueError, match="has no config.json"):
        qwen2_vl_vision_subject(tmp_path)
    vit = tmp_path / "vit"
    tf.ViTModel(
        tf.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(vit)
    with pytest.raises(UserValueError) as err:
        qwen2_vl_vision_subject(vit)
    assert "holds a 'vit' model, not Qwen2-VL" in _one_line(err) and "hf_subject" in _one_line(err)
    bare = tmp_path / "bare"
    shutil.copytree(saved[0], bare)
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(UserValueError) as err:
        qwen2_vl_vision_subject(bare)
    assert "no preprocessor_config.json" in _one_line(err) and hint in _one_line(err)
    pickled = tmp_path / "pickled"
    shutil.copytree(saved[0], pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(UserValueError) as err:
        qwen2_vl_vision_subject(pickled)
    assert "only pickle weights (pytorch_model.bin), never unpickled" in _one_line(err)


# ---------------------------------------------------------------------------- objective errors
def test_objective_errors_are_one_line(loaded):
    model, pre = loaded
    with pytest.raises(UserKeyError) as err:
        qwen2_vl_objective(model, pre, "pooler_output")
    assert "valid: embeddings, last_hidden_state, hidden_states.0..2" in _one_line(err)
    with pytest.raises(UserKeyError, match="unknown output 'hidden_states.3'"):
        qwen2_vl_objective(model, pre, "hidden_states.3")
    with pytest.raises(UserValueError) as err:
        qwen2_vl_objective(model, pre, token="first")
    assert "unknown token 'first'" in _one_line(err)
    with pytest.raises(UserValueError) as err:
        qwen2_vl_objective(model, pre, token="cls")
    assert "no CLS token" in _one_line(err) and "'mean'" in _one_line(err)
    with pytest.raises(UserTypeError, match="vision tower"):
        qwen2_vl_objective(torch.nn.Linear(2, 2), pre)
    with pytest.raises(UserValueError, match="differ from the tower's"):
        qwen2_vl_objective(model, Qwen2VLPreprocess(patch_size=16))
    with pytest.raises(UserValueError, match="not a Qwen2-VL image processor"):
        qwen2_vl_objective(model, tf.ViTImageProcessor())


def test_no_hook_left_after_an_error(loaded, monkeypatch):
    model, pre = loaded
    x = as_prior(crop(56, 56))
    obj = qwen2_vl_objective(model, pre, "hidden_states.2", token=99)
    with pytest.raises(UserIndexError) as err:
        obj.features(x)
    assert "token 99 is out of range" in _one_line(err)
    assert hook_count(model) == 0

    def boom(*args, **kwargs):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(model.blocks[0], "forward", boom)
    obj = qwen2_vl_objective(model, pre, "hidden_states.1", token="mean")
    with pytest.raises(RuntimeError, match="forward failed"), obj.attached():
        obj.features(x)
    assert hook_count(model) == 0 and not model.training
