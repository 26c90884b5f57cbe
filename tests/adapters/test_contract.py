"""The adapter contract, run over every adapter (in the style of diffusers' shared scheduler tests).

For each adapter (a plain FiberObjective on a layer / its input / the output, a weighted sum,
Captum, SAE, timm, zennit-crp, transformer-lens, vit-prisma, Hugging Face transformers and
Qwen2-VL's vision tower, OpenCLIP), on a model left in a mixed train/eval state with one
frozen parameter:

* inside ``attached()`` the model is in eval mode without parameter gradients; after it, and
  after an exception raised in the block or in the model's own forward, no hook is left and
  every train flag and ``requires_grad`` is as it was;
* a short sampling run, and one that raises, leave the same state;
* the gradient of the fiber loss reaches the input image (finite, non-zero) and no parameter
  gets one;
* save/load: ``describe()`` survives the JSON of a run folder, is the same for the objective
  built again (so a run resumes), the run folder reads back with it, and a rebuilt objective
  resumes the run; the SAE's own save/load gives the same features.

An adapter whose toolkit is not installed is skipped (``pytest.importorskip``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import fiber_plugins as fp
from fiber_plugins.objectives import FiberObjective, Preprocess
from fiber_plugins.samplers import FiberResult
from tests.conftest import TinySubject
from tests.helpers import hook_count, model_state

pytestmark = pytest.mark.filterwarnings("ignore:.*train mode:UserWarning")


@dataclass
class Case:
    """An objective built by one adapter on a fresh model."""

    model: nn.Module  # the user's model: its hooks and state must be given back
    objective: FiberObjective
    breaks: nn.Module  # a submodule on the path to phi: its forward is made to raise
    others: tuple[nn.Module, ...] = ()  # further modules the objective freezes (an SAE)

    @property
    def modules(self) -> tuple[nn.Module, ...]:
        return (self.model, *self.others)


def mixed(model: nn.Module) -> nn.Module:
    """Train mode with the first child in eval mode and the last parameter frozen: a state
    the objective must give back exactly."""
    model.train()
    next(model.children()).eval()
    list(model.parameters())[-1].requires_grad_(False)
    return model


# ---------------------------------------------------------------------------- the adapters
def plain_layer() -> Case:
    m = mixed(TinySubject())
    obj = fp.FiberObjective(m, layer="conv2", index=1, reduction="spatial_mean")
    return Case(m, obj, m.conv1)


def plain_layer_input() -> Case:
    m = mixed(TinySubject())
    return Case(m, fp.FiberObjective(m, layer="fc", capture="input"), m.conv2)


def plain_output() -> Case:
    m = mixed(TinySubject())
    return Case(m, fp.FiberObjective(m, index=[1, 4]), m.conv1)


def weighted_sum() -> Case:
    m = mixed(TinySubject())
    obj = fp.FiberObjective(m, layer="conv2", reduction="spatial_mean") + 0.5 * fp.FiberObjective(
        m, index=2
    )
    return Case(m, obj, m.conv1)


def captum_neuron() -> Case:
    # building and using a Captum-style objective needs torch alone (no Captum import)
    from fiber_plugins.adapters.captum import captum_objective

    m = mixed(TinySubject())
    return Case(m, captum_objective(m, layer="conv2", neuron_selector=(0, slice(None))), m.conv1)


def captum_target() -> Case:
    from fiber_plugins.adapters.captum import captum_objective

    m = mixed(TinySubject())
    return Case(m, captum_objective(m.forward, target=1), m.conv1)


def sae() -> Case:
    from fiber_plugins.adapters.sae import SparseAutoencoder, sae_objective
    from tests.adapters.test_sae import TokenNet

    m = mixed(TokenNet())
    torch.manual_seed(0)
    auto = SparseAutoencoder(d_in=8, d_sae=12).train()
    obj = sae_objective(
        m, "block", auto, features=[1, 2, 3], pre_activation=True, token_reduction="mean"
    )
    return Case(m, obj, m.patch, others=(auto,))


def timm_case(kind: str) -> Callable[[], Case]:
    def build() -> Case:
        timm = pytest.importorskip("timm", reason="timm not installed (extra 'timm')")
        from fiber_plugins.adapters.timm import timm_objective

        torch.manual_seed(0)
        m = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            num_classes=10,
            img_size=32,
            patch_size=8,
            depth=2,
        )
        mixed(m)
        obj = timm_objective(m, kind, layer_index=1 if kind == "intermediate" else None)
        return Case(m, obj, m.blocks[0])

    return build


def crp() -> Case:
    pytest.importorskip("zennit", reason="zennit not installed (extra 'zennit')")
    pytest.importorskip("crp", reason="zennit-crp not installed (extra 'zennit')")
    from fiber_plugins.adapters.crp import crp_objective

    m = mixed(TinySubject())
    return Case(m, crp_objective(m, {"conv2": [1, 2], "y": [0]}), m.conv1)


def lens() -> Case:
    pytest.importorskip("transformer_lens", reason="transformer-lens not installed (extra 'lens')")
    from fiber_plugins.adapters.lens import lens_objective
    from tests.adapters.test_lens import TinyHookedViT

    m = mixed(TinyHookedViT())
    # token='mean': the CLS token of TinyHookedViT never sees the patches
    return Case(m, lens_objective(m, "hook_resid_post", token="mean"), m.mlp_in)


def prisma() -> Case:
    pytest.importorskip("vit_prisma", reason="vit-prisma not installed (extra 'prisma')")
    from fiber_plugins.adapters.prisma import prisma_objective
    from tests.adapters.test_prisma import tiny_vit

    m = mixed(tiny_vit())
    return Case(m, prisma_objective(m, "blocks.1.hook_resid_post", token="mean"), m.blocks[0])


def hf_case(output: str, token=None) -> Callable[[], Case]:
    def build() -> Case:
        tf = pytest.importorskip("transformers", reason="transformers not installed (extra 'hf')")
        from fiber_plugins.adapters.hf import hf_objective

        torch.manual_seed(0)
        config = tf.ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
        m = mixed(tf.ViTModel(config))
        pre = Preprocess(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        obj = hf_objective(m, output, token=token, preprocess=pre)
        return Case(m, obj, m.embeddings)

    return build


def qwen2_vl_case(output: str) -> Callable[[], Case]:
    def build() -> Case:
        tf = pytest.importorskip("transformers", reason="transformers not installed (extra 'hf')")
        from transformers.models.qwen2_vl.modeling_qwen2_vl import (
            Qwen2VisionTransformerPretrainedModel,
        )

        from fiber_plugins.adapters.hf import Qwen2VLPreprocess, qwen2_vl_objective

        torch.manual_seed(0)
        config = tf.Qwen2VLVisionConfig(
            depth=2, embed_dim=32, num_heads=2, hidden_size=32, mlp_ratio=2
        )
        m = mixed(Qwen2VisionTransformerPretrainedModel(config))
        # 16x16 images: smart-resized to 56x56 (min_pixels), 16 patches, 4 merged tokens
        pre = Qwen2VLPreprocess(max_pixels=112 * 112)
        return Case(m, qwen2_vl_objective(m, pre, output, token="mean"), m.patch_embed)

    return build


def open_clip_case(**kwargs) -> Callable[[], Case]:
    def build() -> Case:
        oc = pytest.importorskip("open_clip", reason="open_clip not installed (extra 'openclip')")
        from fiber_plugins.adapters.open_clip import open_clip_objective

        torch.manual_seed(0)
        vision = {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8}
        text = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
        m = mixed(oc.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text))
        obj = open_clip_objective(m, preprocess=Preprocess(size=32), **kwargs)
        return Case(m, obj, m.visual.conv1)

    return build


ADAPTERS: dict[str, Callable[[], Case]] = {
    "layer": plain_layer,
    "layer-input": plain_layer_input,
    "output": plain_output,
    "weighted-sum": weighted_sum,
    "captum-neuron": captum_neuron,
    "captum-target": captum_target,
    "sae": sae,
    **{f"timm-{k}": timm_case(k) for k in ("logits", "embedding", "features", "intermediate")},
    "crp": crp,
    "lens": lens,
    "prisma": prisma,
    "hf-pooler": hf_case("pooler_output"),
    "hf-hidden": hf_case("hidden_states.1", token="mean"),
    "hf-qwen2_vl-embeddings": qwen2_vl_case("embeddings"),
    "hf-qwen2_vl-hidden": qwen2_vl_case("hidden_states.1"),
    "open_clip-embedding": open_clip_case(normalize=True),
    "open_clip-layer": open_clip_case(layer="visual.transformer.resblocks.0", token="mean"),
}


def test_every_adapter_module_has_a_case():
    import pkgutil

    import fiber_plugins.adapters as adapters

    # public adapter modules and packages (private helpers such as _common are not adapters)
    modules = {
        m.name for m in pkgutil.iter_modules(adapters.__path__) if not m.name.startswith("_")
    }
    covered = {name.split("-")[0] for name in ADAPTERS}
    assert modules <= covered, f"add a case to ADAPTERS for {sorted(modules - covered)}"


@pytest.fixture(params=list(ADAPTERS))
def build(request) -> Callable[[], Case]:
    return ADAPTERS[request.param]


@pytest.fixture
def case(build) -> Case:
    return build()


def _images(n: int, seed: int) -> torch.Tensor:
    """Prior-space images in [-1, 1]."""
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _snapshot(case: Case):
    return hook_count(*case.modules), model_state(*case.modules)


def _sampler(prior, objective):
    return fp.NDTMSampler(prior, objective, num_steps=2, inner_steps=1)


def _explode(objective: FiberObjective) -> None:
    def exploding(f, y):
        raise RuntimeError("raised inside sampling")

    objective.distance = exploding
    for _, term in objective.terms():
        term.distance = exploding


def _as_stored(d: dict) -> dict:
    """What a run folder's run.json gives back."""
    return json.loads(json.dumps(d, default=str))


