"""The service's overhead per trial against a plain Optuna loop, and its reads of the trial list.

Both sides use the same PostgreSQL storage, the same sampler (the ko-retrieval spec's TPE,
multivariate and grouped) and the same conditional space, and each trial "trains" by
sleeping for the trial length:

* **plain** - W processes, each ``study.optimize(objective, n_trials=N / W)`` on Optuna's own
  ``RDBStorage``; the objective samples the space and sleeps. Nothing else.
* **service** - W processes, each what ``search worker`` runs: ``Worker.open`` (storage, study
  under its lock, the CLI's observers: dashboard notes, kept models, W&B when on), then the
  public trial step ``Worker.step`` until the budget is spent (claim under the global budget
  lock with the stale check, count and first heartbeat; sample; preflight; first record;
  training isolated in a child process from the forkserver, the objective sleeping there;
  record; tell; events to the observers' thread). The memory estimate and frontier are off
  unless ``--preflight`` (they would skip configs, not add time).
* **before** (``--before DIR``) - the same service role run by the code in ``DIR``, a worktree
  of an older commit (its ``run_study``, as its ``search worker`` ran it, with progress), in
  the same run, so both sides see the same machine and load.

Every process imports and warms its forkserver first (one no-op isolated run: the forkserver
imports torch once per worker), then all start together at a barrier.
Throughput is trials / (last trial's completion - start); the ratio is service / plain, and
the added seconds per trial are (service wall - plain wall) * W / N. The same figures from
the first trial's start ("per trial") leave out the service's once-per-worker start (spec and
data validation, storage, opening the study), which the start-up column shows.

Reads of the trial list: each service process counts the calls of the storage's trial read
(``storage._rdb.ResilientRDBStorage._get_trials``: every read of a study's trials reaches the
database through it, Optuna's cache included) per thread, from the barrier to the end, and
attributes the step's (main thread) reads to the trial they served: from the end of one
trial to the end of the next (the claim, the sampling, the preflight, the record, the tell;
the last, empty claim and the waits for other workers' trials are left out). The fake
objective reports nothing, so no pruner read is among them (a real trial adds one per report).

Three settings: a short trial (0.5 s) with 1 and 4 workers shows the overhead itself; a
longer trial (``--long``, 10 s by default; real fine-tuning trials take minutes) with 4
workers shows what it costs in throughput.

Run::

    python bench/bench_worker_overhead.py
    git worktree add /tmp/before <old commit>
    python bench/bench_worker_overhead.py --before /tmp/before --json /tmp/overhead.json
    python bench/bench_worker_overhead.py --short 0.5 --long 30 --trials 16 --long-trials 8

Targets: ratio >= 0.95 at 4 workers with the realistic trial length, < 0.5 s added per trial,
at most 2 reads of the trial list per trial.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# The tree a role runs: this one, or the older worktree of --before (an environment variable,
# so the trial process server, which imports this module again, finds the same tree).
ROOT_ENV = "BENCH_WORKER_OVERHEAD_ROOT"
sys.path.insert(0, os.environ.get(ROOT_ENV, str(ROOT)))

DEFAULT_URL = os.environ.get(
    "SEARCH_BENCH_PG_URL",
    os.environ.get("SEARCH_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/search_test"),
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


class ReadCounter:
    """Counts the storage's reads of a study's trial list, per thread, once started."""

    def __init__(self) -> None:
        from storage._rdb import ResilientRDBStorage

        self.by_thread: collections.Counter[str] = collections.Counter()
        self.on = False
        real = ResilientRDBStorage._get_trials

        def counted(storage: Any, *args: Any, **kwargs: Any) -> Any:
            if self.on:
                self.by_thread[threading.current_thread().name] += 1
            return real(storage, *args, **kwargs)

        ResilientRDBStorage._get_trials = counted  # type: ignore[method-assign,assignment]

    @property
    def main(self) -> int:
        return self.by_thread["MainThread"]


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


def _warm(spec: Any, config: Callable[[Any], Any], run_isolated: Any) -> None:
    """One no-op isolated run before the start: the forkserver imports torch and transformers
    once per worker (tens of seconds on a busy machine), a cost that is not per trial."""
    seconds = os.environ[SECONDS_ENV]
    os.environ[SECONDS_ENV] = "0"
    run_isolated(config(spec), objective=OBJECTIVE)
    os.environ[SECONDS_ENV] = seconds


def _role_service(url: str, name: str, n: int, barrier: Path, preflight: bool) -> dict[str, Any]:
    """This tree: ``Worker.open`` with the CLI's observers, then ``Worker.step`` to the end."""
    import optuna

    from search.observe.subscribers import standard_subscribers
    from search.sampling.space import build_config
    from search.sampling.space import sample_params
    from search.spec.load import resolve_spec
    from search.worker.isolation import run_isolated
    from search.worker.runner import RunOptions
    from search.worker.worker import Worker

    def config(spec: Any) -> Any:
        trial = optuna.create_study().ask()
        return build_config(spec, sample_params(trial, spec), device="cpu")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = resolve_spec("ko-retrieval", None)
    counter = ReadCounter()
    _warm(spec, config, run_isolated)
    # The worker's own once-per-process import before the start: torch, which the CPU
    # preflight's bf16 check imports on the first trial (the older tree imported it with its
    # runner, before the start).
    import torch  # noqa: F401

    opts = RunOptions(
        storage_url=url,
        n_trials=n,
        device="cpu",
        objective=OBJECTIVE,
        use_estimate=preflight,
        use_frontier=preflight,
        study_name=name,
    )
    start = _wait_at(barrier)
    counter.on = True
    worker = Worker.open(spec, opts, subscribers=standard_subscribers(spec, opts))
    per_trial: list[int] = []
    trials = 0
    try:
        mark = counter.main
        while True:
            result = worker.step()
            if result.stopped:
                break
            trials += result.frozen is not None
            per_trial.append(counter.main - mark)
            mark = counter.main
    finally:
        worker.close()
    return {
        "start": start,
        "end": time.time(),
        "trials": trials,
        "reads_per_trial": per_trial,
        "reads_by_thread": dict(counter.by_thread),
    }


