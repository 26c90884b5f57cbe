"""timm adapter: values equal timm's own calls; preprocessing; hooks/state; errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm", reason="the timm extra is not installed")

import fiber_plugins as fp  # noqa: E402
from fiber_plugins.adapters.timm import (  # noqa: E402
    KINDS,
    timm_objective,
    timm_preprocess,
    timm_subject,
)
from fiber_plugins.objectives import IDENTITY, Preprocess  # noqa: E402
from tests.helpers import has_no_hooks, model_state  # noqa: E402

VIT = "vit_tiny_patch16_224"
VIT_KW = {"num_classes": 10, "img_size": 32, "patch_size": 8, "depth": 2}


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=10).eval()


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model(VIT, pretrained=False, **VIT_KW).eval()


@pytest.fixture
def x():
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _flat(t):
    return t.reshape(t.shape[0], -1)


def _timm_value(model, kind, x, layer_index=None):
    """timm's own calls for each kind."""
    with torch.no_grad():
        if kind == "logits":
            return model(x)
        if kind == "embedding":
            return model.forward_head(model.forward_features(x), pre_logits=True)
        if kind == "features":
            return model.forward_features(x)
        return model.forward_intermediates(x, indices=[layer_index], intermediates_only=True)[0]


# ---------------------------------------------------------------- values
@pytest.mark.parametrize("model_name", ["resnet", "vit"])
@pytest.mark.parametrize(
    ("kind", "layer_index"),
    [("logits", None), ("embedding", None), ("features", None), ("intermediate", 1)],
)
def test_values_equal_timm_calls(request, model_name, kind, layer_index, x):
    model = request.getfixturevalue(model_name)
    obj = timm_objective(
        model, kind, reduction="none", layer_index=layer_index, preprocess=IDENTITY
    )
    torch.testing.assert_close(obj.features(x), _flat(_timm_value(model, kind, x, layer_index)))


def test_default_reductions(resnet, vit, x):
    feats = _timm_value(resnet, "features", x)
    obj = timm_objective(resnet, "features", preprocess=IDENTITY)
    torch.testing.assert_close(obj.features(x), feats.mean(dim=(2, 3)))  # CNN: spatial mean
    tokens = _timm_value(vit, "features", x)
    obj = timm_objective(vit, "features", preprocess=IDENTITY)
    assert obj.reduction == "cls"
    torch.testing.assert_close(obj.features(x), tokens[:, 0])  # ViT with a class token: cls
    obj = timm_objective(vit, "features", reduction="token_mean", preprocess=IDENTITY)
    torch.testing.assert_close(obj.features(x), tokens.mean(1))
    # intermediates keep timm's map; index + spatial_mean gives one channel's mean
    inter = _timm_value(vit, "intermediate", x, -1)
    obj = timm_objective(vit, "intermediate", layer_index=-1, preprocess=IDENTITY)
    torch.testing.assert_close(obj.features(x), _flat(inter))
    obj = timm_objective(
        resnet,
        "intermediate",
        layer_index=2,
        index=5,
        reduction="spatial_mean",
        preprocess=IDENTITY,
    )
    torch.testing.assert_close(
        obj.features(x), _timm_value(resnet, "intermediate", x, 2)[:, 5].mean((1, 2))[:, None]
    )


def test_index_selects_classes(resnet, x):
    obj = timm_objective(resnet, "logits", index=[3, 7], preprocess=IDENTITY)
    torch.testing.assert_close(obj.features(x), _timm_value(resnet, "logits", x)[:, [3, 7]])
    assert obj.name == "resnet18:logits[[3, 7]]"


# ---------------------------------------------------------------- preprocessing
def test_preprocess_from_timm_data_config():
    model, pre = timm_subject("resnet18", num_classes=10)
    assert not model.training
    # timm's eval transform: resnet18's crop_pct 0.95 -> resize the shorter side to 235, crop 224
    assert pre == Preprocess(
        resize=235,
        crop=(224, 224),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        interpolation="bicubic",
    )
    assert pre == timm_preprocess(model) == Preprocess.from_timm(model)
    # the objective's default preprocessing is the same: phi(x) = model(pre(x))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    obj = timm_objective(model, "logits")
    with torch.no_grad():
        torch.testing.assert_close(obj.features(x), model(pre(x)))


def test_vit_preprocess_uses_the_size_it_was_built_for():
    model, pre = timm_subject(VIT, **VIT_KW)
    # resolve_data_config still says 224 (pretrained config); the model only accepts 32
    assert Preprocess.from_timm(model).output_size((7, 9)) == (32, 32)
    assert pre.output_size((7, 9)) == (32, 32)
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    obj = timm_objective(model, "embedding")
    assert obj.features(torch.rand(2, 3, 16, 16) * 2 - 1).shape == (2, 192)