# ---------------------------------------------------------------------------- hooks and state
def test_attached_freezes_the_model_and_gives_its_state_back(case):
    before = _snapshot(case)
    with case.objective.attached():
        for module in case.modules:
            assert not any(m.training for m in module.modules())
            assert not any(p.requires_grad for p in module.parameters())
        feats = case.objective.features(_images(2, 0))
    assert all(torch.isfinite(f).all() for f in (feats if isinstance(feats, tuple) else (feats,)))
    assert _snapshot(case) == before


def test_no_hook_left_after_an_exception(case, monkeypatch):
    before = _snapshot(case)
    with pytest.raises(RuntimeError, match="raised inside attached"):
        with case.objective.attached():
            case.objective.features(_images(1, 0))
            raise RuntimeError("raised inside attached")
    assert _snapshot(case) == before

    def boom(*args, **kwargs):
        raise RuntimeError("forward failed")

    monkeypatch.setattr(case.breaks, "forward", boom)  # raises inside the model's forward
    with pytest.raises(RuntimeError, match="forward failed"):
        case.objective.features(_images(1, 0))
    with pytest.raises(RuntimeError, match="forward failed"):
        with case.objective.attached():
            case.objective.loss(_images(1, 0), case.objective.target(_images(1, 1)))
    assert _snapshot(case) == before


