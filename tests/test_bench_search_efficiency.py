"""bench/bench_search_efficiency.py: it runs, its worlds are the documented ones, the surrogate's
noise is common to the strategies, W&B's Hyperband is ported as W&B decides, bad input is
one clear error."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import optuna
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import bench_search_efficiency as bench  # noqa: E402
import surrogate_ko as sk  # noqa: E402

from search.sampling.space import SampledParams  # noqa: E402
from search.sampling.space import build_config  # noqa: E402
from search.worker.trainer import TrainHooks  # noqa: E402


def test_quick_mode_runs_every_available_strategy(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--budget", "8", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["seeds_set"] == "heldout" and data["seeds"] == [1000, 1001, 1002]
    assert list(data["worlds"]) == list(bench.QUICK_WORLDS)
    for name, entry in data["worlds"].items():
        strategies = [s for s in bench.STRATEGIES if bench.available(s)]
        assert list(entry["summary"]) == strategies, name
        assert len(entry["results"]) == 3 * len(strategies)
        assert all(r["trained"] <= 8 for r in entry["results"])


def test_every_documented_world_is_accepted() -> None:
    doc = bench.__doc__ or ""
    flat = bench.flat_spec()
    assert bench.parse_worlds("all") == list(sk.WORLDS)
    for name in sk.WORLDS:
        assert f"``{name}``" in doc, name
        assert bench.parse_worlds(name) == [name]
        assert 0.4 < sk.best_config_score(sk.world(name), 1000, flat) < 1.0, name


def test_bad_world_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--world", "default,gpu-40"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown world 'gpu-40'" in err and "known: default" in err


def _recording_hooks(seen: list[tuple[str, int, dict[str, float]]]) -> TrainHooks:
    def report(step: int, metrics: dict[str, float]) -> bool:
        seen.append(("epoch", step, dict(metrics)))
        return False

    def partial(step: int, metrics: dict[str, float]) -> bool:
        seen.append(("sample", step, dict(metrics)))
        return False

    return TrainHooks(report, partial, None, lambda: False)


def test_noise_is_common_to_strategies() -> None:
    """The same config, step and seed give the same noise whoever trains it: the surrogate's
    draws are keyed by (world, seed, config, step), the strategy is no input."""
    spec = bench.strategy_spec("staged")
    params = SampledParams("multilingual-e5-small", 64, 256, 5e-5, 0.03, 0.1, 0.01)
    cfg = build_config(spec, params, model_path="x", device="cuda")
    cfg = dataclasses.replace(cfg, eval_every_steps=spec.training.eval_every_steps)  # as the step
    w = sk.world("crossing")
    assert sk.eval_noise(w, 7, cfg, 5000, True) == sk.eval_noise(w, 7, cfg, 5000, True)
    assert sk.eval_noise(w, 7, cfg, 5000, True) != sk.eval_noise(w, 8, cfg, 5000, True)
    assert sk.eval_noise(w, 7, cfg, 5000, True) != sk.eval_noise(w, 7, cfg, 10000, True)
    # Two strategies' trainers (the service's fail-fast and the W&B sweep's) see the same values.
    runs: list[list[tuple[str, int, dict[str, float]]]] = [[], []]
    for seen, fail_fast in zip(runs, (True, False), strict=True):
        _, outcome = sk.simulate(w, 7, cfg, _recording_hooks(seen), fail_fast=fail_fast)
        assert outcome.status == "complete"
    assert runs[0] == runs[1] and len(runs[0]) == 20
    kind, step, metrics = runs[0][0]
    assert (kind, step) == ("sample", 5000)
    assert metrics[sk.SE_KEY] == w.se_ratio * w.sample_sd and metrics[sk.TOTAL_KEY] == 100_000
    # band worlds share the default's noise: only the target differs
    d, b = sk.world("default"), sk.world("band2")
    assert sk.curve_value(d, 3, cfg, 5000, True) == sk.curve_value(b, 3, cfg, 5000, True)


def _with_history(study: optuna.Study, values: list[float]) -> None:
    dist = optuna.distributions.FloatDistribution(0, 1)
    study.add_trial(
        optuna.trial.create_trial(
            params={"x": 0.5},
            distributions={"x": dist},
            value=values[-1],
            intermediate_values=dict(enumerate(values, start=1)),
        )
    )


@pytest.mark.parametrize(("current", "stops"), [(0.3, True), (0.45, False)])
def test_wandb_hyperband_decides_as_wandb(current: float, stops: bool) -> None:
    """min_iter 1, eta 2 (bands 1, 2, 4): at iteration 1 the values are -0.5, -0.4 and the
    running run's (minimized); W&B's threshold is sorted(values)[int(3 / 2)]."""
    study = optuna.create_study(direction="maximize")
    _with_history(study, [0.5, 0.6])
    _with_history(study, [0.4, 0.7])
    trial = study.ask()
    trial.report(current, 1)
    pruner = bench.WandbHyperband(min_iter=1, eta=2)
    assert pruner.bands[:3] == [1, 2, 4]
    assert pruner.prune(study, study.trials[-1]) is stops
