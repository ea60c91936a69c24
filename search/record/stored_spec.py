"""Where a study keeps the spec it was created from: its system attribute ``search:spec``.

Scripts read it (``stored_spec``); the dashboard's "Study User Attributes" panel is left to
what a person reads (the budget, the models searched), not a blob of the whole spec as JSON.
Studies made before keep it as the user attribute ``spec``, which is read when there is no
system attribute.
"""

from __future__ import annotations

from typing import Any

import optuna

from search.record.attrs import STUDY_SPEC
from search.record.attrs import STUDY_SPEC_SYSTEM
from storage import compat

__all__ = ["store_spec", "store_spec_of", "stored_spec", "stored_spec_of"]


def stored_spec(storage: optuna.storages.BaseStorage, study_id: int) -> dict[str, Any] | None:
    """The study's stored spec (a dict of ``StudySpec.public_dict``), or None."""
    spec = storage.get_study_system_attrs(study_id).get(STUDY_SPEC_SYSTEM)
    if spec is None:
        spec = storage.get_study_user_attrs(study_id).get(STUDY_SPEC)  # an older study
    return spec if isinstance(spec, dict) else None


def stored_spec_of(study: optuna.Study) -> dict[str, Any] | None:
    """:func:`stored_spec` of an open study."""
    return stored_spec(compat.study_storage(study), compat.study_id(study))


def store_spec(storage: optuna.storages.BaseStorage, study_id: int, spec: dict[str, Any]) -> None:
    """Keep ``spec`` (``StudySpec.public_dict()``: no secrets) as the study's spec."""
    storage.set_study_system_attr(study_id, STUDY_SPEC_SYSTEM, spec)


def store_spec_of(study: optuna.Study, spec: dict[str, Any]) -> None:
    """:func:`store_spec` on an open study."""
    store_spec(compat.study_storage(study), compat.study_id(study), spec)
