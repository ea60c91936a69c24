"""The service's overhead per trial against a plain Optuna loop, 1 and 4 workers, one run.

Both sides use the same PostgreSQL storage, the same sampler (the ko-retrieval spec's TPE,
multivariate and grouped) and the same conditional space, and each trial "trains" by
sleeping for the trial length:

* **plain** - W processes, each ``study.optimize(objective, n_trials=N / W)`` on Optuna's own
  ``RDBStorage``; the objective samples the space and sleeps. Nothing else.
* **service** - W processes, each ``search.worker.runner.run_study`` (what ``search worker`` runs):
  open the study under its lock, claim each trial under the global budget lock (stale check,
  count, ask, first heartbeat), sample, record the runner's attributes, heartbeat thread,
  training isolated in a child process from the forkserver (the objective sleeps there),
  tell. The memory estimate and frontier are off (they would skip configs, not add time).

Every process imports and warms its forkserver first (one no-op isolated run: the forkserver
imports torch once per worker), then all start together at a barrier.
Throughput is trials / (last trial's completion - start); the ratio is service / plain, and
the added seconds per trial are (service wall - plain wall) * W / N. The same figures from
the first trial's start ("per trial") leave out the service's once-per-worker start (spec and
data validation, storage, opening the study), which the start-up column shows.

Three settings: a short trial (0.5 s) with 1 and 4 workers shows the overhead itself; a
longer trial (``--long``, 10 s by default; real fine-tuning trials take minutes) with 4
workers shows what it costs in throughput.

Run::

    python bench/bench_worker_overhead.py
    python bench/bench_worker_overhead.py --short 0.5 --long 30 --trials 16 --long-trials 8

Targets: ratio >= 0.95 at 4 workers with the realistic trial length, < 0.5 s added per trial.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_URL = os.environ.get(
    "SEARCH_BENCH_PG_URL",
    os.environ.get(
        "SEARCH_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/search_test"
    ),
)
OBJECTIVE = "bench_worker_overhead:fake_train"
SECONDS_ENV = "BENCH_TRIAL_SECONDS"


def fake_train(cfg: Any, *, report: Any = None, on_phase: Any = None) -> dict[str, Any]:
    """The objective run in the isolated child: sleep for the trial length, return metrics."""
    if on_phase is not None:
        on_phase("forward")
    time.sleep(float(os.environ[SECONDS_ENV]))
    value = random.uniform(0.2, 0.8)
    metrics = {"ndcg@10": value, "mrr@10": value, "recall@10": value}
    return {"metrics": metrics, "history": [metrics], "peak_memory_mb": None}


def _wait_at(barrier: Path) -> float:
    (barrier / str(os.getpid())).touch()
    while not (barrier / "go").exists():
        time.sleep(0.005)
    return time.time()


def _role_plain(url: str, name: str, n: int, barrier: Path) -> dict[str, Any]:
    import optuna

    from search.sampling.sampler import make_sampler
    from search.sampling.space import sample_params
    from search.spec.load import resolve_spec

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = resolve_spec("ko-retrieval", None)
    seconds = float(os.environ[SECONDS_ENV])

    def objective(trial: optuna.Trial) -> float:
        sample_params(trial, spec)
        time.sleep(seconds)
        return random.uniform(0.2, 0.8)

    storage = optuna.storages.RDBStorage(url)
    study = optuna.load_study(study_name=name, storage=storage, sampler=make_sampler(spec))
    start = _wait_at(barrier)
    study.optimize(objective, n_trials=n)
    return {"start": start, "end": time.time(), "trials": n}


def _role_service(url: str, name: str, n: int, barrier: Path) -> dict[str, Any]:
    import optuna

    from search.spec.load import resolve_spec
    from search.worker.isolation import run_isolated
    from search.worker.runner import RunOptions
    from search.worker.runner import run_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = resolve_spec("ko-retrieval", None)
    # One no-op isolated run before the start: the forkserver imports torch and transformers
    # once per worker (tens of seconds on a busy machine), a cost that is not per trial.
    seconds = os.environ[SECONDS_ENV]
    os.environ[SECONDS_ENV] = "0"
    run_isolated(_dummy_config(spec), objective=OBJECTIVE)
    os.environ[SECONDS_ENV] = seconds
    opts = RunOptions(
        storage_url=url,
        n_trials=n,
        device="cpu",
        objective=OBJECTIVE,
        use_estimate=False,
        use_frontier=False,
        study_name=name,
    )
    start = _wait_at(barrier)
    summary = run_study(spec, opts)
    return {"start": start, "end": time.time(), "trials": summary.trials_run}


def _dummy_config(spec: Any) -> Any:
    import optuna

    from search.sampling.space import build_config
    from search.sampling.space import sample_params

    trial = optuna.create_study().ask()
    return build_config(spec, sample_params(trial, spec), device="cpu")


def _run(mode: str, url: str, workers: int, trials: int, seconds: float) -> dict[str, float]:
    import optuna

    from storage import create_storage

    name = f"bench-overhead-{mode}-{uuid.uuid4().hex[:8]}"
    if mode == "plain":  # plain Optuna has no race-free creation: create it beforehand
        optuna.create_study(
            study_name=name, storage=optuna.storages.RDBStorage(url), direction="maximize"
        )
    per_worker = trials // workers if mode == "plain" else trials
    env = {**os.environ, SECONDS_ENV: str(seconds), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        barrier = Path(tmp)
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--role",
                    mode,
                    "--url",
                    url,
                    "--study",
                    name,
                    "--n",
                    str(per_worker),
                    "--barrier",
                    tmp,
                ],
                stdout=subprocess.PIPE,
                env=env,
                text=True,
            )  # fmt: skip
            for _ in range(workers)
        ]
        while len(list(barrier.iterdir())) < workers:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a {mode} worker ended before the start")
            time.sleep(0.05)
        go = time.time()
        (barrier / "go").touch()
        outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    study = optuna.load_study(study_name=name, storage=create_storage(url))
    done = [t for t in study.trials if t.state.is_finished()]
    assert len(done) == trials, f"{mode}: {len(done)} finished trials, expected {trials}"
    last = max(t.datetime_complete for t in done if t.datetime_complete is not None)
    first = min(t.datetime_start for t in done if t.datetime_start is not None)
    wall = last.timestamp() - go
    steady = last.timestamp() - first.timestamp()
    exits = max(o["end"] for o in outs) - go
    return {
        "wall": wall,
        "startup": first.timestamp() - go,
        "steady": steady,
        "exit": exits,
        "throughput": trials / wall,
    }


def main() -> None:
    """Run the three settings and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--short", type=float, default=0.5, help="short trial length (s)")
    parser.add_argument("--long", type=float, default=10.0, help="realistic trial length (s)")
    parser.add_argument("--trials", type=int, default=16, help="trials per short setting")
    parser.add_argument("--long-trials", type=int, default=8, help="trials, realistic setting")
    parser.add_argument("--role", choices=["plain", "service"], help=argparse.SUPPRESS)
    parser.add_argument("--study", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--barrier", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "plain":
        print(json.dumps(_role_plain(args.url, args.study, args.n, args.barrier)))
        return
    if args.role == "service":
        print(json.dumps(_role_service(args.url, args.study, args.n, args.barrier)))
        return

    from storage import redact_url

    print(f"storage {redact_url(args.url)}; {datetime.datetime.now():%Y-%m-%d %H:%M}")
    settings = [(args.short, 1, args.trials), (args.short, 4, args.trials),
                (args.long, 4, args.long_trials)]  # fmt: skip
    for seconds, workers, trials in settings:
        plain = _run("plain", args.url, workers, trials, seconds)
        service = _run("service", args.url, workers, trials, seconds)
        ratio = service["throughput"] / plain["throughput"]
        added = (service["wall"] - plain["wall"]) * workers / trials
        ratio_steady = plain["steady"] / service["steady"]
        added_steady = (service["steady"] - plain["steady"]) * workers / trials
        print(
            f"trial {seconds:g} s, {workers} worker(s), {trials} trials: plain "
            f"{plain['throughput']:.3f} trials/s ({plain['wall']:.1f} s), service "
            f"{service['throughput']:.3f} trials/s ({service['wall']:.1f} s; start-up "
            f"{service['startup']:.1f} s vs {plain['startup']:.1f} s; last worker exit "
            f"{service['exit']:.1f} s)\n    all: ratio {ratio:.3f}, added {added:.3f} s/trial;"
            f" per trial (from the first trial's start): ratio {ratio_steady:.3f}, added "
            f"{added_steady:.3f} s/trial"
        )


if __name__ == "__main__":
    main()
