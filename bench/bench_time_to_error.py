"""Time from ``search run`` to the error for a user's mistake, against ``search --help``.

Each round runs, as fresh subprocesses (``python -m search.cli``, the same interpreter and
environment), in alternating order:

* **anchor** - ``search --help``: start Python, import the CLI, print the help;
* **each mistake** - ``search run --spec <bad spec>`` (a ``training.epochs`` of 0), a spec with
  a ``max_len`` beyond a model's positions, a training file with a malformed line, and a
  ``--memory-limit`` that is not a size: each must exit 2 with one line.

The headline per mistake is the median of the paired per-round ratios (mistake / anchor) and
the median wall time; the target is an error in under 1.5 s. Before issue 7 the training
stack (torch, transformers) was imported before the spec was read: ~5-9 s.

Run::

    python bench/bench_time_to_error.py            # 7 rounds
    python bench/bench_time_to_error.py --rounds 11
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "search" / "studies" / "ko-retrieval.yaml"
TARGET_S = 1.5


def _write_spec(path: Path, **changes: object) -> Path:
    raw = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def _cases(tmp: Path) -> dict[str, list[str]]:
    bad_train = tmp / "train.jsonl"
    bad_train.write_text('{"query": "질문"}\n', encoding="utf-8")
    db = ["--storage", f"sqlite:///{tmp / 'never.db'}"]
    return {
        "bad spec": ["run", "--spec", str(_write_spec(tmp / "a.yaml", training__epochs=0)), *db],
        "max_len": [
            "run",
            "--spec",
            str(_write_spec(tmp / "b.yaml", space__conditions={}, space__max_len=[1024])),
            *db,
        ],
        "bad data": [
            "run",
            "--spec",
            str(_write_spec(tmp / "c.yaml", data__train=str(bad_train))),
            *db,
        ],
        "bad option": ["run", "--study", "ko-retrieval", "--memory-limit", "lots", *db],
    }


def _time(args: list[str], expect: int) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "search.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    elapsed = time.perf_counter() - start
    if done.returncode != expect:
        raise SystemExit(f"{args}: exit {done.returncode}, expected {expect}: {done.stderr}")
    if expect == 2 and len(done.stderr.strip().splitlines()) != 1:
        raise SystemExit(f"{args}: expected one error line, got: {done.stderr!r}")
    return elapsed


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"# bench_time_to_error  {now}  commit {_commit()}  rounds {args.rounds}  "
        f"cpus {os.cpu_count()}  python {sys.version.split()[0]}"
    )
    with tempfile.TemporaryDirectory() as d:
        cases = _cases(Path(d))
        _time(["--help"], 0)  # warm the file cache once, outside the rounds
        anchor: list[float] = []
        times: dict[str, list[float]] = {name: [] for name in cases}
        for r in range(args.rounds):
            order = list(cases) if r % 2 == 0 else list(reversed(cases))
            if r % 2:
                anchor.append(_time(["--help"], 0))
            for name in order:
                times[name].append(_time(cases[name], 2))
            if not r % 2:
                anchor.append(_time(["--help"], 0))
    print(f"{'command':<28} {'median s':>9} {'min s':>7} {'max s':>7} {'ratio':>7}  target")
    print(
        f"{'search --help (anchor)':<28} {statistics.median(anchor):>9.3f} "
        f"{min(anchor):>7.3f} {max(anchor):>7.3f} {'1.00':>7}"
    )
    worst = 0.0
    for name, values in times.items():
        ratios = [v / a for v, a in zip(values, anchor, strict=True)]
        median = statistics.median(values)
        worst = max(worst, median)
        verdict = "ok" if median < TARGET_S else "MISSED"
        print(
            f"{'run: ' + name:<28} {median:>9.3f} {min(values):>7.3f} {max(values):>7.3f} "
            f"{statistics.median(ratios):>7.2f}  < {TARGET_S} s {verdict}"
        )
    print(
        f"slowest error (median) {worst:.3f} s: {'within' if worst < TARGET_S else 'over'} the "
        f"{TARGET_S} s target; ratio = median of paired per-round ratios (error / --help)"
    )


if __name__ == "__main__":
    main()
