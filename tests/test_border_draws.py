"""``sampler.border_probability``: a share of trials draws among the model's border pairs.

A fixed feasible grid (as in ``tests/test_feasible.py``) under real TPE, random startup and
multivariate proposals alike; a border pair fits only within the estimate's band (False).
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from search.sampling.sampler import make_sampler
from search.sampling.space import sample_params
from search.spec.load import load_spec
from search.spec.study_spec import SpecError
from search.spec.study_spec import StudySpec
from search.spec.study_spec import shipped_spec_path

# Every trained model has sure pairs (True) and one border pair (False); bge-m3-ko none.
GRID = {
    "ko-simcse": {(32, 128): True, (64, 128): True, (128, 128): False},
    "multilingual-minilm": {(32, 128): True, (64, 128): True, (128, 128): False},
    "multilingual-e5-small": {(32, 128): True, (32, 256): True, (64, 256): False},
    "bge-m3-ko": {},
}
N = 60  # 8 random startup trials, then TPE's proposals


def _spec(p: float) -> StudySpec:
    spec = load_spec(shipped_spec_path("ko-retrieval"))
    sampler = spec.sampler.model_copy(update={"border_probability": p})
    return spec.model_copy(update={"stages": [], "sampler": sampler})


def _draws(p: float, seed: int = 3) -> tuple[list[bool], list[bool]]:
    """Per trial: whether it drew a border pair, and whether its coin said border."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = _spec(p)
    sampler = make_sampler(spec, seed=seed)
    sampler.feasible = lambda study: GRID
    study = optuna.create_study(direction="maximize", sampler=sampler)
    border, coins = [], []
    for i in range(N):
        trial = study.ask()
        s = sample_params(trial, spec)
        assert (s.batch_size, s.max_len) in GRID[s.model], s
        border.append(not GRID[s.model][s.batch_size, s.max_len])
        coins.append(sampler.border_trial(study.trials[-1]))
        # The sure pairs score higher: TPE alone would never move to the border.
        study.tell(trial, 0.3 + 0.01 * (i % 5) - (0.2 if border[-1] else 0.0))
    return border, coins


def test_probability_zero_never_draws_a_border_pair() -> None:
    border, coins = _draws(0.0)
    assert not any(border) and not any(coins)


def test_a_small_probability_draws_border_pairs_on_its_coins_deterministically() -> None:
    border, coins = _draws(0.2)
    assert border == coins  # every border draw is a coin's, and every coin draws one
    assert sum(border) == 15  # of 60 trials (p 0.2: 12 expected); fixed under the seed
    assert any(border[:8]) and any(border[8:])  # random startup and TPE's proposals alike
    assert _draws(0.2) == (border, coins)  # the same seed, the same trials
    other, _ = _draws(0.2, seed=4)
    assert other != border and 0 < sum(other) < N / 2


def test_the_coin_is_the_trials_own_not_the_order_of_the_draws() -> None:
    spec = _spec(0.5)
    first, second = make_sampler(spec, seed=11), make_sampler(spec, seed=11)
    study = optuna.create_study()
    trials = [study.ask() for _ in range(20)]
    frozen = {t.number: t for t in study.get_trials(deepcopy=False)}
    ahead = [first.border_trial(frozen[t.number]) for t in trials]
    behind = [second.border_trial(frozen[t.number]) for t in reversed(trials)][::-1]
    assert ahead == behind and 0 < sum(ahead) < 20


def _spec_file(tmp_path: Path, value: str) -> Path:
    text = shipped_spec_path("ko-retrieval").read_text(encoding="utf-8")
    old = "  border_probability: 0.0"  # the shipped spec's, with its comment
    assert text.count(old) == 1
    path = tmp_path / "spec.yaml"
    path.write_text(text.replace(old, f"  border_probability: {value}"), encoding="utf-8")
    return path


def test_a_border_probability_loads(tmp_path: Path) -> None:
    spec = load_spec(_spec_file(tmp_path, "0.1"))
    assert spec.sampler.border_probability == 0.1
    assert load_spec(shipped_spec_path("ko-retrieval")).sampler.border_probability == 0.0


@pytest.mark.parametrize("value", ["1.5", "-0.1", ".nan", "often"])
def test_a_bad_border_probability_is_one_line(tmp_path: Path, value: str) -> None:
    path = _spec_file(tmp_path, value)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "field sampler.border_probability" in message
