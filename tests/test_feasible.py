"""The sampler draws only what the worker's device can run (``search.memory.feasible``).

The grid is the worker's answer (the preflight's, in a run: ``tests/test_skips.py`` runs it on
a real device limit); here a fixed grid checks the sampler's side under real TPE, with its
random startup and its multivariate proposals.
"""

from __future__ import annotations

import optuna

from search.memory.feasible import feasible_grid
from search.memory.preflight import preflight
from search.record.config import TrialConfig
from search.sampling.sampler import make_sampler
from search.sampling.space import sample_params
from search.spec.load import load_spec
from search.spec.study_spec import shipped_spec_path

# True: fits without the estimate's band (a sure pair); False: only within the band.
GRID = {
    "ko-simcse": {(32, 128): True},
    "multilingual-minilm": {(32, 128): True, (64, 128): True, (32, 256): True},
    "multilingual-e5-small": {(32, 128): True, (32, 256): True, (32, 384): True},
    "bge-m3-ko": {},
}


def _draws(grid: dict[str, dict[tuple[int, int], bool]], n: int) -> list[tuple[str, int, int]]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(shipped_spec_path("ko-retrieval")).model_copy(update={"stages": []})
    sampler = make_sampler(spec, seed=3)
    sampler.feasible = lambda study: grid
    study = optuna.create_study(direction="maximize", sampler=sampler)
    out = []
    for i in range(n):
        trial = study.ask()
        p = sample_params(trial, spec)
        out.append((p.model, p.batch_size, p.max_len))
        study.tell(trial, 0.1 + 0.01 * (i % 7) + (0.2 if p.max_len == 256 else 0.0))
    return out


def test_batch_and_length_are_drawn_among_the_pairs_that_fit() -> None:
    draws = _draws(GRID, 30)  # 8 random startup trials, then TPE's proposals
    assert all((b, m) in GRID[model] for model, b, m in draws), draws
    assert "bge-m3-ko" not in {model for model, _, _ in draws}  # nothing of it fits
    assert {model for model, _, _ in draws} == set(GRID) - {"bge-m3-ko"}
    assert {(32, 256), (64, 128)} & {(b, m) for model, b, m in draws if model != "ko-simcse"}


def test_without_any_pair_that_fits_every_model_is_drawn_as_before() -> None:
    draws = _draws({model: {} for model in GRID}, 16)
    spec = load_spec(shipped_spec_path("ko-retrieval"))
    assert len({model for model, _, _ in draws}) > 1
    for model, b, m in draws:  # the conditions still hold; the preflight then decides
        choices = spec.space.choices_for(model)
        assert b in choices["batch_size"] and m in choices["max_len"]


def test_a_border_pair_is_drawn_only_when_the_model_has_no_sure_pair() -> None:
    # minilm's 128 x 128 fits only within the band: neither a random draw nor TPE's proposal
    # (rewarded scores favour larger batches here) takes it while minilm has sure pairs.
    grid = {**GRID, "multilingual-minilm": {**GRID["multilingual-minilm"], (128, 128): False}}
    draws = _draws(grid, 40)
    assert all((b, m) in grid[model] for model, b, m in draws), draws
    assert ("multilingual-minilm", 128, 128) not in draws
    only_border = {**grid, "multilingual-minilm": {(128, 128): False}}
    assert ("multilingual-minilm", 128, 128) in _draws(only_border, 12)  # nothing sure left


def test_the_grid_is_the_preflights_answer_pair_by_pair() -> None:
    from _factories import trial_config

    from search.memory.device import DeviceInfo
    from search.record.models import MODELS
    from search.train.tiny import tiny_info

    device = DeviceInfo("cpu", "cpu (limit 600 MiB)", 600 * 2**20, 600 * 2**20)
    arch = tiny_info(MODELS["ko-simcse"])
    choices = {"ko-simcse": {"batch_size": [8, 32, 128], "max_len": [32, 128, 512]}}

    def config_for(model: str, batch: int, max_len: int) -> TrialConfig:
        return trial_config(model=model, batch_size=batch, max_len=max_len, device="cpu")

    grid = feasible_grid(choices, config_for, lambda _: arch, device, [])
    expected = {
        (b, m)
        for b in (8, 32, 128)
        for m in (32, 128, 512)
        if not preflight(config_for("ko-simcse", b, m), arch, device, []).skip
    }
    assert set(grid["ko-simcse"]) == expected
    assert (8, 32) in expected and (128, 512) not in expected  # some fit, some do not
    for b, m in expected:  # sure: the estimate itself fits, not only within the band
        estimate = preflight(config_for("ko-simcse", b, m), arch, device, []).estimate
        assert grid["ko-simcse"][b, m] == (estimate.total_bytes <= device.free_bytes)
    assert not all(grid["ko-simcse"].values()) and any(grid["ko-simcse"].values())


def test_a_trained_trial_makes_the_pairs_estimated_no_higher_sure() -> None:
    from _factories import trial_config

    from search.memory.device import DeviceInfo
    from search.record import attrs
    from search.record.models import MODELS
    from search.train.tiny import tiny_info

    device = DeviceInfo("cpu", "cpu (limit 600 MiB)", 600 * 2**20, 600 * 2**20)
    arch = tiny_info(MODELS["ko-simcse"])
    choices = {"ko-simcse": {"batch_size": [32, 128], "max_len": [128]}}

    def config_for(model: str, batch: int, max_len: int) -> TrialConfig:
        return trial_config(model=model, batch_size=batch, max_len=max_len, device="cpu")

    before = feasible_grid(choices, config_for, lambda _: arch, device, [])
    assert before["ko-simcse"] == {(32, 128): True, (128, 128): False}  # 222 / 727 MiB
    trained = optuna.trial.create_trial(
        state=optuna.trial.TrialState.COMPLETE,
        value=0.3,
        user_attrs={
            attrs.MEMORY_ESTIMATE_MB: 730.0,
            attrs.DEVICE_MEMORY_MB: 600.0,
            attrs.DEVICE_KIND: "cpu",
        },
    )
    after = feasible_grid(choices, config_for, lambda _: arch, device, [trained])
    assert after["ko-simcse"] == {(32, 128): True, (128, 128): True}
