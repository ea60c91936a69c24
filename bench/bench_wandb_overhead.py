"""What one W&B run per trial costs a worker: tiny trials with W&B offline vs off, paired rounds.

Each round runs the same tiny study twice, each time as a fresh worker process (what
``search worker`` is): ``run_study`` with the CLI's observers (its W&B runs come from the
tracking subscriber, on the worker's event thread) on its own SQLite file, ``--tiny`` replicas
of ko-simcse trained for real on the shipped demo data (2 epochs), a seeded random sampler, no
pruner.
One side has ``--no-wandb``, the other ``--wandb`` with ``WANDB_MODE=offline``: the worker
imports wandb, starts its service once, and per trial opens a run, logs every training step
(streamed from the trial process over its pipe) and every epoch, and finishes it with the
summary. The trial process server is warmed before the clock starts (the same on both sides);
the clock covers ``run_study``. Per trial is the steady state, (last trial's end - first
trial's end) / (N - 1); what a worker pays once (importing wandb, starting its service and
the first run) shows as the first trial's extra time. The order alternates between rounds;
the headline is the median over rounds of the paired per-trial difference and ratio. On a
loaded machine those differences are noisy, so the worker also adds up the time spent inside
its W&B calls (start, per-step and per-epoch logging, finish) per trial.

It also times the alternative, a run created inside each trial process: a fresh Python
process with wandb already imported (as a forkserver preload would have it) opening one run,
logging the same steps and finishing it - that start is paid by every trial, not once per
worker. And the cost of one logged step (``run.log``) for long trials.

Run::

    python bench/bench_wandb_overhead.py               # 5 rounds of 6 trials a side
    python bench/bench_wandb_overhead.py --rounds 7 --trials 8

Target: under 1 s a trial, or under 2% of a tiny trial's time, whichever is larger.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "search" / "studies" / "data" / "ko-demo"

SPEC = """study: {{name: wandb-bench, direction: maximize, metric: ndcg@10, n_trials: {n}}}
models:
  ko-simcse: {{}}
space:
  batch_size: [16]
  max_len: [32]
  lr: {{low: 1.0e-5, high: 2.0e-4, log: true}}
  temperature: {{low: 0.01, high: 0.1, log: true}}
  warmup_ratio: {{low: 0.0, high: 0.2}}
  weight_decay: {{low: 0.0, high: 0.1}}
