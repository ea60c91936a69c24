"""What one pruning decision costs: ``PeerMedianPruner`` against Optuna's ``MedianPruner``.

The study: ``--trials`` completed trials (1,000 by default) of 4 models, each with
``--reports`` intermediate values (20 by default) on the examples axis (every 5,000 examples
of a 100,000-example run), and each with its ``search:pruning`` record (total and SE per
step), as the worker's hooks write it. One more trial runs: it is asked for, samples its
model, reports at every step and asks ``trial.should_prune()`` after each report: the public
path a worker takes (Optuna's ``Trial.should_prune``: the pruner reads the completed trials
once; the peer pruner also reads the running trial's record, a storage read, when the trial
is behind its peers' median).

Both pruners decide for the same running trials on the same study, two kinds of trial:
``behind`` (below every peer: the peer pruner reads its record) and ``ahead`` (above the
median: it does not). Each figure is the median over ``--repeat`` passes of the mean time of
one ``should_prune`` call over the trial's 20 reports (the reports themselves are not timed),
the passes of both pruners interleaved.
Storages: in memory, and SQLite through Optuna's cached RDB storage (``--sqlite``; the
trials are written once, which takes a while).

Run::

    python bench/bench_pruner_cost.py
    python bench/bench_pruner_cost.py --sqlite --trials 1000 --reports 20
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import create_trial

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search.record import attrs  # noqa: E402
from search.record.trial_record import TrialRecord  # noqa: E402
from search.record.trial_record import write_record  # noqa: E402
from search.sampling.peer_pruner import PeerMedianPruner  # noqa: E402
from search.sampling.peer_pruner import pruning_record  # noqa: E402
from storage import compat  # noqa: E402

MODELS = ["ko-simcse", "bge-m3-ko", "multilingual-minilm", "multilingual-e5-small"]
EVERY = 5_000  # examples between reports
OFFSETS = {"behind": -0.5, "ahead": 0.5}  # the running trial against its model's level
SE = 0.02  # a 200-query sample's SE of nDCG@10, about


def _trials(n: int, reports: int, seed: int) -> list[optuna.trial.FrozenTrial]:
    rng = random.Random(seed)
    total = EVERY * reports
    out = []
    for i in range(n):
        model = MODELS[i % len(MODELS)]
        level = 0.3 + 0.1 * (i % len(MODELS)) + rng.gauss(0, 0.03)
        values = {EVERY * (j + 1): level + 0.01 * j + rng.gauss(0, SE) for j in range(reports)}
        record = None
        for step in values:
            report = {"ndcg@10_se": SE, attrs.REPORT_EXAMPLES_TOTAL: float(total)}
            record = pruning_record(record, step, report, "ndcg@10") or record
        out.append(
            create_trial(
                value=values[max(values)],
                params={"model": model},
                distributions={"model": CategoricalDistribution(MODELS)},
                intermediate_values=values,
                user_attrs={attrs.MODEL: model},
                system_attrs={attrs.SYSTEM_PRUNING: record},
            )
        )
    return out


def _time_trial(study: optuna.Study, reports: int, offset: float) -> float:
    """Seconds per ``should_prune`` of one running trial reporting at every step."""
    trial = study.ask()
    model = trial.suggest_categorical("model", MODELS)
    level = 0.3 + 0.1 * MODELS.index(model) + offset
    storage, tid = compat.study_storage(study), compat.trial_id(trial)
    record = None
    spent = 0.0
    for j in range(reports):
        step = EVERY * (j + 1)
        trial.report(level + 0.01 * j, step)
        report = {"ndcg@10_se": SE, attrs.REPORT_EXAMPLES_TOTAL: float(EVERY * reports)}
        record = pruning_record(record, step, report, "ndcg@10")
        if record is not None:
            write_record(storage, tid, TrialRecord(system={attrs.SYSTEM_PRUNING: record}))
        start = time.perf_counter()
        trial.should_prune()
        spent += time.perf_counter() - start
    study.tell(trial, state=optuna.trial.TrialState.FAIL)  # out of the completed trials
    return spent / reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--reports", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--sqlite", action="store_true", help="also on SQLite (cached RDB)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = _trials(args.trials, args.reports, seed=0)
    pruners = {
        "MedianPruner": optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=10_000),
        "PeerMedianPruner": PeerMedianPruner(
            peers="model", n_startup_trials=3, warmup_share=0.2, noise_z=1.0
        ),
    }
    storages = ["memory"] + (["sqlite"] if args.sqlite else [])
    print(
        f"study: {args.trials} completed trials x {args.reports} reports, {len(MODELS)} models;"
        f" per should_prune call, median of {args.repeat} passes of {args.reports} reports"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for kind in storages:
            url = None if kind == "memory" else f"sqlite:///{tmp}/bench.db"
            study = optuna.create_study(direction="maximize", storage=url)
            t0 = time.perf_counter()
            study.add_trials(trials)
            setup = time.perf_counter() - t0
            cases = [(n, c) for n in pruners for c in ("behind", "ahead")]
            times: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
            for rep in range(args.repeat + 1):  # interleaved: both see the same load
                for name, case in cases:
                    study.pruner = pruners[name]
                    per_call = _time_trial(study, args.reports, OFFSETS[case])
                    if rep:  # the first pass warms the cache
                        times[name, case].append(per_call)
            for name, case in cases:
                per_call = statistics.median(times[name, case])
                print(
                    f"{kind:7s} {name:17s} {case:6s} {per_call * 1e3:8.3f} ms/should_prune"
                    f" (study written in {setup:.1f} s)"
                )


if __name__ == "__main__":
    main()
