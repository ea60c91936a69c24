"""Storage latency as a study grows: ask+tell at 100 and at 10,000 finished trials, and report.

One PostgreSQL study is filled with realistic finished trials (the ko-retrieval space's params
and the trial record the service writes: 50 template trials run by the service's trial step,
``search.worker.worker.Worker.step``, on an in-memory study, copied in bulk), then, at 100 and
again at 10,000 finished trials, a fresh worker process measures one trial's round trip the
way ``search worker`` runs it: one ``Worker.step`` (the claim under the budget lock: stale
check, the trial list's one read, ``ask``, first heartbeat; sampling the conditional space; the
first record; "training" that returns at once; the outcome record; ``tell``). The sampler is
``RandomSampler`` and the preflight's estimate and frontier are off, so the figure is the
storage's, not TPE's nor the frontier's (both grow with the trials they read, whatever the
storage; the preflight's is measured in ``bench_feasible_grid.py``). Plain Optuna's ``ask`` +
``tell`` on the same storage is measured beside it. The first calls of a process, which load
the study into Optuna's cache, are timed separately as the warm-up.

Then ``search report --study NAME --json`` runs as a command at 10,000 trials (whole process:
interpreter start, imports, loading every trial, the per-model table).

Run::

    python bench/bench_storage_latency.py
    SEARCH_BENCH_PG_URL=postgresql://postgres@127.0.0.1:5432/search_test \\
        python bench/bench_storage_latency.py --large 10000 --samples 30

Prints the median latencies at each size, their ratio (target: at most 2 at 10,000 vs 100),
and the report time (target: under 3 s), in-process (a fresh storage, loading every trial,
the per-model table) and as the ``search report`` command (plus interpreter and imports).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
import sqlalchemy  # noqa: E402
from optuna.distributions import distribution_to_json  # noqa: E402

from search.memory.device import DeviceInfo  # noqa: E402
from search.observe.report import study_report  # noqa: E402
from search.record.config import TrialConfig  # noqa: E402
from search.record.models import MODELS  # noqa: E402
from search.sampling.space import sample_params  # noqa: E402
from search.spec.load import resolve_spec  # noqa: E402
from search.spec.options import RunOptions  # noqa: E402
from search.spec.study_spec import StudySpec  # noqa: E402
from search.worker.isolation import TrialOutcome  # noqa: E402
from search.worker.trainer import TrainHooks  # noqa: E402
from search.worker.worker import Worker  # noqa: E402
from storage import ResilientRDBStorage  # noqa: E402
from storage import create_storage  # noqa: E402
from storage import redact_url  # noqa: E402
from storage.compat import study_id  # noqa: E402
from storage.compat import tables as models  # noqa: E402  (Optuna's schema)

DEFAULT_URL = os.environ.get(
    "SEARCH_BENCH_PG_URL",
    os.environ.get("SEARCH_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/search_test"),
)
BUDGET = 10**9  # the budget never binds here


H100 = DeviceInfo("cuda:0", "cuda:0 (NVIDIA H100, 80 GiB)", 81559 * 2**20, 80000 * 2**20)


def _spec() -> StudySpec:
    """The ko-retrieval spec, one stage (the sampler draws every trial)."""
    return resolve_spec("ko-retrieval", None).model_copy(update={"stages": []})


def _open_worker(
    spec: StudySpec,
    storage: optuna.storages.BaseStorage,
    name: str,
    budget: int,
    trainer: Any,
    sampler: optuna.samplers.BaseSampler,
) -> Worker:
    """A worker on ``name`` as ``search worker`` opens it, with the bench's device, models,
    trainer and sampler, the preflight's estimate and frontier off (nothing is skipped)."""
    opts = RunOptions(
        storage_url="bench",
        n_trials=budget,
        device="cuda:0",
        use_estimate=False,
        use_frontier=False,
        study_name=name,
        worker="gpu-host-1:4242",
    )
    return Worker.open(
        spec,
        opts,
        storage=storage,
        check_data=False,
        device=H100,
        facts={model: MODELS[model] for model in spec.models},
        model_paths=dict.fromkeys(spec.models, "x"),
        trainer=trainer,
        sampler=sampler,
        pruner=optuna.pruners.NopPruner(),
        baselines=False,
        warm=False,
    )


