"""transformer-lens adapter: hook-point values equal run_with_cache; hooks and flags restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fiber_plugins as fp
from fiber_plugins.objectives import IDENTITY
from tests.helpers import hook_count, model_state

tl = pytest.importorskip("transformer_lens", reason="transformer-lens not installed (extra 'lens')")
from transformer_lens import HookedRootModule  # noqa: E402
from transformer_lens.hook_points import HookPoint  # noqa: E402

from fiber_plugins.adapters.lens import (  # noqa: E402
    lens_objective,
    list_hook_points,
    reduce_tokens,
)


class TinyHookedViT(HookedRootModule):
    """A one-block ViT-shaped HookedRootModule: 16x16 images, 4x4 patches, CLS + 16 tokens."""

    def __init__(self, d=8, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.patch = nn.Conv2d(3, d, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.1)
        self.hook_embed = HookPoint()
        self.ln = nn.LayerNorm(d)
        self.mlp_in = nn.Linear(d, 2 * d)
        self.hook_mlp_post = HookPoint()
        self.mlp_out = nn.Linear(2 * d, d)
        self.hook_resid_post = HookPoint()
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(d, 5)
        self.hook_logits = HookPoint()
        self.setup()

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        resid = self.hook_embed(torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1))
        post = self.hook_mlp_post(torch.nn.functional.gelu(self.mlp_in(self.ln(resid))))
        resid = self.hook_resid_post(resid + self.drop(self.mlp_out(post)))
        return self.hook_logits(self.head(resid[:, 0]))


@pytest.fixture
def model():
    return TinyHookedViT().eval()


@pytest.mark.parametrize(
    "hook, token, index",
    [
        ("hook_resid_post", "cls", None),
        ("hook_resid_post", "mean", [1, 3]),
        ("hook_mlp_post", "max", 2),
        ("hook_mlp_post", 5, None),
        ("hook_embed", "all", None),
        ("hook_logits", "all", 4),
    ],
)
def test_values_match_run_with_cache(model, hook, token, index):
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    _, cache = model.run_with_cache(x)
    act = reduce_tokens(cache[hook], token)
    if index is not None:
        act = act[:, index]
    obj = lens_objective(model, hook, token=token, index=index, preprocess=IDENTITY)
    torch.testing.assert_close(obj.features(x), act.reshape(3, -1), rtol=1e-5, atol=1e-6)


def test_gradient_reaches_image(model):
    obj = lens_objective(model, "hook_resid_post", token="mean", preprocess=IDENTITY)
    y = obj.target(torch.rand(1, 3, 16, 16))
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    obj.loss(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_unknown_hook_suggests_closest(model):
    with pytest.raises(KeyError, match="hook_resid_post"):
        lens_objective(model, "hook_resid_pots")


def test_bad_token_and_position(model):
    with pytest.raises(ValueError, match="unknown token"):
        lens_objective(model, "hook_resid_post", token="first")
    for bad in (40, -1):  # no negatives: one token, one name
        obj = lens_objective(model, "hook_resid_post", token=bad)
        with pytest.raises(IndexError, match=r"17 tokens \(valid: 0\.\.16\)"):
            obj.features(torch.zeros(1, 3, 16, 16))
    obj = lens_objective(model, "hook_logits", token="cls")
    with pytest.raises(ValueError, match="token='all'"):
        obj.features(torch.zeros(1, 3, 16, 16))


def test_plain_module_needs_hook_dict():
    with pytest.raises(TypeError, match="hook_dict"):
        lens_objective(nn.Linear(2, 2), "weight")


def test_list_hook_points(model):
    model.train()
    points = list_hook_points(model, (2, 3, 16, 16))
    assert points == [
        ("hook_embed", (2, 17, 8)),
        ("hook_mlp_post", (2, 17, 16)),
        ("hook_resid_post", (2, 17, 8)),
        ("hook_logits", (2, 5)),
    ]
    assert model.training and hook_count(model) == 0


def test_describe(model):
    d = lens_objective(model, "hook_resid_post", token="mean", index=[1, 2]).describe()
    assert (d["adapter"], d["hook"], d["token"], d["index"]) == (
        "lens",
        "hook_resid_post",
        "mean",
        "[1, 2]",
    )


def test_no_hooks_left_after_sampling_and_errors(model, pixel_prior):
    model.train()  # sampling warns, runs in eval mode and restores train mode
    model.mlp_in.weight.requires_grad_(False)
    before, count = model_state(model), hook_count(model)
    obj = lens_objective(
        model, "hook_resid_post", token="mean"
    )  # the CLS token never sees the image here
    refs = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="train mode"):
        result = fp.NDTMSampler(pixel_prior, obj, num_steps=3, inner_steps=1).sample(
            references=refs, n=1, progress=False
        )
    assert result.images.shape == (1, 1, 3, 16, 16)
    assert hook_count(model) == count and model_state(model) == before
    bad = lens_objective(model, "hook_resid_post", token=99)
    with pytest.raises(IndexError), pytest.warns(UserWarning):
        fp.NDTMSampler(pixel_prior, bad, num_steps=3, inner_steps=1).sample(
            references=refs, n=1, progress=False
        )
    assert hook_count(model) == count and model_state(model) == before


# ---------------------------------------------------------------------------- TransformerBridge
@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from transformer_lens.model_bridge import TransformerBridge

    cfg = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=10,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_vit")
    transformers.ViTForImageClassification(cfg).save_pretrained(path)
    return TransformerBridge.boot_transformers(str(path), device="cpu").eval()


@pytest.mark.parametrize(
    "hook, token, index",
    [
        ("blocks.1.hook_resid_post", "cls", None),  # alias of blocks.1.hook_out
        ("blocks.0.hook_resid_pre", "mean", [0, 5]),
        ("blocks.0.attn.hook_z", "cls", 1),  # converted to (B, tokens, heads, d_head)
        ("blocks.0.attn.hook_pattern", 0, None),  # query axis of (B, heads, q, k)
        ("blocks.1.mlp.hook_post", "max", None),
    ],
)
def test_bridge_values_match_run_with_cache(bridge, hook, token, index):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    _, cache = bridge.run_with_cache(x)
    axis = -2 if hook.endswith("hook_pattern") else 1
    act = reduce_tokens(cache[hook], token, axis)
    if index is not None:
        act = act[:, index]
    obj = lens_objective(bridge, hook, token=token, index=index, preprocess=IDENTITY)
    torch.testing.assert_close(obj.features(x), act.reshape(2, -1), rtol=1e-5, atol=1e-5)


def test_bridge_hooks_and_gradient(bridge, pixel_prior):
    before, count = model_state(bridge), hook_count(bridge)
    obj = lens_objective(bridge, "blocks.1.hook_resid_post", token="cls")
    refs = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fp.NDTMSampler(pixel_prior, obj, num_steps=3, inner_steps=1).sample(
        references=refs, n=1, progress=False
    )
    assert hook_count(bridge) == count and model_state(bridge) == before
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    obj.loss(x, obj.target(refs)).sum().backward()
    assert x.grad.abs().sum() > 0
    names = dict(list_hook_points(bridge, (1, 3, 16, 16)))
    assert names["blocks.0.attn.hook_z"] == (1, 17, 2, 16)
    assert hook_count(bridge) == count
