"""A spec's ``stages:``: their check against the spec's models, space and budget, and what each
stage samples (its models and their ``batch_size`` / ``max_len`` choices).

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

__all__ = ["StageChoices", "StageError", "check_stages", "stage_choices", "stage_models"]

# {stage: {"model": models, "batch_size": {model: choices}, "max_len": {model: choices}}}
StageChoices = dict[str, Any]


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
        for model, cond in stage.conditions.items():
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
    """Per stage: its models and each model's ``batch_size`` / ``max_len`` choices.

    >>> from search.spec.load import load_spec
    >>> from search.spec.study_spec import shipped_spec_path
    >>> big = stage_choices(load_spec(shipped_spec_path("ko-retrieval")))["big-safe"]
    >>> big["model"], big["batch_size"]["bge-m3-ko"], big["max_len"]["bge-m3-ko"]
    (('bge-m3-ko',), (32, 64), (256, 384))
    """
    out: dict[str, StageChoices] = {}
    for stage in spec.stages:
        models = stage_models(spec, stage)
        entry: StageChoices = {"model": tuple(models)}
        for field in CONDITIONAL_PARAMS:
            per: dict[str, tuple[int, ...]] = {}
            for model in models:
                own = getattr(stage.conditions.get(model), field, None)
                per[model] = tuple(own or spec.space.choices_for(model)[field])
            entry[field] = per
        out[stage.name] = entry
    return out