def _templates(spec: StudySpec, n: int) -> list[optuna.trial.FrozenTrial]:
    """``n`` finished trials as the service records them: run by its step, in memory."""
    rng = random.Random(0)
    count = {"trained": 0}

    def trainer(cfg: TrialConfig, hooks: TrainHooks) -> TrialOutcome:
        """Every 7th an OOM, else complete with random metrics, one report each."""
        i = count["trained"]
        count["trained"] += 1
        value = rng.uniform(0.2, 0.8)
        metrics = {"ndcg@10": value, "mrr@10": value * 0.9, "recall@10": value * 1.1}
        peak = rng.uniform(2000, 70000)
        if i % 7 == 0:
            return TrialOutcome("oom", phase="backward", oom_kind="real", peak_memory_mb=peak)
        hooks.report(1, metrics)
        return TrialOutcome("complete", metrics=metrics, history=[metrics], peak_memory_mb=peak)

    storage = optuna.storages.InMemoryStorage()
    sampler = optuna.samplers.RandomSampler(0)
    with _open_worker(spec, storage, "templates", n, trainer, sampler) as worker:
        while not worker.step(wait=False).stopped:
            pass
        return worker.study.get_trials()


def fill(url: str, name: str, target: int, spec: StudySpec) -> float:
    """Add finished trials until the study has ``target``; return the seconds it took.

    Rows go in with bulk Core inserts (``study.add_trials`` takes minutes for 10,000); the
    rows are exactly what Optuna writes for these trials.
    """
    storage = create_storage(url, heartbeat_interval=None)
    assert isinstance(storage, ResilientRDBStorage)
    study = optuna.load_study(study_name=name, storage=storage)
    have = len(study.get_trials(deepcopy=False))
    templates = _templates(spec, 50)
    started = time.perf_counter()
    for low in range(have, target, 1000):
        high = min(target, low + 1000)
        _bulk_insert(storage, study_id(study), [templates[i % 50] for i in range(low, high)], low)
    return time.perf_counter() - started


def _bulk_insert(
    storage: ResilientRDBStorage,
    study_id: int,
    trials: list[optuna.trial.FrozenTrial],
    first_number: int,
) -> None:
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    tables = {m.__tablename__: m.__table__ for m in (
        models.TrialModel, models.TrialParamModel, models.TrialValueModel,
        models.TrialUserAttributeModel, models.TrialSystemAttributeModel,
        models.TrialIntermediateValueModel,
    )}  # fmt: skip
    with storage.engine.begin() as conn:
        rows = [
            {"number": first_number + i, "study_id": study_id, "state": t.state,
             "datetime_start": now, "datetime_complete": now}
            for i, t in enumerate(trials)
        ]  # fmt: skip
        ids = (
            conn.execute(
                sqlalchemy.insert(tables["trials"]).returning(
                    tables["trials"].c.trial_id, sort_by_parameter_order=True
                ),
                rows,
            )
            .scalars()
            .all()
        )
        params, values, user, system, inter = [], [], [], [], []
        for trial_id, t in zip(ids, trials, strict=True):
            for name, value in t.params.items():
                dist = t.distributions[name]
                params.append({"trial_id": trial_id, "param_name": name,
                               "param_value": dist.to_internal_repr(value),
                               "distribution_json": distribution_to_json(dist)})  # fmt: skip
            if t.value is not None:
                stored, kind = models.TrialValueModel.value_to_stored_repr(t.value)
                values.append({"trial_id": trial_id, "objective": 0, "value": stored,
                               "value_type": kind})  # fmt: skip
            for key, value in t.user_attrs.items():
                user.append({"trial_id": trial_id, "key": key, "value_json": json.dumps(value)})
            for key, value in t.system_attrs.items():
                system.append({"trial_id": trial_id, "key": key, "value_json": json.dumps(value)})
            to_stored = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr
            for step, value in t.intermediate_values.items():
                istored, ikind = to_stored(value)
                inter.append(
                    {"trial_id": trial_id, "step": step, "intermediate_value": istored,
                     "intermediate_value_type": ikind}
                )  # fmt: skip
        for table, batch in (
            ("trial_params", params), ("trial_values", values),
            ("trial_user_attributes", user), ("trial_system_attributes", system),
            ("trial_intermediate_values", inter),
        ):  # fmt: skip
            if batch:
                conn.execute(sqlalchemy.insert(tables[table]), batch)


