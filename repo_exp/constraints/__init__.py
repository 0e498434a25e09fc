"""Constraint types (SPEC §3), each chosen by ``_target_`` in ``conf/constraint/``."""

from repo_exp.constraints.base import Comm, Constraint, LocalComm, group_mean, mixed
from repo_exp.constraints.none import NoConstraint
from repo_exp.constraints.shaping import ShapingConstraint
from repo_exp.constraints.average import AverageConstraint
from repo_exp.constraints.rectified import RectifiedConstraint

__all__ = [
    "Comm",
    "Constraint",
    "LocalComm",
    "mixed",
    "group_mean",
    "NoConstraint",
    "ShapingConstraint",
    "AverageConstraint",
    "RectifiedConstraint",
]
