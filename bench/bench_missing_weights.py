"""How fast does ``search run`` stop when the model weights are missing? (issue 10)

Runs ``search run --study ko-retrieval --n-trials 2`` (no ``--tiny``) as a user would, offline
(``HF_HUB_OFFLINE=1``) with an empty Hugging Face cache (``HF_HOME`` in a temporary directory),
``--repeat`` times, and reports the median wall time and CPU time (user + system of the child)
to its exit. It must exit 2, print one ``hf download`` line per shipped model and leave no
SQLite file. Anchor, in the same run: ``search --help`` (the CLI's own start-up), so the ratio
says how much the check adds on top of starting the command.

    python bench/bench_missing_weights.py --repeat 3
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _timed(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, int, str]:
    """(wall s, child CPU s, exit code, stderr) of ``python -m search.cli ARGS``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "search.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode, proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    runs: list[tuple[float, float]] = []
    anchors: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "hf").mkdir()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(work / "hf")}
        env["PYTHONPATH"] = str(root)
        for name in ("HF_HUB_CACHE", "SEARCH_STORAGE", "SEARCH_STORAGE_FILE"):
            env.pop(name, None)
        for i in range(args.repeat):
            wall, cpu, code, _ = _timed(["--help"], work, env)
            assert code == 0
            anchors.append((wall, cpu))
            db = work / f"s{i}.db"
            run = ["run", "--study", "ko-retrieval", "--n-trials", "2"]
            wall, cpu, code, err = _timed([*run, "--storage", f"sqlite:///{db}"], work, env)
            lines = [ln for ln in err.splitlines() if "hf download" in ln]
            assert code == 2 and len(lines) == 4, (code, err)
            assert not db.exists(), "the SQLite file was created"
            runs.append((wall, cpu))
    wall = statistics.median(w for w, _ in runs)
    cpu = statistics.median(c for _, c in runs)
    anchor_wall = statistics.median(w for w, _ in anchors)
    anchor_cpu = statistics.median(c for _, c in anchors)
    print(
        f"search run without weights: exit 2 after {wall:.2f} s wall, {cpu:.2f} s CPU "
        f"(median of {args.repeat}; 4 'hf download' lines, no SQLite file)"
    )
    print(f"anchor search --help: {anchor_wall:.2f} s wall, {anchor_cpu:.2f} s CPU")
    print(f"ratio: {wall / anchor_wall:.2f}x wall, {cpu / anchor_cpu:.2f}x CPU")


if __name__ == "__main__":
    main()
