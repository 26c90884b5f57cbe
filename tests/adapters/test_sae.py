"""SAE adapter: features equal each SAE kind's own encode; errors; pre-activations; hooks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import fiber_plugins as fp
from fiber_plugins.adapters.lens import reduce_tokens
from fiber_plugins.adapters.sae import SparseAutoencoder, sae_objective, sae_pre_activation
from fiber_plugins.objectives import IDENTITY
from tests.helpers import hook_count, model_state

D = 8  # token width of TokenNet


class TokenNet(nn.Module):
    """ViT-shaped plain torch model: 16x16 images -> CLS + 16 patch tokens of width 8."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.patch = nn.Conv2d(3, D, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, D) * 0.1)
        self.block = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))
        self.head = nn.Linear(D, 4)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], 1)
        tokens = self.block(tokens + tokens.mean(1, keepdim=True))  # mixing: CLS sees the image
        return self.head(tokens[:, 0])


def tokens_of(model, x):
    """The activation at model.block (B, 17, D), as the user would read it."""
    out = {}
    handle = model.block.register_forward_hook(lambda m, a, o: out.setdefault("v", o))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return out["v"]


def _params(d_in, d_sae, seed):
    g = torch.Generator().manual_seed(seed)
    return (
        nn.Parameter(torch.randn(d_in, d_sae, generator=g) * 0.5),
        nn.Parameter(torch.randn(d_sae, generator=g) * 0.1),
        nn.Parameter(torch.randn(d_sae, d_in, generator=g) * 0.5),
        nn.Parameter(torch.randn(d_in, generator=g) * 0.1),
    )


class PrismaStyleSAE(nn.Module):
    """Stand-in for vit-prisma's SparseAutoencoder (the PyPI vit-prisma has no SAE module).

    Same contract: ``encode(x, return_hidden_pre=False)`` returns ``(sae_in, feature_acts)`` or
    ``(sae_in, feature_acts, hidden_pre)``; ``cfg.d_in``, ``cfg.d_sae``, ``cfg.hook_point``.
    """

    def __init__(self, d_in=D, d_sae=12, seed=1):
        super().__init__()
        self.cfg = SimpleNamespace(d_in=d_in, d_sae=d_sae, hook_point="block")
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = _params(d_in, d_sae, seed)
        self.hook_hidden_pre = nn.Identity()

    def encode(self, x, return_hidden_pre=False):
        sae_in = x - self.b_dec
        hidden_pre = self.hook_hidden_pre(sae_in @ self.W_enc + self.b_enc)
        acts = torch.relu(hidden_pre)
        return (sae_in, acts, hidden_pre) if return_hidden_pre else (sae_in, acts)


class LensStyleSAE(nn.Module):
    """Stand-in for a SAELens TopK SAE: ``encode`` returns features; ``hook_sae_acts_pre``."""

    def __init__(self, d_in=D, d_sae=12, k=3, seed=2):
        super().__init__()
        meta = SimpleNamespace(hook_name="block")
        self.cfg = SimpleNamespace(d_in=d_in, d_sae=d_sae, metadata=meta)
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = _params(d_in, d_sae, seed)
        self.hook_sae_acts_pre = nn.Identity()
        self.k = k

    def process_sae_in(self, x):
        return x.to(self.W_enc.dtype) - self.b_dec

    def encode(self, x):
        hidden_pre = self.hook_sae_acts_pre(self.process_sae_in(x) @ self.W_enc + self.b_enc)
        top = hidden_pre.topk(self.k, dim=-1)
        return torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values.relu())


class BareSAE(nn.Module):
    """Only W_enc / b_enc / b_dec and encode: pre-activations come from the weights."""

    def __init__(self, d_in=D, d_sae=12, seed=4):
        super().__init__()
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = _params(d_in, d_sae, seed)

    def encode(self, x):
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)


def ours(d_in=D, d_sae=12, seed=3):
    torch.manual_seed(seed)
    sae = SparseAutoencoder(d_in, d_sae)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def own_features(sae, act):
    out = sae.encode(act)
    return out[1] if isinstance(out, tuple) else out


SAES = {"ours": ours, "prisma": PrismaStyleSAE, "saelens-style": LensStyleSAE, "bare": BareSAE}


@pytest.fixture
def model():
    return TokenNet().eval()