def instant(cfg: TrialConfig, hooks: TrainHooks) -> TrialOutcome:
    """The measured trials' "training": complete at once."""
    return TrialOutcome("complete", metrics={"ndcg@10": 0.5}, peak_memory_mb=1.0)


def measure(url: str, name: str, samples: int) -> dict[str, float]:
    """In this (fresh) process: warm-up, then median service and plain round trips (ms)."""
    spec = _spec()
    started = time.perf_counter()  # what `search report` does after its imports
    store = create_storage(url)
    study_report(optuna.load_study(study_name=name, storage=store), storage=store)
    report_s = time.perf_counter() - started
    storage = create_storage(url, heartbeat_interval=30)
    sampler = optuna.samplers.RandomSampler()
    worker = _open_worker(spec, storage, name, BUDGET, instant, sampler)
    study = worker.study
    warnings.filterwarnings("ignore", message="Heartbeat of storage")

    def service_round() -> float:
        started = time.perf_counter()
        result = worker.step()
        assert result.outcome == "complete", result
        return time.perf_counter() - started

    def plain_round() -> float:
        started = time.perf_counter()
        trial = study.ask()
        sample_params(trial, spec)
        study.tell(trial, 0.5)
        return time.perf_counter() - started

    with worker:
        warm = service_round()
        service = [service_round() for _ in range(samples)]
        plain = [plain_round() for _ in range(samples)]
    return {
        "report_s": report_s,
        "warmup_ms": warm * 1e3,
        "service_ms": statistics.median(service) * 1e3,
        "plain_ms": statistics.median(plain) * 1e3,
    }


def _measure_in_fresh_process(url: str, name: str, samples: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", name, "--url", url, "--samples", str(samples)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def _optuna_read_report_seconds(url: str, name: str) -> float:
    """The in-process report through Optuna's own ``RDBStorage`` (its ORM trial read)."""
    started = time.perf_counter()
    study_report(optuna.load_study(study_name=name, storage=optuna.storages.RDBStorage(url)))
    return time.perf_counter() - started


def _report_seconds(url: str, name: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "search.cli", "report", "--study", name, "--storage", url],
        check=True,
        capture_output=True,
        env=env,
        cwd=ROOT,
    )
    return time.perf_counter() - started


def main() -> None:
    """Fill, measure at both sizes, time the report, print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument(
        "--optuna-read", action="store_true", help="also time the report on Optuna's RDBStorage"
    )
    parser.add_argument("--measure", metavar="STUDY", help=argparse.SUPPRESS)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if args.measure:
        print(json.dumps(measure(args.url, args.measure, args.samples)))
        return

    spec = _spec()
    name = f"bench-latency-{uuid.uuid4().hex[:8]}"
    optuna.create_study(
        study_name=name, storage=create_storage(args.url, heartbeat_interval=None),
        direction="maximize",
    )  # fmt: skip
    print(f"storage {redact_url(args.url)}, study {name}")
    results = {}
    for size in (args.small, args.large):
        filled = fill(args.url, name, size, spec)
        results[size] = _measure_in_fresh_process(args.url, name, args.samples)
        r = results[size]
        print(
            f"{size:>6} finished trials (filled in {filled:.1f} s): one step "
            f"{r['service_ms']:.1f} ms, plain ask+tell {r['plain_ms']:.1f} ms, "
            f"first call (cache warm-up) {r['warmup_ms']:.0f} ms; report in-process "
            f"(fresh storage, load, table) {r['report_s']:.2f} s"
        )
    report_s = _report_seconds(args.url, name)
    small, large = results[args.small], results[args.large]
    print(f"service (step) latency ratio {args.large} / {args.small}: "
          f"{large['service_ms'] / small['service_ms']:.2f} (target <= 2)")  # fmt: skip
    print(f"plain Optuna latency ratio {args.large} / {args.small}: "
          f"{large['plain_ms'] / small['plain_ms']:.2f}")  # fmt: skip
    print(f"search report at {args.large}: {large['report_s']:.2f} s in-process, "
          f"{report_s:.2f} s as a command with its imports (target < 3 s)")  # fmt: skip
    if args.optuna_read:
        optuna_s = _optuna_read_report_seconds(args.url, name)
        print(f"report in-process on Optuna's RDBStorage (ORM read): {optuna_s:.2f} s")


if __name__ == "__main__":
    main()
