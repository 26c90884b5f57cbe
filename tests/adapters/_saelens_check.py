"""The real-SAELens check behind ``test_sae.py::test_saelens_sae``, in-process or as a script.

Every sae-lens release requires transformer-lens<4 (``sae_lens`` imports
``transformer_lens.HookedTransformer`` at import time), so ``import sae_lens`` fails next to the
transformer-lens 4.x of the ``lens`` extra. ``make test`` therefore installs the pinned sae-lens
and a transformer-lens 3.x into the folder ``.venv/saelens-overlay`` (see the Makefile), and the
test runs this file in a subprocess of the same interpreter::

    PYTHONPATH=.venv/saelens-overlay python -m tests.adapters._saelens_check

where the overlay's ``transformer_lens`` shadows 4.x (the venv itself is untouched). It prints one
JSON line (``RESULT {...}``) saying what was compared; any mismatch raises (non-zero exit).
"""

from __future__ import annotations

import json
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import torch

TOL = {"rtol": 1e-5, "atol": 1e-6}
PREFIX = "RESULT "
COMPARED = ("standard_mean", "standard_pre", "topk_cls", "topk_pre", "save_load")


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())


def check(sae_lens, tmp_path: Path) -> dict:
    """Compare sae_objective with real SAELens SAEs on TokenNet; return what was measured."""
    from fiber_plugins.adapters.sae import SparseAutoencoder, sae_objective
    from fiber_plugins.objectives import IDENTITY
    from tests.adapters.test_sae import D, TokenNet, tokens_of

    model = TokenNet().eval()
    out: dict = {
        "sae_lens": metadata.version("sae-lens"),
        "sae_lens_file": sae_lens.__file__,
        "transformer_lens": metadata.version("transformer-lens"),
        "transformer_lens_file": sys.modules["transformer_lens"].__file__,
        "diff": {},
    }

    # a standard ReLU SAE: features (mean over tokens) and pre-activations (CLS)
    torch.manual_seed(0)
    sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D, d_sae=12))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    act = tokens_of(model, x)
    with torch.no_grad():
        want = sae.encode(act).mean(1)
        want_pre = ((act - sae.b_dec) @ sae.W_enc + sae.b_enc)[:, 0]
    obj = sae_objective(model, "block", sae, token_reduction="mean", preprocess=IDENTITY)
    got = obj.features(x)
    torch.testing.assert_close(got, want, **TOL)
    out["diff"]["standard_mean"] = _max_diff(got, want)
    pre = sae_objective(model, "block", sae, pre_activation=True, preprocess=IDENTITY)
    got = pre.features(x)
    torch.testing.assert_close(got, want_pre, **TOL)
    out["diff"]["standard_pre"] = _max_diff(got, want_pre)

    # the fiber loss on the real SAE's features has a gradient at the image, none in the SAE
    target = obj.target(torch.rand(1, 3, 16, 16) * 2 - 1)
    xg = x.clone().requires_grad_(True)
    obj.loss(xg, target).sum().backward()
    out["grad_abs_sum"] = float(xg.grad.abs().sum())
    out["sae_param_grads"] = any(p.grad is not None for p in sae.parameters())
    assert out["grad_abs_sum"] > 0, "no gradient reached the image"
    assert not out["sae_param_grads"], "gradient accumulated in the SAE's parameters"

    # a TopK SAE: CLS features, and the pre-activation read from hook_sae_acts_pre
    torch.manual_seed(1)
    topk = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D, d_sae=12, k=3))
    with torch.no_grad():
        topk.b_enc.normal_(0, 0.1)
        topk.b_enc[4] = -100.0  # feature 4 never makes the top 3
        topk.b_dec.normal_(0, 0.1)
        want = topk.encode(act[:, 0])
        want_pre = (act[:, 0] - topk.b_dec) @ topk.W_enc + topk.b_enc
    assert (want[:, 4] == 0).all() and int((want > 0).sum(-1).max()) <= 3
    got = sae_objective(model, "block", topk, preprocess=IDENTITY).features(x)
    torch.testing.assert_close(got, want, **TOL)
    out["diff"]["topk_cls"] = _max_diff(got, want)
    pre4 = sae_objective(model, "block", topk, 4, pre_activation=True, preprocess=IDENTITY)
    got = pre4.features(x)
    torch.testing.assert_close(got, want_pre[:, 4:5], **TOL)
    out["diff"]["topk_pre"] = _max_diff(got, want_pre[:, 4:5])
    xg = x.clone().requires_grad_(True)
    pre4.loss(xg, torch.zeros(1, 1)).sum().backward()
    out["topk_inactive_pre_grad_abs_sum"] = float(xg.grad.abs().sum())
    assert out["topk_inactive_pre_grad_abs_sum"] > 0, "no pre-activation gradient at the image"

    # SAELens' save_model folder loads into our SparseAutoencoder
    sae.save_model(tmp_path / "lens_sae")
    back = SparseAutoencoder.load(tmp_path / "lens_sae")
    with torch.no_grad():
        got, want = back.encode(act), sae.encode(act)
    torch.testing.assert_close(got, want)
    out["diff"]["save_load"] = _max_diff(got, want)
    assert sorted(out["diff"]) == sorted(COMPARED)
    return out


def main() -> None:
    import sae_lens

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = check(sae_lens, Path(tmp))
    print(PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