@pytest.mark.parametrize("kind", list(SAES))
@pytest.mark.parametrize(
    "token, features", [("cls", None), ("cls", 4), ("mean", [1, 5]), ("max", None), (7, [0, 11])]
)
def test_values_match_encode(model, kind, token, features):
    sae = SAES[kind]()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        want = reduce_tokens(own_features(sae, tokens_of(model, x)), token)
    if features is not None:
        want = want[:, [features] if isinstance(features, int) else features]
    obj = sae_objective(
        model, "block", sae, features=features, token_reduction=token, preprocess=IDENTITY
    )
    torch.testing.assert_close(obj.features(x), want.reshape(3, -1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(SAES))
def test_pre_activation_matches_and_has_gradient_where_inactive(model, kind):
    sae = SAES[kind]()
    with torch.no_grad():
        sae.b_enc[4] = -100.0  # feature 4 is inactive on every input
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        act = tokens_of(model, x)[:, 0]
        want = sae_pre_activation(sae, act)[:, 4:5]
        assert (own_features(sae, act)[:, 4] == 0).all()
    pre = sae_objective(model, "block", sae, 4, pre_activation=True, preprocess=IDENTITY)
    torch.testing.assert_close(pre.features(x), want, rtol=1e-5, atol=1e-5)
    post = sae_objective(model, "block", sae, 4, preprocess=IDENTITY)
    target = torch.full((1, 1), 1.0)
    grads = []
    for obj in (post, pre):
        xg = x.clone().requires_grad_(True)
        obj.loss(xg, target).sum().backward()
        grads.append(xg.grad.abs().sum().item())
    assert grads[0] == 0.0 and grads[1] > 0.0
    assert all(p.grad is None for p in sae.parameters())


def test_gradient_reaches_image(model):
    obj = sae_objective(model, "block", ours(), token_reduction="mean")
    y = obj.target(torch.rand(1, 3, 16, 16))
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    obj.loss(x, y).sum().backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", list(SAES))
def test_width_mismatch_quotes_both_widths(model, kind):
    sae = SAES[kind](d_in=6)
    obj = sae_objective(model, "block", sae)
    with pytest.raises(ValueError, match=r"SAE input width 6 .* width 8"):
        obj.target(torch.rand(1, 3, 16, 16))
    if kind in ("prisma", "saelens-style"):
        with pytest.raises(ValueError, match="trained on 'block'"):
            obj.target(torch.rand(1, 3, 16, 16))


@pytest.mark.parametrize("d_in", [D, 16])  # 8 = channels, 16 = 4 x 4 positions of the map
def test_conv_map_has_no_token_axis(model, d_in):
    """model.patch gives (B, 8, 4, 4): read as (B, 8, 16) it would encode channels as tokens."""
    obj = sae_objective(model, "patch", ours(d_in=d_in))
    with pytest.raises(ValueError) as err:
        obj.target(torch.rand(1, 3, 16, 16))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("layer 'patch' has output (B, 8, 4, 4): no token axis; ")
    assert "(B, tokens, d) or (B, d)" in message


def test_truncated_sae_weights_one_line(tmp_path):
    folder = ours().save(tmp_path / "sae")
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ValueError) as err:
        SparseAutoencoder.load(folder)
    message = str(err.value)
    assert "\n" not in message and str(weights) in message and "truncated or corrupt" in message


@pytest.mark.parametrize("features", [12, [0, 40], -13, -1, [3, -2]])
def test_feature_out_of_range_names_sae_size(model, features):
    with pytest.raises(IndexError, match="SAE with 12 features"):
        sae_objective(model, "block", ours(), features=features)


def test_bad_arguments(model):
    with pytest.raises(KeyError, match="'block'"):
        sae_objective(model, "blok", ours())
    with pytest.raises(TypeError, match="encode"):
        sae_objective(model, "block", nn.Linear(8, 12))
    with pytest.raises(ValueError, match="token='all'"):
        sae_objective(model, "head", ours(d_in=4)).target(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="unknown token"):
        sae_objective(model, "block", ours(), token_reduction="first")


def test_all_tokens_and_describe(model):
    sae = ours()
    obj = sae_objective(model, "block", sae, features=[2, 3], token_reduction="all")
    assert obj.features(torch.rand(2, 3, 16, 16)).shape == (2, 17 * 2)
    d = obj.describe()
    assert (d["adapter"], d["hook"], d["d_in"], d["d_sae"], d["pre_activation"]) == (
        "sae",
        "block",
        D,
        12,
        False,
    )


def test_save_load_round_trip(tmp_path):
    sae = ours()
    sae.save(tmp_path / "sae")
    assert {p.name for p in (tmp_path / "sae").iterdir()} == {"cfg.json", "sae_weights.safetensors"}
    back = SparseAutoencoder.load(tmp_path / "sae")
    x = torch.randn(5, D)
    torch.testing.assert_close(back.encode(x), sae.encode(x))
    torch.testing.assert_close(back(x), sae(x))
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        SparseAutoencoder.load(tmp_path)
    with pytest.raises(ValueError, match="positive int"):
        SparseAutoencoder(0, 4)


def test_no_hooks_left_after_sampling_and_errors(model, pixel_prior):
    sae = PrismaStyleSAE()
    model.block.train()
    model.head.weight.requires_grad_(False)
    before, count = model_state(model, sae), hook_count(model) + hook_count(sae)
    refs = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    obj = sae_objective(model, "block", sae, features=[1, 2, 3], pre_activation=True)
    fp.NDTMSampler(pixel_prior, obj, num_steps=3, inner_steps=1).sample(
        references=refs, n=1, progress=False
    )
    assert hook_count(model) + hook_count(sae) == count and model_state(model, sae) == before
    assert all(p.grad is None for p in sae.parameters())
    bad = sae_objective(model, "block", PrismaStyleSAE(d_in=5))
    with pytest.raises(ValueError, match="SAE input width 5"):
        fp.NDTMSampler(pixel_prior, bad, num_steps=3, inner_steps=1).sample(
            references=refs, n=1, progress=False
        )
    assert hook_count(model) + hook_count(sae) == count and model_state(model, sae) == before


