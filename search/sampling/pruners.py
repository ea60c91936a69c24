"""The study's pruner, built from the spec's ``pruner:`` section.

Every trial reports its metric on one step axis: training examples seen (a nominal count:
``epoch x training-set size`` at the end of an epoch, multiples of
``training.eval_every_steps`` in between), so pruners compare trials of different batch
sizes at the same amount of training. ``min_resource`` / ``max_resource`` / ``n_warmup_steps``
are counted on that axis too; ``peer_median`` (``search.sampling.peer_pruner``) counts its
warm-up as a share of each trial's own total on it.

Example:
    >>> from search.spec.load import load_spec
    >>> from search.spec.study_spec import shipped_spec_path
    >>> type(make_pruner(load_spec(shipped_spec_path("ko-retrieval")))).__name__
    'PeerMedianPruner'
"""

from __future__ import annotations

from typing import Literal

import optuna

from search.sampling.peer_pruner import PeerMedianPruner
from search.spec.study_spec import PrunerSection
from search.spec.study_spec import StudySpec

__all__ = ["make_pruner", "pruner_from_section"]


def pruner_from_section(cfg: PrunerSection) -> optuna.pruners.BasePruner:
    """An Optuna pruner for ``cfg.type``: median, peer_median, successive_halving, hyperband
    or none."""
    if cfg.type == "none":
        return optuna.pruners.NopPruner()
    if cfg.type == "peer_median":
        return PeerMedianPruner(
            peers=cfg.peers,
            n_startup_trials=cfg.n_startup_trials,
            warmup_share=cfg.warmup_share,
            n_warmup_steps=cfg.n_warmup_steps,
            noise_z=cfg.noise_z,
        )
    if cfg.type == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=cfg.min_resource or "auto",
            reduction_factor=cfg.reduction_factor,
            min_early_stopping_rate=cfg.min_early_stopping_rate,
        )
    if cfg.type == "hyperband":
        max_resource: int | Literal["auto"] = cfg.max_resource or "auto"
        return optuna.pruners.HyperbandPruner(
            min_resource=cfg.min_resource or 1,
            max_resource=max_resource,
            reduction_factor=cfg.reduction_factor,
        )
    return optuna.pruners.MedianPruner(
        n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps
    )


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The pruner of ``spec`` (see :func:`pruner_from_section`)."""
    return pruner_from_section(spec.pruner)
