"""The shared helpers every layer uses: value ranges, module devices, and frozen()."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fiber_plugins._utils import frozen, module_device, to_model_range, to_unit_range
from tests.helpers import model_state


def test_value_ranges_are_inverse_and_exact_at_the_ends():
    x01 = torch.tensor([0.0, 0.25, 0.5, 1.0])
    assert to_model_range(x01).tolist() == [-1.0, -0.5, 0.0, 1.0]
    assert to_unit_range(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0.0, 0.5, 1.0]
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(to_unit_range(to_model_range(x)), x)
    half = x.half()
    assert to_model_range(half).dtype == torch.float16  # dtype kept, no clamping
    assert to_unit_range(torch.tensor([3.0])).item() == 2.0


def test_module_device():
    assert module_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert module_device(nn.ReLU(), default="meta") == torch.device("meta")  # no parameters
    assert module_device(lambda x: x) == torch.device("cpu")  # a plain function


def _model():
    m = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.Linear(2, 2))
    m.train()
    m[1].eval()  # mixed flags, restored one by one
    m[2].weight.requires_grad_(False)
    return m


@pytest.mark.parametrize("raises", [False, True])
def test_frozen_restores_every_flag(raises):
    m = _model()
    before = model_state(m)

    def body():
        with frozen(m) as same:
            assert same is m
            assert not any(x.training for x in m.modules())
            assert not any(p.requires_grad for p in m.parameters())
            if raises:
                raise RuntimeError("boom")

    if raises:
        with pytest.raises(RuntimeError, match="boom"):
            body()
    else:
        body()
    assert model_state(m) == before


def test_frozen_options_and_nesting():
    m = _model()
    before = model_state(m)
    with frozen(m, eval=False):
        assert model_state(m)[0] == before[0] and not any(model_state(m)[1])
    with frozen(m, requires_grad=None):
        assert model_state(m)[1] == before[1] and not any(model_state(m)[0])
    with frozen(m, eval=False, requires_grad=True):
        assert all(model_state(m)[1])
        with frozen(m):
            assert not any(model_state(m)[1])
        assert all(model_state(m)[1])
    assert model_state(m) == before
    fn = lambda x: x  # noqa: E731
    with frozen(fn) as same:  # not a module: passed through
        assert same is fn


def test_median_is_numpys_for_even_and_odd_counts():
    """The reported "median fiber loss" is the usual median (torch.median takes the lower of
    the two middle values): what numpy, the atlas and a reader compute."""
    import math

    import numpy as np

    from fiber_plugins._utils import median

    for values in ([2.011e-4, 3.9e-4], [1.0, 4.0, 2.0, 3.0], [5.0, 1.0, 3.0], [7.0]):
        t = torch.tensor(values)
        assert median(t) == pytest.approx(float(np.median(t.numpy())), rel=1e-6)
    assert median(torch.tensor([[1.0, 2.0], [3.0, 10.0]])) == 2.5  # all values, any shape
    assert math.isnan(median(torch.tensor([])))