training: {{epochs: 2, amp: false, hard_negatives: 1, seed: 0, max_train_samples: 64}}
data: {{train: {train}, eval: {eval}, split: test}}
sampler: {{type: random}}
pruner: {{type: none}}
"""


def _worker(spec_path: str, db: str, n: int, wandb_on: bool) -> None:
    """One worker process: warm the trial server, then time ``run_study`` (prints JSON)."""
    from search.observe.subscribers import standard_subscribers
    from search.spec.load import load_spec
    from search.spec.options import DEFAULT_CACHE
    from search.spec.options import RunOptions
    from search.worker.isolation import warm_up
    from search.worker.runner import run_study

    warm_up()
    spent = _time_wandb_calls() if wandb_on else {}
    opts = RunOptions(
        storage_url=f"sqlite:///{db}",
        n_trials=n,
        seed=3,
        tiny=True,
        device="cpu",
        cache_dir=Path(os.environ.get("SEARCH_CACHE", DEFAULT_CACHE)),
        wandb=wandb_on,
    )
    spec = load_spec(spec_path)
    ends: list[float] = []
    start = time.perf_counter()
    summary = run_study(
        spec,
        opts,
        subscribers=standard_subscribers(spec, opts),
        on_trial=lambda _: ends.append(time.perf_counter()),
    )
    wall = time.perf_counter() - start
    trials = summary.study.get_trials()
    runs = sum(1 for t in trials if "wandb_run_id" in t.user_attrs)
    steady = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else wall
    out = {"wall": wall, "first": ends[0] - start, "steady": steady, "runs": runs}
    print(json.dumps(out | {"calls": {k: v / len(trials) for k, v in spent.items()}}))


def _time_wandb_calls() -> dict[str, float]:
    """Wrap the worker's W&B calls to add up the seconds spent in them (by kind)."""
    from search.observe import tracking

    spent = {"start": 0.0, "log": 0.0, "finish": 0.0}

    def timed(kind: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[kind] += time.perf_counter() - t

        return wrapper

    tracking.Tracker.start = timed("start", tracking.Tracker.start)  # type: ignore[method-assign]
    for name in ("log_step", "log_epoch"):
        setattr(tracking.TrialRun, name, timed("log", getattr(tracking.TrialRun, name)))
    tracking.TrialRun.finish = timed("finish", tracking.TrialRun.finish)  # type: ignore[method-assign]
    return spent


def _child_side(steps: int) -> None:
    """A fresh process with wandb imported: one run's start, steps and finish (prints JSON)."""
    import wandb

    out = Path(tempfile.mkdtemp(prefix="wandb-child-"))
    start = time.perf_counter()
    run = wandb.init(
        project="wandb-bench",
        dir=str(out),
        mode="offline",
        config={"model": "ko-simcse"},
        settings=wandb.Settings(
            silent=True, console="off", x_disable_stats=True, x_disable_meta=True
        ),
    )
    opened = time.perf_counter()
    for step in range(steps):
        run.log({"train/loss": 1.0 / (step + 1), "train/lr": 1e-4, "train/memory_mb": 1.0})
    logged = time.perf_counter()
    run.summary.update({"outcome": "complete"})
    run.finish()
    done = time.perf_counter()
    print(
        json.dumps(
            {
                "init": opened - start,
                "log_per_step_ms": 1000 * (logged - opened) / max(steps, 1),
                "total": done - start,
            }
        )
    )


def _run(args: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--log-steps", type=int, default=2000, help="steps for the log cost")
    parser.add_argument("--role", choices=["worker", "child"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--wandb", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "worker":
        _worker(args.spec, args.db, args.trials, args.wandb)
        return
    if args.role == "child":
        _child_side(args.log_steps)
        return

    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env |= {
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),  # spinning threads on a busy box
        "PYTHONPATH": str(ROOT / "bench"),
    }
    work = Path(tempfile.mkdtemp(prefix="bench-wandb-"))
    spec = work / "spec.yaml"
    spec.write_text(
        SPEC.format(n=args.trials, train=DEMO / "train.jsonl", eval=DEMO), encoding="utf-8"
    )
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# bench_wandb_overhead {now}, commit {commit}, {os.cpu_count()} CPUs")
    print(f"# {args.rounds} rounds x {args.trials} tiny trials a side, fresh worker per side")
    # Build the tiny replica once, outside the clock.
    _run(["--role", "worker", "--spec", str(spec), "--db", str(work / "warm.db"),
          "--trials", "1"], env)  # fmt: skip
    diffs, ratios, offs, firsts, calls = [], [], [], [], []
    print("round  off s/trial  on s/trial  added s/trial  on/off  first trial added s  runs")
    for r in range(args.rounds):
        sides = [False, True] if r % 2 == 0 else [True, False]
        result: dict[bool, dict] = {}
        for on in sides:
            db = work / f"r{r}-{'on' if on else 'off'}" / "study.db"
            db.parent.mkdir()
            cmd = ["--role", "worker", "--spec", str(spec), "--db", str(db)]
            cmd += ["--trials", str(args.trials)] + (["--wandb"] if on else [])
            result[on] = _run(cmd, env)
        off, on_ = result[False]["steady"], result[True]["steady"]
        first = result[True]["first"] - result[False]["first"]
        offs.append(off)
        diffs.append(on_ - off)
        ratios.append(on_ / off)
        firsts.append(first)
        calls.append(result[True]["calls"])
        print(
            f"{r:5d}  {off:11.3f}  {on_:10.3f}  {on_ - off:+13.3f}  {on_ / off:6.3f}"
            f"  {first:+19.3f}  {result[True]['runs']}/{args.trials}"
        )
    added, ratio, tiny = (
        statistics.median(diffs),
        statistics.median(ratios),
        statistics.median(offs),
    )
    target = max(1.0, 0.02 * tiny)
    print(
        f"median: tiny trial {tiny:.2f} s off; W&B adds {added:+.3f} s a trial "
        f"(on/off {ratio:.3f}); target < {target:.2f} s: {'met' if added < target else 'MISSED'}"
    )
    print(
        f"median once per worker (start to the first trial's end): "
        f"{statistics.median(firsts):+.3f} s"
    )
    inside = {k: statistics.median(c[k] for c in calls) for k in ("start", "log", "finish")}
    print(
        f"inside W&B calls on the worker, per trial (median): {sum(inside.values()):.3f} s "
        f"(start {inside['start']:.3f}, logging {inside['log']:.3f}, "
        f"finish {inside['finish']:.3f}; the first run's start included, spread over the trials)"
    )
    child = [_run(["--role", "child", "--log-steps", str(args.log_steps)], env) for _ in range(5)]
    init = statistics.median(c["init"] for c in child)
    total = statistics.median(c["total"] for c in child)
    per_step = statistics.median(c["log_per_step_ms"] for c in child)
    print(
        f"run in the trial process instead (fresh process, wandb imported, 5 runs): start "
        f"{init:.3f} s, start+{args.log_steps} steps+finish {total:.3f} s - paid by every trial"
    )
    print(f"run.log: {per_step:.3f} ms a step (median of 5 x {args.log_steps} steps)")


if __name__ == "__main__":
    main()
