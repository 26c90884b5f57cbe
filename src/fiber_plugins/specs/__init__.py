"""The string grammar shared by the command line, plans and Python: subjects
(``timm:NAME``, ``hf:FOLDER``, ``open_clip:ARCH``, ``module:pkg.mod:factory``, ``zoo:NAME``) and
targets (``layer:layer4:1656``, ``layer:layer4:0-511`` for 512 units, ``sae:...``, ...)."""

from .subjects import SUBJECT_FORMS, load_subject
from .targets import TARGET_FORMS, objective_from_spec, unit_ids

__all__ = ["SUBJECT_FORMS", "TARGET_FORMS", "load_subject", "objective_from_spec", "unit_ids"]
