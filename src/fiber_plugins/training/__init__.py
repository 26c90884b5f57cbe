"""Training: the conditional fiber model's trainer and the one training loop every trainer uses.

- :func:`train_fiber_model` (:mod:`.conditional`): train a
  :class:`~fiber_plugins.priors.ConditionalFiberModel` p(x | phi(x)) with the fiber loss;
- :func:`train_loop` and :func:`cosine_lr` (:mod:`.loop`): optimiser, warm-up + cosine schedule,
  gradient clipping, EMA, progress bar, a :class:`TrainingRecord` and checkpoint / resume
  (``checkpoint=FOLDER``: safetensors + JSON, no pickle); the shipped models' trainers
  (:mod:`fiber_plugins.zoo.training`, :mod:`fiber_plugins.zoo.prior_training`) run on it too.
"""

from .conditional import train_fiber_model
from .loop import TrainingRecord, cosine_lr, train_loop  # noqa: F401 (tests)

__all__ = ["train_fiber_model", "train_loop", "TrainingRecord"]
