"""Every adapter through the one target grammar: no hook left and the model unchanged after a
sampling run and after a run that raises; plus grammar errors."""

from __future__ import annotations

import pytest
import torch

import fiber_plugins as fp
from fiber_plugins.adapters.sae import SparseAutoencoder
from fiber_plugins.objectives.units import UnitSet
from fiber_plugins.specs.targets import objective_from_spec

pytest.importorskip("transformer_lens", reason="transformer-lens not installed (extra 'lens')")
pytest.importorskip("crp", reason="zennit-crp not installed (extra 'zennit')")
pytest.importorskip("captum", reason="captum not installed (extra 'captum')")

from tests.helpers import hook_count, model_state  # noqa: E402

from .test_lens import TinyHookedViT  # noqa: E402


class MeanPooledViT(TinyHookedViT):
    """TinyHookedViT's head reads only the CLS token, which never sees the patches (no
    attention); this variant pools all tokens, so every target depends on the image."""

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        resid = self.hook_embed(torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1))
        post = self.hook_mlp_post(torch.nn.functional.gelu(self.mlp_in(self.ln(resid))))
        resid = self.hook_resid_post(resid + self.drop(self.mlp_out(post)))
        return self.hook_logits(self.head(resid.mean(1)))


SPECS = [
    "logits",
    "logits:2",
    "layer:mlp_in",
    "layer:patch:3",
    "hook:hook_resid_post:token=mean",
    "hook:hook_mlp_post:token=3",
    "crp:patch:1+4",
    "crp:patch:1,4",  # two units
    "crp:y:2",
    "captum:patch:neuron=(1,2,2)",
    "captum:mlp_out",
    "sae:hook_resid_post:feature=3:pre:token=mean",
    "sae:hook_resid_post:feature=all:token=max",
    "sae:hook_resid_post:feature=1-3:token=mean",  # three units
    "layer:patch:0,2",  # two units
]


@pytest.fixture
def model():
    m = MeanPooledViT()
    m.train()  # the user's model in train mode, with one frozen parameter
    m.head.bias.requires_grad_(False)
    return m


@pytest.fixture
def sae():
    torch.manual_seed(0)
    return SparseAutoencoder(d_in=8, d_sae=16)


@pytest.mark.parametrize("spec", SPECS)
def test_no_hook_left_and_model_unchanged(spec, model, sae, pixel_prior, references):
    before_hooks, before_flags = hook_count(model), model_state(model)
    objective = objective_from_spec(model, spec, sae=sae)
    sampler = fp.NDTMSampler(pixel_prior, objective, num_steps=2, inner_steps=1)
    with pytest.warns(UserWarning, match="train mode"):
        res = sampler.sample(references=references[:1], n=1, progress=False)
    assert torch.isfinite(res.fiber_loss).all()
    assert hook_count(model) == before_hooks and model_state(model) == before_flags

    def exploding(f, y):
        raise RuntimeError("raised inside sampling")

    objective.distance = exploding
    for _, term in objective.terms():
        term.distance = exploding
    with pytest.raises(RuntimeError, match="raised inside sampling"), pytest.warns(UserWarning):
        sampler.sample(references=references[:1], n=1, progress=False)
    assert hook_count(model) == before_hooks and model_state(model) == before_flags


@pytest.mark.parametrize("spec", SPECS)
def test_gradient_reaches_the_image(spec, model, sae):
    model.eval()
    objective = objective_from_spec(model, spec, sae=sae)
    rows = 1
    if isinstance(objective, UnitSet):  # one row per unit, as a sampler binds it
        rows = objective.num_units
        objective = objective.bind(list(range(rows)))
    y = objective.target(torch.rand(rows, 3, 16, 16) * 2 - 1)
    x = (torch.rand(rows, 3, 16, 16) * 2 - 1).requires_grad_(True)
    with objective.attached():
        loss = objective.loss(x, y)
    loss.sum().backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "spec, error, message",
    [
        ("pixels", ValueError, "valid forms"),
        ("layer:a:b:c", ValueError, "must be 'layer:NAME'"),
        ("hook:hook_resid_pots", KeyError, "hook_resid_post"),
        ("sae:hook_resid_post:feature=3", ValueError, "needs an SAE"),
        ("sae:hook_resid_post:feature=99", IndexError, "16"),
        ("captum:patch:neuron=(1,2", ValueError, "must be an int or a tuple"),
        ("hook:hook_resid_post:tokens=mean", ValueError, "unknown option 'tokens'"),
        ("crp:patch:99", IndexError, "out of range"),
    ],
)
def test_grammar_errors(spec, error, message, model, sae):
    use_sae = None if "needs an SAE" in message else sae
    with pytest.raises(error, match=message):
        obj = objective_from_spec(model.eval(), spec, sae=use_sae)
        obj.target(torch.zeros(1, 3, 16, 16))


def test_sae_width_mismatch(model):
    wrong = SparseAutoencoder(d_in=5, d_sae=4)
    with pytest.raises(ValueError, match="5"):
        obj = objective_from_spec(model.eval(), "sae:hook_resid_post:feature=1", sae=wrong)
        obj.target(torch.zeros(1, 3, 16, 16))


def test_target_without_gradient_path_is_refused(pixel_prior, references):
    """The CLS-only head of TinyHookedViT never sees the image: sampling would do nothing."""
    objective = objective_from_spec(TinyHookedViT().eval(), "logits")
    with pytest.raises(ValueError, match="does not depend on the image"):
        fp.NDTMSampler(pixel_prior, objective, num_steps=2, inner_steps=1).sample(
            references=references[:1], n=1, progress=False
        )