def test_sampling_leaves_no_hook_and_the_state_as_it_was(case, pixel_prior, references):
    before = _snapshot(case)
    res = _sampler(pixel_prior, case.objective).sample(
        references=references[:1], n=1, progress=False
    )
    assert torch.isfinite(res.fiber_loss).all() and not res.failed.any()
    assert _snapshot(case) == before
    _explode(case.objective)
    with pytest.raises(RuntimeError, match="raised inside sampling"):
        _sampler(pixel_prior, case.objective).sample(references=references[:1], n=1, progress=False)
    assert _snapshot(case) == before


# ---------------------------------------------------------------------------- gradient
def test_gradient_of_the_fiber_loss_reaches_the_input(case):
    obj = case.objective
    y = obj.target(_images(1, 1))
    x = _images(2, 2).requires_grad_(True)
    with obj.attached():
        loss = obj.loss(x, y)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    for module in case.modules:
        assert all(p.grad is None for p in module.parameters())


# ---------------------------------------------------------------------------- save / load
def test_describe_survives_json_and_is_the_same_when_built_again(case, build):
    d = case.objective.describe()
    assert isinstance(d, dict) and d
    assert _as_stored(_as_stored(d)) == _as_stored(d)
    assert _as_stored(build().objective.describe()) == _as_stored(d)
    for _, term in case.objective.terms():  # each term's preprocessing rebuilds from its record
        stored = _as_stored(term.describe())["preprocess"]
        assert _as_stored(Preprocess(**stored).to_dict()) == stored


def test_run_folder_round_trip_and_resume_with_the_objective_built_again(
    case, build, pixel_prior, references, tmp_path
):
    run = tmp_path / "run"
    res = _sampler(pixel_prior, case.objective).sample(
        references=references[:1], n=2, progress=False, out=run
    )
    back = FiberResult.load(run)
    assert back.config["objective"] == _as_stored(case.objective.describe())
    torch.testing.assert_close(back.images, res.images)
    torch.testing.assert_close(back.fiber_loss, res.fiber_loss)
    again = build()
    before = _snapshot(again)
    resumed = _sampler(pixel_prior, again.objective).sample(
        references=references[:1], n=2, progress=False, out=run, resume=True
    )
    assert torch.equal(resumed.images, res.images)
    assert _snapshot(again) == before


def test_sae_save_load_gives_the_same_features(tmp_path):
    from fiber_plugins.adapters.sae import SparseAutoencoder, sae_objective

    case = sae()
    auto = case.others[0]
    back = SparseAutoencoder.load(auto.save(tmp_path / "sae"))
    rebuilt = sae_objective(
        case.model, "block", back, features=[1, 2, 3], pre_activation=True, token_reduction="mean"
    )
    x = _images(2, 0)
    torch.testing.assert_close(rebuilt.features(x), case.objective.features(x))
    assert _as_stored(rebuilt.describe()) == _as_stored(case.objective.describe())
