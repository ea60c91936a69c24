"""A finished study written the way the service writes it, for the report and plot tests.

Trials are built with ``optuna.trial.create_trial`` and the trial record's keys: completed ones
(with their metrics), median-pruned ones, an OOM of every kind, a failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState
from optuna.trial import create_trial

from search.record import attrs
from search.record.stored_spec import store_spec_of
from search.spec.load import load_spec
from search.spec.study_spec import shipped_spec_path

MODELS = ["ko-simcse", "bge-m3-ko", "multilingual-minilm", "multilingual-e5-small"]
GIB = 1024.0  # MB per GiB

# (model, outcome, batch, max_len, nDCG@10, peak GiB, OOM kind, OOM phase)
TRIALS: list[tuple[str, str, int, int, float | None, float | None, str | None, str | None]] = [
    ("ko-simcse", "complete", 32, 128, 0.52, 1.1, None, None),
    ("bge-m3-ko", "complete", 32, 256, 0.71, 6.2, None, None),
    ("multilingual-minilm", "complete", 64, 128, 0.48, 0.9, None, None),
    ("multilingual-e5-small", "complete", 64, 256, 0.60, 2.4, None, None),
    ("bge-m3-ko", "oom", 64, 384, None, None, "real", "backward"),
    ("bge-m3-ko", "oom", 64, 384, None, None, "frontier", None),
    ("bge-m3-ko", "complete", 32, 384, 0.76, 9.8, None, None),
    ("multilingual-e5-small", "oom", 256, 512, None, None, "predicted", None),
    ("ko-simcse", "oom", 256, 128, None, None, "host", "forward"),
    ("multilingual-minilm", "pruned", 32, 256, None, 1.3, None, None),
    ("ko-simcse", "failed", 64, 128, None, None, None, None),
    ("bge-m3-ko", "complete", 64, 256, 0.79, 12.5, None, None),
    ("multilingual-e5-small", "complete", 128, 256, 0.64, 4.1, None, None),
    ("multilingual-minilm", "oom", 256, 512, None, None, "real", "forward"),
    ("ko-simcse", "pruned", 128, 128, None, 2.0, None, None),
    ("bge-m3-ko", "complete", 32, 256, 0.69, 6.0, None, None),
]
BEST = 11  # bge-m3-ko b64 len256, nDCG@10 0.79
BEST_METRICS = {"ndcg@10": 0.79, "recall@10": 0.93, "mrr@1": 0.61, "recall@1": 0.61,
                "mrr@10": 0.74, "recall@5": 0.88}  # fmt: skip

_STATE = {
    "complete": TrialState.COMPLETE,
    "pruned": TrialState.PRUNED,
    "oom": TrialState.PRUNED,
    "failed": TrialState.FAIL,
}


def _trial(
    number: int, row: tuple[Any, ...], models: Sequence[str] = MODELS
) -> optuna.trial.FrozenTrial:
    """A finished trial of ``row``; ``models``: the choices of its ``model`` parameter."""
    model, outcome, batch, length, value, peak, kind, phase = row
    user: dict[str, Any] = {
        attrs.OUTCOME: outcome,
        attrs.MODEL: model,
        attrs.BATCH_SIZE: batch,
        attrs.MAX_LEN: length,
        attrs.SECONDS: 5.0,
    }
    if peak is not None:
        user[attrs.PEAK_MEMORY_MB] = peak * GIB
    if value is not None:
        user[attrs.DEFAULT_METRIC] = value
    if outcome == "oom":
        user.update({attrs.OOM: True, attrs.OOM_KIND: kind})
        if phase:
            user[attrs.OOM_PHASE] = phase
    if outcome == "failed":
        user[attrs.ERROR] = "ValueError: bad batch"
    config = {"model": model, "batch_size": batch, "max_len": length, "lr": 3e-5,
              "temperature": 0.05, "warmup_ratio": 0.1, "weight_decay": 0.01, "epochs": 2,
              "amp": True, "model_path": f"/models/{model}"}  # fmt: skip
    system: dict[str, Any] = {attrs.SYSTEM_CONFIG: config}
    if value is not None:
        metrics = BEST_METRICS if number == BEST else {"ndcg@10": value, "mrr@10": value - 0.05}
        system[attrs.SYSTEM_METRICS] = metrics
    return create_trial(
        state=_STATE[outcome],
        value=value,
        params={"model": model},
        distributions={"model": CategoricalDistribution(list(models))},
        user_attrs=user,
        system_attrs=system,
    )


def finished_study(url: str, name: str = "finished", *, completed: bool = True) -> optuna.Study:
    """A study of ``TRIALS`` (without the completed ones when ``completed`` is False)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=url, study_name=name, direction="maximize")
    spec = load_spec(shipped_spec_path("ko-retrieval"))
    store_spec_of(study, spec.public_dict())
    for number, row in enumerate(r for r in TRIALS if completed or r[1] != "complete"):
        study.add_trial(_trial(number, row))
    return study
