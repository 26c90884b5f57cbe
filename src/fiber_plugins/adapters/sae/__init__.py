"""Sparse-autoencoder features as fiber objectives, and a small SAE to train or load.

phi(x) = SAE features of the activation at one hook (or layer) of the subject model, reduced over
tokens and restricted to the chosen features: :func:`sae_objective`. The SAE is used duck-typed,
so three kinds work without any of their packages being imported here.

The SAE contract
----------------
``encode(x)`` maps activations (..., d_in) to features (..., d_sae) and returns either

* a tensor of feature activations: :class:`SparseAutoencoder` below and SAELens ``SAE`` objects
  (``sae_lens.SAE.encode``), or
* a tuple ``(sae_in, feature_acts)`` or ``(sae_in, feature_acts, hidden_pre)``: vit-prisma's
  ``SparseAutoencoder.encode`` (``vit_prisma.sae``; ``encode(x, return_hidden_pre=True)`` gives
  the three-tuple). The features are element 1.

The widths come from ``cfg.d_in`` / ``cfg.d_sae``, ``d_in`` / ``d_sae`` attributes, or the shape of
``W_enc`` (d_in, d_sae). For ``pre_activation=True`` the pre-activation (the encoder output before
ReLU / TopK / JumpReLU) is taken from, in this order: a ``pre_activation(x)`` method; vit-prisma's
``encode(x, return_hidden_pre=True)``; the hook point SAELens (``hook_sae_acts_pre``) or vit-prisma
(``hook_hidden_pre``) runs it through inside ``encode``; else ``(x - b_dec) @ W_enc + b_enc``
(``+ b_gate``, the gate, for a gated SAE; the input through SAELens' ``process_sae_in`` or
vit-prisma's ``run_time_activation_norm_fn_in`` where the SAE has them).

Why pre-activations: a ReLU or TopK feature that is inactive on the current image has zero
gradient, so a fiber loss on that feature cannot move the image towards activating it. Matching
the pre-activation is a stricter target (it also fixes how far below threshold an inactive
feature sits) that always has a gradient.

Examples
--------
>>> _, cache = model.run_with_cache(images)                          # doctest: +SKIP
>>> sae.encode(cache["blocks.5.hook_resid_post"])[:, 0, 1234]        # what the user has
>>> obj = sae_objective(model, "blocks.5.hook_resid_post", sae, features=1234, token="cls")
"""

from .contract import sae_features, sae_pre_activation, sae_widths
from .model import CONFIG_FILE, WEIGHTS_FILE, SparseAutoencoder
from .objective import SAEObjective, sae_objective

__all__ = [
    "SparseAutoencoder",
    "SAEObjective",
    "sae_objective",
    "sae_features",
    "sae_pre_activation",
    "sae_widths",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
]
