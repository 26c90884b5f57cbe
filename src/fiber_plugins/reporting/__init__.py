"""Pictures and pages made from fiber results."""

from .grid import fiber_grid, save_grid, to_uint8

__all__ = ["fiber_grid", "save_grid", "to_uint8"]
