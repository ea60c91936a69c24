"""Sampler and pruner of a study, built from the spec's ``sampler`` and ``pruner`` sections."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import optuna

if TYPE_CHECKING:
    from search.spec import StudySpec


def make_sampler(spec: StudySpec, *, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """TPE over the conditional space (``multivariate=True, group=True``) or random search.

    ``group=True`` makes TPE model each branch of the space (the trials that share one set of
    parameters, such as every bge-m3-ko trial) jointly, instead of falling back to independent
    sampling for parameters that exist in only some trials.
    """
    cfg = spec.sampler
    seed = cfg.seed if seed is None else seed
    if cfg.type == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():
        # ``group`` is marked experimental; the choice is deliberate (see README).
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            n_startup_trials=cfg.n_startup_trials,
            multivariate=cfg.multivariate,
            group=cfg.group,
            seed=seed,
            constant_liar=True,  # many workers: running trials count as pessimistic results
        )


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The median pruner on the per-epoch metric, or none."""
    cfg = spec.pruner
    if cfg.type == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps
    )