def test_name_and_local_safetensors_weights(tmp_path, vit, x):
    from safetensors.torch import save_file

    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    model, _ = timm_subject(VIT, weights=path, **VIT_KW)
    for (k, a), b in zip(vit.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    obj = timm_objective(model, "logits", preprocess=IDENTITY)
    torch.testing.assert_close(obj.features(x), _timm_value(vit, "logits", x))
    with pytest.raises(ValueError, match="missing key"):
        timm_subject("resnet18", weights=path)
    (tmp_path / "model.txt").write_text("not weights")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        timm_subject("resnet18", weights=tmp_path / "model.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        timm_subject("resnet18", weights=tmp_path / "nope.safetensors")


def test_weights_use_the_package_loader(tmp_path, resnet):
    """timm_subject reads weights with fiber_plugins.weights: torch state dicts with
    weights_only=True, one-line refusals for pickled objects and truncated files."""
    from fiber_plugins.errors import UserValueError

    torch.save(resnet.state_dict(), tmp_path / "resnet.pt")
    model, _ = timm_subject("resnet18", weights=tmp_path / "resnet.pt", num_classes=10)
    torch.testing.assert_close(model.fc.weight, resnet.fc.weight)
    torch.save({"state_dict": resnet.state_dict(), "args": nn.ReLU()}, tmp_path / "objects.pt")
    with pytest.raises(UserValueError) as err:
        timm_subject("resnet18", weights=tmp_path / "objects.pt", num_classes=10)
    message = str(err.value)
    assert "\n" not in message and "pickled Python objects" in message
    assert "weights_only=False" not in message
    data = (tmp_path / "resnet.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserValueError, match="truncated or corrupt") as err:
        timm_subject("resnet18", weights=tmp_path / "cut.pt", num_classes=10)
    assert "\n" not in str(err.value)


def test_objective_from_a_model_name():
    obj = timm_objective("resnet18", "embedding", preprocess=IDENTITY)
    assert obj.name == "resnet18:embedding"
    assert obj.features(torch.zeros(1, 3, 32, 32)).shape == (1, 512)


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_the_image(vit, kind):
    obj = timm_objective(vit, kind, layer_index=0 if kind == "intermediate" else None)
    img = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    y = obj.target(torch.rand(1, 3, 16, 16) * 2 - 1)
    with obj.attached():
        obj.loss(img, y).sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert all(p.grad is None for p in vit.parameters())


# ---------------------------------------------------------------- hooks and model state
@pytest.mark.filterwarnings("ignore:.*train mode:UserWarning")
@pytest.mark.parametrize("kind", KINDS)
def test_no_hooks_left_and_state_restored(pixel_prior, references, kind, monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model(VIT, pretrained=False, **VIT_KW).train()
    model.blocks[0].eval()  # a mixed state the objective must give back unchanged
    model.patch_embed.proj.weight.requires_grad_(False)
    before = model_state(model)
    obj = timm_objective(model, kind, layer_index=1 if kind == "intermediate" else None)
    result = fp.NDTMSampler(pixel_prior, obj, num_steps=3, inner_steps=1).sample(
        references=references, n=1, progress=False
    )
    assert torch.isfinite(result.fiber_loss).all()
    assert has_no_hooks(model) and model_state(model) == before

    def boom(inp):
        raise RuntimeError("block failed")

    monkeypatch.setattr(model.blocks[0], "forward", boom)
    with pytest.raises(RuntimeError, match="block failed"):
        obj.features(torch.zeros(1, 3, 16, 16))
    assert has_no_hooks(model) and model_state(model) == before


def test_train_mode_is_announced(x):
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)  # train mode
    obj = timm_objective(model, "embedding", preprocess=IDENTITY)
    with pytest.warns(UserWarning, match="train mode"):
        obj.features(x)
    assert all(m.training for m in model.modules())


# ---------------------------------------------------------------- bad input
def test_bad_kind_lists_choices(resnet):
    with pytest.raises(ValueError, match=r"unknown kind 'pooled'.*'logits'.*'intermediate'"):
        timm_objective(resnet, "pooled")


@pytest.mark.parametrize(("model_name", "blocks"), [("resnet", 5), ("vit", 2)])
@pytest.mark.parametrize("layer_index", [7, -8])
def test_layer_index_out_of_range_gives_number_of_blocks(request, model_name, blocks, layer_index):
    model = request.getfixturevalue(model_name)
    with pytest.raises(IndexError, match=f"has {blocks} blocks"):
        timm_objective(model, "intermediate", layer_index=layer_index)


def test_layer_index_misuse(resnet):
    with pytest.raises(ValueError, match="needs layer_index"):
        timm_objective(resnet, "intermediate")
    with pytest.raises(ValueError, match="only used with kind='intermediate'"):
        timm_objective(resnet, "logits", layer_index=2)
    with pytest.raises(TypeError, match="layer_index must be an int"):
        timm_objective(resnet, "intermediate", layer_index="2")


def test_non_timm_model_and_unknown_name():
    with pytest.raises(TypeError, match=r"needs forward_features\(\).*Linear has none"):
        timm_objective(nn.Linear(3, 3), "embedding")
    with pytest.raises(ValueError, match="unknown timm model 'resnet19'.*'resnet18'"):
        timm_subject("resnet19")
    with pytest.raises(TypeError, match="need a model name"):
        timm_subject(nn.Linear(3, 3), num_classes=3)
    with pytest.raises(TypeError, match="name or an nn.Module"):
        timm_subject(3)


def test_missing_timm_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match=r"fiber-plugins\[timm\]"):
        timm_subject("resnet18")


def test_nhwc_features_are_reduced_over_space(x):
    torch.manual_seed(0)
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224",
        pretrained=False,
        img_size=32,
        window_size=2,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        num_classes=3,
    ).eval()
    assert timm_preprocess(swin).output_size((7, 9)) == (32, 32)
    feats = _timm_value(swin, "features", x)  # (B, H, W, C): Swin's NHWC layout
    obj = timm_objective(swin, "features", preprocess=IDENTITY)
    torch.testing.assert_close(obj.features(x), feats.mean(dim=(1, 2)))
