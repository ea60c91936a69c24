"""The conditional search space, sampled under the same parameter names in every trial.

Every trial carries ``model``, ``batch_size``, ``max_len``, ``lr``, ``temperature``,
``warmup_ratio`` and ``weight_decay`` with their effective values, so Optuna's importances and
the dashboard's slice, contour and parallel-coordinate views see them all. ``batch_size`` and
``max_len`` have one integer distribution in every trial, spanning the spec's full choices
(``space_check.int_range``: stepped when evenly spaced, else log); the study's sampler
(``search.sampling.sampler.make_sampler``) turns each value into one of the trial's model's choices
(bge-m3-ko: batch 32/64, max_len 256/384; ko-simcse: max_len 128). With a sampler that does
not know the conditions, both fall back to per-model branch names (``batch_size.bge-m3-ko``,
categorical; a single choice is not sampled), so a value is never outside the model's
choices. The effective values are also user attributes (``search.record.attrs``).

Example:
    >>> import optuna
    >>> from search.sampling.sampler import make_sampler
    >>> from search.spec.load import load_spec
    >>> from search.spec.study_spec import shipped_spec_path
    >>> spec = load_spec(shipped_spec_path("ko-retrieval"))
    >>> study = optuna.create_study(direction="maximize", sampler=make_sampler(spec))
    >>> trial = study.ask()
    >>> params = sample_params(trial, spec)
    >>> params.max_len in spec.space.choices_for(params.model)["max_len"]
    True
    >>> trial.params["max_len"] == params.max_len
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from search.record.config import GRADIENT_CACHE_AUTO
from search.record.config import TrialConfig
from search.sampling.sampler import ConditionalSampler
from search.spec.model_facts import model_settings
from search.spec.space_check import int_range
from search.spec.stage_check import grid_choices_for

if TYPE_CHECKING:
    import optuna

    from search.spec.study_spec import FloatRange
    from search.spec.study_spec import StudySpec


@dataclass(frozen=True)
class SampledParams:
    """The effective hyperparameters of one trial, after the conditions."""

    model: str
    batch_size: int
    max_len: int
    lr: float
    temperature: float
    warmup_ratio: float
    weight_decay: float


def branch_name(field: str, model: str) -> str:
    """Optuna parameter name of ``field`` in ``model``'s branch (the fallback names)."""
    return f"{field}.{model}"


def _keeps_conditions(trial: optuna.Trial) -> bool:
    return isinstance(trial.study.sampler, ConditionalSampler)


def _suggest_shared(
    trial: optuna.Trial, field: str, model: str, choices: list[int], full: list[int]
) -> int:
    """``field`` under its shared name (the sampler turns it into one of ``choices``)."""
    low, high, step, log = int_range(full)
    value = trial.suggest_int(field, low, high, step=step, log=log)
    if value not in choices:  # only an enqueued value can get here
        raise ValueError(
            f"trial {trial.number}: {field} {value} is not one of {model}'s choices "
            f"{choices} (space.conditions)"
        )
    return value


def _suggest_branch(trial: optuna.Trial, field: str, model: str, choices: list[int]) -> int:
    """``field`` under ``model``'s branch name (the fallback of plain samplers)."""
    if len(choices) == 1:
        return choices[0]
    return int(trial.suggest_categorical(branch_name(field, model), choices))


def _suggest_float(trial: optuna.Trial, name: str, rng: FloatRange) -> float:
    return trial.suggest_float(name, rng.low, rng.high, log=rng.log)


def sample_params(trial: optuna.Trial, spec: StudySpec) -> SampledParams:
    """Sample one trial's parameters from the conditional space of ``spec``."""
    model = str(trial.suggest_categorical("model", list(spec.models)))
    choices = spec.space.choices_for(model)
    space = spec.space
    if _keeps_conditions(trial):
        # The sampler keeps draws to the trial's stage; an enqueued value may be any choice the
        # model has in some stage (a ``conditions: device`` stage: the space's full choices).
        wide = grid_choices_for(spec, model)
        batch_size = _suggest_shared(
            trial, "batch_size", model, wide["batch_size"], list(space.batch_size)
        )
        max_len = _suggest_shared(trial, "max_len", model, wide["max_len"], list(space.max_len))
    else:
        batch_size = _suggest_branch(trial, "batch_size", model, choices["batch_size"])
        max_len = _suggest_branch(trial, "max_len", model, choices["max_len"])
    return SampledParams(
        model=model,
        batch_size=batch_size,
        max_len=max_len,
        lr=_suggest_float(trial, "lr", space.lr),
        temperature=_suggest_float(trial, "temperature", space.temperature),
        warmup_ratio=_suggest_float(trial, "warmup_ratio", space.warmup_ratio),
        weight_decay=_suggest_float(trial, "weight_decay", space.weight_decay),
    )


def _gradient_cache(setting: str | int) -> int:
    """``TrialConfig.gradient_cache`` of a spec's setting: off 0, auto -1 (the preflight picks)."""
    if setting == "off":
        return 0
    return GRADIENT_CACHE_AUTO if setting == "auto" else int(setting)


def build_config(
    spec: StudySpec,
    params: SampledParams,
    *,
    model_path: str | None = None,
    device: str = "auto",
    seed_offset: int = 0,
) -> TrialConfig:
    """The TrialConfig of sampled ``params``: spec training settings, model facts, data paths.

    Args:
        spec: The study spec.
        params: What the trial sampled.
        model_path: What to load (a tiny replica's directory); default the spec's local
            ``path`` for the model, else its Hugging Face id.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        seed_offset: Added to the spec's seed (the trial number), so each trial has its seed.
    """
    settings = model_settings(spec, params.model)
    entry = spec.models[params.model]
    training = spec.training
    if model_path is None:
        model_path = settings.ref
    return TrialConfig(
        model=params.model,
        model_path=model_path,
        batch_size=params.batch_size,
        max_len=params.max_len,
        lr=params.lr,
        temperature=params.temperature,
        warmup_ratio=params.warmup_ratio,
        weight_decay=params.weight_decay,
        epochs=training.epochs,
        amp=training.amp if entry.amp is None else entry.amp,
        gradient_checkpointing=(
            training.gradient_checkpointing
            if entry.gradient_checkpointing is None
            else entry.gradient_checkpointing
        ),
        hard_negatives=training.hard_negatives,
        seed=training.seed + seed_offset,
        device=device,
        train_path=str(spec.resolve_path(spec.data.train)),
        eval_dir=str(spec.resolve_path(spec.data.eval)),
        eval_split=spec.data.split,
        pooling=settings.pooling,
        normalize=settings.normalize,
        query_prefix=settings.query_prefix,
        passage_prefix=settings.passage_prefix,
        attn_implementation=entry.attn_implementation,
        max_train_samples=training.max_train_samples,
        gradient_cache=_gradient_cache(
            training.gradient_cache if entry.gradient_cache is None else entry.gradient_cache
        ),
    )