def _role_before(url: str, name: str, n: int, barrier: Path, preflight: bool) -> dict[str, Any]:
    """The older tree (``--before``): its ``run_study`` as its ``search worker`` ran it.

    Its modules had other paths (``search.runner``, ``search.spec``...): imported by name.
    """
    import importlib

    import optuna

    run_isolated = importlib.import_module("search.isolation").run_isolated
    runner = importlib.import_module("search.runner")
    RunOptions, run_study = runner.RunOptions, runner.run_study
    space = importlib.import_module("search.space")
    build_config, sample_params = space.build_config, space.sample_params
    resolve_spec = importlib.import_module("search.spec").resolve_spec

    def config(spec: Any) -> Any:
        trial = optuna.create_study().ask()
        return build_config(spec, sample_params(trial, spec), device="cpu")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = resolve_spec("ko-retrieval", None)
    counter = ReadCounter()
    _warm(spec, config, run_isolated)
    opts = RunOptions(
        storage_url=url,
        n_trials=n,
        device="cpu",
        objective=OBJECTIVE,
        use_estimate=preflight,
        use_frontier=preflight,
        study_name=name,
    )
    per_trial: list[int] = []
    marks = [0]

    def on_trial(frozen: Any) -> None:
        per_trial.append(counter.main - marks[0])
        marks[0] = counter.main

    def on_progress(budget: int, finished: int) -> None:  # the CLI's progress bar reads this
        pass

    start = _wait_at(barrier)
    counter.on = True
    summary = run_study(spec, opts, on_trial=on_trial, on_progress=on_progress)
    return {
        "start": start,
        "end": time.time(),
        "trials": summary.trials_run,
        "reads_per_trial": per_trial[1:],  # the first holds the start (study open, progress)
        "reads_by_thread": dict(counter.by_thread),
    }


def _run(
    mode: str,
    url: str,
    workers: int,
    trials: int,
    seconds: float,
    *,
    before: Path | None = None,
    preflight: bool = False,
) -> dict[str, Any]:
    import optuna

    from storage import create_storage

    name = f"bench-overhead-{mode}-{uuid.uuid4().hex[:8]}"
    if mode == "plain":  # plain Optuna has no race-free creation: create it beforehand
        optuna.create_study(
            study_name=name, storage=optuna.storages.RDBStorage(url), direction="maximize"
        )
    per_worker = trials // workers if mode == "plain" else trials
    env = {**os.environ, SECONDS_ENV: str(seconds), "OMP_NUM_THREADS": "1"}
    env.pop(ROOT_ENV, None)
    if mode == "before":
        assert before is not None
        env[ROOT_ENV] = str(before)
        # Python 3.11's forkserver ignores the parent's sys.path (its own starts with its
        # working directory): its preloads would find this tree's modules, not the older one's.
        env["PYTHONPATH"] = os.pathsep.join([str(before), str(before / "bench")])
    cwd = str(before) if mode == "before" else None
    with tempfile.TemporaryDirectory() as tmp:
        barrier = Path(tmp)
        command = [sys.executable, __file__, "--role", mode, "--url", url, "--study", name,
                   "--n", str(per_worker), "--barrier", tmp]  # fmt: skip
        if preflight:
            command.append("--preflight")
        procs = [
            subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True, cwd=cwd)
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
    trained = [t for t in done if t.user_attrs.get("oom_kind") not in ("predicted", "frontier")]
    assert len(trained) == trials, f"{mode}: {len(trained)} finished trials, expected {trials}"
    last = max(t.datetime_complete for t in done if t.datetime_complete is not None)
    first = min(t.datetime_start for t in done if t.datetime_start is not None)
    wall = last.timestamp() - go
    reads = [r for o in outs for r in o.get("reads_per_trial", [])]
    others = sum(v for o in outs for k, v in o.get("reads_by_thread", {}).items()
                 if k != "MainThread")  # fmt: skip
    return {
        "wall": wall,
        "startup": first.timestamp() - go,
        "steady": last.timestamp() - first.timestamp(),
        "exit": max(o["end"] for o in outs) - go,
        "throughput": trials / wall,
        "reads_per_trial": sum(reads) / len(reads) if reads else None,
        "reads_max": max(reads) if reads else None,
        "reads_other_threads": others,
    }


