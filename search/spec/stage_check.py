"""A spec's ``stages:``: their check against the spec's models, space and budget, and what each
stage samples (its models and their ``batch_size`` / ``max_len`` choices).

A stage's ``conditions: device`` widens its models to the space's full ``batch_size`` /
``max_len`` choices (``space.conditions`` ignored for them): the sampler then draws among the
pairs each worker's feasible grid lets run on its own device (``search.memory.feasible``; without
a grid, e.g. ``--no-estimate --no-frontier``, the space's conditions hold), and a ``frontier``
seed starts at the largest such pair (``search.sampling.stages.frontier_seeds``). A 24 GiB
worker and an 80 GiB one of the same study each widen to what their own device fits.

Spec-level facts shared by the spec loader (``search.spec.load``), the stages at run time
(``search.sampling.stages``), the sampler and ``search refine``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any

from search.spec.space_check import CONDITIONAL_PARAMS

if TYPE_CHECKING:
    from search.spec.study_spec import StageSection
    from search.spec.study_spec import StudySpec

__all__ = [
    "DEVICE",
    "StageChoices",
    "StageError",
    "check_stages",
    "grid_choices_for",
    "stage_choices",
    "stage_models",
]

# {stage: {"model": models, "batch_size": {model: choices}, "max_len": {model: choices},
#  "conditions": DEVICE or "spec"}}
StageChoices = dict[str, Any]
DEVICE = "device"  # a stage's ``conditions: device``: what each worker's device fits


class StageError(ValueError):
    """A bad ``stages:`` entry: ``field stages.N.KEY (value: V): why`` (one line)."""


def _fail(i: int, key: str, value: object, why: str) -> StageError:
    return StageError(f"field stages.{i}.{key} (value: {value!r}): {why}")


def check_stages(spec: StudySpec) -> None:
    """Check ``spec.stages`` against its models, space and budget.

    Raises:
        StageError: A repeated name, a model not in ``models``, a condition that is not a
            subset of the model's choices, a missing or too large budget share, or ``top_k``
            seeding on the first stage (nothing to refine around yet).
    """
    stages = spec.stages
    seen: set[str] = set()
    for i, stage in enumerate(stages):
        if stage.name in seen:
            raise _fail(i, "name", stage.name, "given to two stages; stage names must differ")
        seen.add(stage.name)
        models = stage_models(spec, stage)
        for model in models:
            if model not in spec.models:
                raise _fail(i, "models", model, f"not in models ({', '.join(spec.models)})")
        own = stage.conditions if isinstance(stage.conditions, dict) else {}  # device: none
        for model, cond in own.items():
            if model not in models:
                raise _fail(i, "conditions", model, "not one of the stage's models")
            for field in CONDITIONAL_PARAMS:
                sub = getattr(cond, field)
                allowed = spec.space.choices_for(model)[field]
                if sub is not None and (not sub or any(x not in allowed for x in sub)):
                    raise _fail(
                        i,
                        f"conditions.{model}.{field}",
                        sub,
                        f"must be a non-empty subset of {model}'s choices {allowed}",
                    )
        if stage.n_trials is None and i < len(stages) - 1:
            raise _fail(i, "n_trials", None, "every stage but the last needs its budget share")
        if i == 0 and stage.seed == "top_k":
            raise _fail(i, "seed", stage.seed, "the first stage has no trials to refine around")
    given = sum(s.n_trials or 0 for s in stages)
    last_open = bool(stages) and stages[-1].n_trials is None
    limit = spec.study.n_trials - (1 if last_open else 0)
    if stages and given > limit:
        raise _fail(
            len(stages) - 1,
            "n_trials",
            stages[-1].n_trials,
            f"the stages' budget shares add up to {given}, "
            + (
                f"which leaves no trial to the last stage of study.n_trials {spec.study.n_trials}"
                if last_open
                else f"more than study.n_trials {spec.study.n_trials}"
            ),
        )


def stage_models(spec: StudySpec, stage: StageSection) -> list[str]:
    """The models a stage samples (all the spec's models when it names none), in spec order."""
    if stage.models is None:
        return list(spec.models)
    return list(stage.models)


def stage_choices(spec: StudySpec) -> dict[str, StageChoices]:
    """Per stage: its models, each model's ``batch_size`` / ``max_len`` choices, and
    ``conditions``: ``device`` (the choices are the space's full ones, for the sampler to narrow
    to what the worker's device fits) or ``spec`` (the stage's or the space's conditions).

    >>> from search.spec.load import load_spec
    >>> from search.spec.study_spec import shipped_spec_path
    >>> big = stage_choices(load_spec(shipped_spec_path("ko-retrieval")))["big-safe"]
    >>> big["model"], big["batch_size"]["bge-m3-ko"], big["max_len"]["bge-m3-ko"]
    (('bge-m3-ko',), (32, 64), (256, 384))
    """
    out: dict[str, StageChoices] = {}
    for stage in spec.stages:
        models = stage_models(spec, stage)
        device = stage.conditions == DEVICE
        entry: StageChoices = {"model": tuple(models), "conditions": DEVICE if device else "spec"}
        for field in CONDITIONAL_PARAMS:
            per: dict[str, tuple[int, ...]] = {}
            for model in models:
                if isinstance(stage.conditions, dict):
                    own = getattr(stage.conditions.get(model), field, None)
                    per[model] = tuple(own or spec.space.choices_for(model)[field])
                else:
                    per[model] = tuple(getattr(spec.space, field))
            entry[field] = per
        out[stage.name] = entry
    return out


def grid_choices_for(spec: StudySpec, model: str) -> dict[str, list[int]]:
    """The ``batch_size`` / ``max_len`` choices a worker's feasible grid asks about for
    ``model``: the space's (under its conditions), or all of the space's choices when a
    ``conditions: device`` stage samples the model.

    >>> from search.spec.load import load_spec
    >>> from search.spec.study_spec import shipped_spec_path
    >>> grid_choices_for(load_spec(shipped_spec_path("ko-retrieval")), "bge-m3-ko")
    {'batch_size': [32, 64], 'max_len': [256, 384]}
    """
    wide = any(s.conditions == DEVICE and model in stage_models(spec, s) for s in spec.stages)
    if wide:
        return {"batch_size": list(spec.space.batch_size), "max_len": list(spec.space.max_len)}
    return dict(spec.space.choices_for(model))
