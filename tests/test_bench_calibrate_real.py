"""bench/bench_calibrate_real.py --quick: two tiny configs of the real all-MiniLM-L6-v2 on
KLUE-NLI, trained by the product's loop, give finite calibration figures (issue 16)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.train
def test_quick_calibration_gives_finite_figures(tmp_path: Path, klue_json: Path) -> None:
    out = tmp_path / "calib.json"
    cmd = [sys.executable, "bench/bench_calibrate_real.py", "--quick", "--klue", str(klue_json)]
    proc = subprocess.run(
        [*cmd, "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["n_configs"] == 2 and data["n_paired"] == 2
    assert set(data["spearman_at"]) == {"0.1", "0.25", "0.5"}
    assert set(data["spearman_sample_at"]) == {"0.1", "0.25", "0.5"}
    # At half of training the two configs' full scores differ: a rank correlation of +-1.
    assert abs(data["spearman_at"]["0.5"]) == pytest.approx(1.0)
    assert any(math.isfinite(v) for v in data["spearman_sample_curve"].values())
    assert math.isfinite(data["sample_noise_mean"])
    for key in ("sample_noise_sd", "analytic_se", "final_sd"):
        assert math.isfinite(data[key]) and data[key] >= 0, key
    assert data["sample_noise_points"] >= 2
    # The same config trained twice reaches the same states: the pairing's premise.
    assert data["determinism_max_loss_diff"] == 0.0
    assert data["determinism_max_epoch_score_diff"] == 0.0
    assert all(math.isfinite(v) and v > 0 for v in data["curve_at"].values())
    assert "Spearman" in proc.stdout and "sample - full" in proc.stdout
