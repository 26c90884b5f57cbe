"""vit-prisma adapter: HookedViT hook values equal run_with_cache; hooks and flags restored."""

from __future__ import annotations

import pytest
import torch

import fiber_plugins as fp
from fiber_plugins.objectives import IDENTITY
from tests.helpers import hook_count, model_state

pytest.importorskip("vit_prisma", reason="vit-prisma not installed (extra 'prisma')")
from vit_prisma.configs.HookedViTConfig import HookedViTConfig  # noqa: E402
from vit_prisma.models.base_vit import HookedViT  # noqa: E402

from fiber_plugins.adapters.lens import reduce_tokens  # noqa: E402
from fiber_plugins.adapters.prisma import prisma_objective  # noqa: E402


def tiny_vit(seed=0, **kw):
    cfg = HookedViTConfig(
        n_layers=2,
        d_model=32,
        d_head=16,
        n_heads=2,
        d_mlp=64,
        image_size=16,
        patch_size=4,
        n_channels=3,
        n_classes=10,
        return_type="class_logits",
        **kw,
    )
    torch.manual_seed(seed)
    model = HookedViT(cfg)
    # HookedViT leaves attention / MLP / head weights as torch.empty at random init
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
    return model.eval()


@pytest.fixture(scope="module")
def vit():
    return tiny_vit()


@pytest.mark.parametrize(
    "hook, token, index",
    [
        ("blocks.1.hook_resid_post", "cls", None),
        ("blocks.0.hook_resid_mid", "mean", [3, 7]),
        ("blocks.0.attn.hook_z", "cls", 1),  # (B, tokens, heads, d_head) -> head 1
        ("blocks.1.attn.hook_pattern", 0, None),  # query axis of (B, heads, q, k)
        ("blocks.1.mlp.hook_post", "max", (5,)),
        ("hook_embed", 3, None),
    ],
)
def test_values_match_run_with_cache(vit, hook, token, index):
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        _, cache = vit.run_with_cache(x)
    axis = -2 if hook.endswith("hook_pattern") else 1
    act = reduce_tokens(cache[hook], token, axis)
    if index is not None:
        act = act[:, index]
    obj = prisma_objective(vit, hook, token=token, index=index, preprocess=IDENTITY)
    torch.testing.assert_close(obj.features(x), act.reshape(2, -1), rtol=1e-5, atol=1e-6)


def test_gradient_reaches_image(vit):
    obj = prisma_objective(vit, "blocks.1.hook_resid_post", preprocess=IDENTITY)
    y = obj.target(torch.rand(1, 3, 16, 16) * 2 - 1)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    obj.loss(x, y).sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None and p.requires_grad for p in vit.parameters())


def test_unknown_hook_names_closest(vit):
    with pytest.raises(KeyError, match=r"blocks\.1\.hook_resid_post"):
        prisma_objective(vit, "blocks.1.hook_resid_pots")
    with pytest.raises(KeyError, match="closest"):
        prisma_objective(vit, "blocks.7.hook_resid_post")


def test_cls_token_checks(vit):
    with pytest.raises(ValueError, match="patch embeddings"):
        prisma_objective(vit, "hook_embed", token="cls")
    gaap = tiny_vit(classification_type="gaap")
    with pytest.raises(ValueError, match="no CLS token"):
        prisma_objective(gaap, "blocks.0.hook_resid_post", token="cls")
    prisma_objective(gaap, "blocks.0.hook_resid_post", token="mean")


def test_no_hooks_left_after_sampling_and_errors(pixel_prior):
    vit = tiny_vit()
    vit.blocks[0].train()
    vit.head.W_H.requires_grad_(False)
    before, count = model_state(vit), hook_count(vit)
    refs = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    obj = prisma_objective(vit, "blocks.1.hook_resid_post", token="mean")
    result = fp.NDTMSampler(pixel_prior, obj, num_steps=3, inner_steps=1).sample(
        references=refs, n=1, progress=False
    )
    assert torch.isfinite(result.fiber_loss).all()
    assert hook_count(vit) == count and model_state(vit) == before
    bad = prisma_objective(vit, "blocks.1.hook_resid_post", index=99)
    with pytest.raises(IndexError, match="size 32"):
        fp.NDTMSampler(pixel_prior, bad, num_steps=3, inner_steps=1).sample(
            references=refs, n=1, progress=False
        )
    assert hook_count(vit) == count and model_state(vit) == before