def test_hooked_vit_hook_name(pixel_prior):
    pytest.importorskip("vit_prisma", reason="vit-prisma not installed (extra 'prisma')")
    from tests.adapters.test_prisma import tiny_vit

    vit = tiny_vit()
    sae = ours(d_in=32, d_sae=48)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        _, cache = vit.run_with_cache(x)
    want = sae.encode(cache["blocks.1.hook_resid_post"]).mean(1)[:, [3, 9]]
    obj = sae_objective(
        vit, "blocks.1.hook_resid_post", sae, [3, 9], token_reduction="mean", preprocess=IDENTITY
    )
    torch.testing.assert_close(obj.features(x), want, rtol=1e-5, atol=1e-6)
    # hook_z: heads x d_head are joined to the SAE's input width (2 x 16 = 32)
    want = sae.encode(cache["blocks.0.attn.hook_z"].flatten(2))[:, 0]
    obj = sae_objective(vit, "blocks.0.attn.hook_z", sae, preprocess=IDENTITY)
    torch.testing.assert_close(obj.features(x), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError, match="hook_resid_post"):
        sae_objective(vit, "blocks.1.hook_resid_pots", sae)


def saelens_overlay() -> Path:
    """Where `make test` installs the real sae-lens with a transformer-lens 3.x (see the Makefile)."""
    return Path(
        os.environ.get("FIBER_PLUGINS_SAELENS_OVERLAY", Path(sys.prefix) / "saelens-overlay")
    )


def test_saelens_sae(tmp_path):
    """The adapter on real SAELens SAEs (tests/adapters/_saelens_check.py).

    sae-lens needs transformer-lens<4, so next to transformer-lens 4.x it runs from the overlay
    folder in a subprocess, whose PYTHONPATH puts the overlay's transformer_lens first.
    """
    from tests.adapters import _saelens_check

    try:
        import sae_lens
    except Exception as err:  # not installed, or installed next to transformer-lens 4.x
        direct_error = f"{type(err).__name__}: {err}"
    else:
        result = _saelens_check.check(sae_lens, tmp_path)
        assert result["grad_abs_sum"] > 0
        return
    overlay = saelens_overlay()
    if not (overlay / "sae_lens").is_dir():
        pytest.skip(
            f"sae_lens does not import here ({direct_error}; its releases need "
            f"transformer-lens<4) and there is no overlay at {overlay}: run `make test`, "
            "which installs it"
        )
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = os.pathsep.join(
        [str(overlay), str(root)] + [p for p in [env.get("PYTHONPATH")] if p]
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tests.adapters._saelens_check"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"SAELens check failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_saelens_check.PREFIX)]
    assert lines, f"no result from the SAELens check:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    result = json.loads(lines[-1][len(_saelens_check.PREFIX) :])
    # the real package from the overlay, with its transformer-lens < 4 shadowing the venv's
    assert Path(result["sae_lens_file"]).resolve().is_relative_to(overlay.resolve())
    assert Path(result["transformer_lens_file"]).resolve().is_relative_to(overlay.resolve())
    assert int(result["transformer_lens"].split(".")[0]) < 4
    assert sorted(result["diff"]) == sorted(_saelens_check.COMPARED)
    assert all(d <= 1e-5 for d in result["diff"].values()), result["diff"]
    assert result["grad_abs_sum"] > 0 and result["topk_inactive_pre_grad_abs_sum"] > 0
    assert not result["sae_param_grads"]


class PrismaGatedSAE(PrismaStyleSAE):
    """vit-prisma's gated SAE contract: encode(x) -> (sae_in, feature_acts), a gate bias b_gate."""

    def __init__(self, d_in=D, d_sae=12, seed=5):
        super().__init__(d_in, d_sae, seed)
        self.b_gate = nn.Parameter(torch.zeros(d_sae))
        self.r_mag = nn.Parameter(torch.zeros(d_sae))

    def encode(self, x):
        sae_in = x - self.b_dec
        gate = (sae_in @ self.W_enc + self.b_gate > 0).to(x.dtype)
        return sae_in, gate * torch.relu(sae_in @ (self.W_enc * self.r_mag.exp()) + self.b_enc)


def test_gated_pre_activation_is_the_gate(model):
    sae = PrismaGatedSAE()
    with torch.no_grad():
        sae.b_gate[2] = -100.0  # gate closed: feature 2 is off everywhere
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        act = tokens_of(model, x)[:, 0]
        assert (own_features(sae, act)[:, 2] == 0).all()
    pre = sae_objective(model, "block", sae, 2, pre_activation=True, preprocess=IDENTITY)
    torch.testing.assert_close(
        pre.features(x), ((act - sae.b_dec) @ sae.W_enc + sae.b_gate)[:, 2:3].detach()
    )
    xg = x.clone().requires_grad_(True)
    pre.loss(xg, torch.ones(1, 1)).sum().backward()
    assert xg.grad.abs().sum() > 0