def _line(label: str, side: dict[str, Any], plain: dict[str, Any], w: int, n: int) -> str:
    ratio = side["throughput"] / plain["throughput"]
    added = (side["wall"] - plain["wall"]) * w / n
    ratio_steady = plain["steady"] / side["steady"]
    added_steady = (side["steady"] - plain["steady"]) * w / n
    reads = side["reads_per_trial"]
    read_text = (
        f"; trial-list reads per trial {reads:.2f} (max {side['reads_max']}; "
        f"{side['reads_other_threads']} on observer threads)"
        if reads is not None
        else ""
    )
    return (
        f"    {label}: {side['throughput']:.3f} trials/s ({side['wall']:.1f} s; start-up "
        f"{side['startup']:.1f} s; last worker exit {side['exit']:.1f} s); all: ratio "
        f"{ratio:.3f}, added {added:.3f} s/trial; per trial: ratio {ratio_steady:.3f}, added "
        f"{added_steady:.3f} s/trial{read_text}"
    )


def main() -> None:
    """Run the three settings and print the ratios (and the older tree's, with --before)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--short", type=float, default=0.5, help="short trial length (s)")
    parser.add_argument("--long", type=float, default=10.0, help="realistic trial length (s)")
    parser.add_argument("--trials", type=int, default=16, help="trials per short setting")
    parser.add_argument("--long-trials", type=int, default=8, help="trials, realistic setting")
    parser.add_argument("--before", type=Path, help="a worktree of an older commit to compare")
    parser.add_argument("--preflight", action="store_true", help="estimate and frontier on")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--role", choices=["plain", "service", "before"], help=argparse.SUPPRESS)
    parser.add_argument("--study", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--barrier", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "plain":
        print(json.dumps(_role_plain(args.url, args.study, args.n, args.barrier)))
        return
    if args.role in ("service", "before"):
        role = _role_service if args.role == "service" else _role_before
        print(json.dumps(role(args.url, args.study, args.n, args.barrier, args.preflight)))
        return

    from storage import redact_url

    load = os.getloadavg()
    print(
        f"storage {redact_url(args.url)}; {datetime.datetime.now():%Y-%m-%d %H:%M}; "
        f"{os.cpu_count()} cores, load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
        + (f"; before: {args.before}" if args.before else "")
        + ("; preflight on" if args.preflight else "")
    )
    settings = [(args.short, 1, args.trials), (args.short, 4, args.trials),
                (args.long, 4, args.long_trials)]  # fmt: skip
    figures = []
    for seconds, workers, trials in settings:
        plain = _run("plain", args.url, workers, trials, seconds)
        sides = {}
        if args.before is not None:
            sides["before"] = _run(
                "before", args.url, workers, trials, seconds,
                before=args.before, preflight=args.preflight,
            )  # fmt: skip
        sides["service"] = _run(
            "service", args.url, workers, trials, seconds, preflight=args.preflight
        )
        print(
            f"trial {seconds:g} s, {workers} worker(s), {trials} trials: plain "
            f"{plain['throughput']:.3f} trials/s ({plain['wall']:.1f} s)"
        )
        for label, side in sides.items():
            print(_line(label, side, plain, workers, trials))
        figures.append({"seconds": seconds, "workers": workers, "trials": trials,
                        "plain": plain, **sides})  # fmt: skip
    if args.json is not None:
        meta = {
            "load": load,
            "before": str(args.before) if args.before else None,
            "preflight": args.preflight,
            "when": f"{datetime.datetime.now():%Y-%m-%d %H:%M}",
        }
        args.json.write_text(json.dumps({**meta, "settings": figures}, indent=1))


if __name__ == "__main__":
    main()
