"""``search refine``: configs around the top trials that satisfy the conditions, are new, and
that no real OOM of the study rules out.

The study of the last test has a real OOM, as in ``tests/test_runner_oom.py``: a tiny
ko-simcse replica at batch 64 x 256 under a 640 MiB address-space cap, next to a trial at
batch 32 x 128 that completes.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from search.cli import app
from search.record import attrs
from search.sampling.refine import RefineError
from search.sampling.refine import enqueue_refine
from search.sampling.refine import params_key
from search.sampling.refine import refine_candidates
from search.sampling.refine import tried_keys
from search.sampling.sampler import make_pruner
from search.sampling.sampler import make_sampler
from search.spec.load import load_spec
from search.spec.options import DEFAULT_CACHE
from search.spec.options import RunOptions
from search.spec.study_spec import StudySpec
from search.worker.runner import run_study
from search.worker.study_store import open_study
from storage import create_storage

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning"),
]

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search" / "studies" / "data" / "ko-demo"
MIB = 2**20
LIMIT = 640 * MIB  # tests/test_runner_oom.py: batch 64 x 256 cannot fit, loading can
BASE = {"lr": 5e-5, "temperature": 0.03, "warmup_ratio": 0.1, "weight_decay": 0.01}


def _spec(tmp_path: Path, models: str, space: str) -> StudySpec:
    path = tmp_path / "refine.yaml"
    path.write_text(
        f"""study: {{name: refine, n_trials: 2}}
models: {models}
space:
{space}
  lr: {{low: 1.0e-5, high: 2.0e-4, log: true}}
  temperature: {{low: 0.01, high: 0.1, log: true}}
  warmup_ratio: {{low: 0.0, high: 0.2}}
  weight_decay: {{low: 0.0, high: 0.1}}
training: {{epochs: 1, amp: false, gradient_checkpointing: false, hard_negatives: 1,
           seed: 0, max_train_samples: 64}}
data: {{train: {DEMO / "train.jsonl"}, eval: {DEMO}, split: test}}
sampler: {{type: random}}
pruner: {{type: none}}
""",
        encoding="utf-8",
    )
    return load_spec(path)


def _config(model: str, batch: int, length: int, **over: Any) -> dict[str, Any]:
    return {"model": model, "model_path": f"/w/{model}", "batch_size": batch, "max_len": length,
            **BASE, "epochs": 1, "amp": False, "gradient_checkpointing": False,
            "hard_negatives": 1, "seed": 0, "device": "cpu", "train_path": "t", "eval_dir": "e",
            **over}  # fmt: skip


def _done(value: float, config: dict[str, Any]) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        state=TrialState.COMPLETE,
        value=value,
        user_attrs={attrs.DEVICE_MEMORY_MB: 1024.0},
        system_attrs={attrs.SYSTEM_CONFIG: config},
    )


def _oom(config: dict[str, Any], kind: str = "real") -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(
        state=TrialState.PRUNED,
        user_attrs={attrs.OOM: True, attrs.OOM_KIND: kind, attrs.DEVICE_MEMORY_MB: 1024.0},
        system_attrs={attrs.SYSTEM_CONFIG: config},
    )


def _shape(c: dict[str, Any]) -> tuple[str, int, int]:
    return (c["model"], c["batch_size"], c["max_len"])


def _check(cands: list[dict[str, Any]], spec: StudySpec, trials: list[Any]) -> None:
    """Every candidate satisfies the conditions, lies in the space, and is new."""
    tried = tried_keys(trials)
    keys = [params_key(c) for c in cands]
    assert len(set(keys)) == len(keys) and not tried & set(keys)
    for c in cands:
        choices = spec.space.choices_for(c["model"])
        assert c["batch_size"] in choices["batch_size"] and c["max_len"] in choices["max_len"]
        assert spec.space.lr.low <= c["lr"] <= spec.space.lr.high
        assert spec.space.temperature.low <= c["temperature"] <= spec.space.temperature.high


def test_candidates_keep_to_the_conditions_are_new_and_skip_what_an_oom_rules_out(
    tmp_path: Path,
) -> None:
    spec = _spec(
        tmp_path,
        "{multilingual-minilm: {}, bge-m3-ko: {}}",
        "  batch_size: [32, 64, 128]\n  max_len: [128, 256, 384]\n"
        "  conditions: {bge-m3-ko: {batch_size: [32, 64], max_len: [256, 384]}}",
    )
    best = _config("bge-m3-ko", 32, 256)
    trials = [
        _done(0.7, best),
        _done(0.5, _config("multilingual-minilm", 128, 384)),
        _oom(_config("bge-m3-ko", 64, 384)),  # rules out 64 x 384 (same or more memory)
        _oom(_config("bge-m3-ko", 32, 384, lr=1e-4), kind="predicted"),  # a guess: no proof
        _done(0.6, _config("bge-m3-ko", 64, 256)),  # already tried: never again
    ]
    cands = refine_candidates(trials, spec, top_k=1, n=12, rng=random.Random(0))
    assert len(cands) == 12
    _check(cands, spec, trials)
    shapes = [_shape(c) for c in cands]
    assert all(s[0] == "bge-m3-ko" for s in shapes)  # around the top 1 only
    assert ("bge-m3-ko", 64, 384) not in shapes
    # The settings first, at the best trial's own shape: learning rate halved and doubled,
    # temperature halved and doubled, warm-up a quarter of its range down and up.
    own = {"model": "bge-m3-ko", "batch_size": 32, "max_len": 256, **BASE}
    assert cands[:6] == [
        {**own, "lr": BASE["lr"] / 2},
        {**own, "lr": BASE["lr"] * 2},
        {**own, "temperature": BASE["temperature"] / 2},
        {**own, "temperature": BASE["temperature"] * 2},
        {**own, "warmup_ratio": pytest.approx(0.05)},
        {**own, "warmup_ratio": pytest.approx(0.15)},
    ]
    # Then the neighbouring length, with the best trial's own values; the neighbouring batch
    # size (64 x 256) with those values was tried, so it comes back with other ones.
    assert cands[6] == {**own, "max_len": 384}
    assert ("bge-m3-ko", 64, 256) in shapes
    # Every setting moves in the random draws, warm-up and weight decay within a quarter of
    # their range (a top trial with a poor warm-up can still be refined into a good one).
    draws = cands[7:]
    assert {c["warmup_ratio"] for c in draws} != {BASE["warmup_ratio"]}
    assert {c["weight_decay"] for c in draws} != {BASE["weight_decay"]}
    assert all(abs(c["warmup_ratio"] - BASE["warmup_ratio"]) <= 0.05 + 1e-9 for c in draws)
    assert all(0.0 <= c["weight_decay"] <= BASE["weight_decay"] + 0.025 for c in draws)
    lrs = {c["lr"] for c in cands}
    assert min(lrs) >= BASE["lr"] / 2 * 0.999 and max(lrs) <= BASE["lr"] * 2 * 1.001
    # Top 3: the minilm trial too (round-robin over the three), within its own choices.
    both = refine_candidates(trials, spec, top_k=3, n=6, rng=random.Random(0))
    assert {_shape(c)[0] for c in both} == {"bge-m3-ko", "multilingual-minilm"}
    _check(both, spec, trials)


def test_nothing_to_refine_around_is_an_error(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "{ko-simcse: {}}", "  batch_size: [32, 64]\n  max_len: [128, 256]")
    study = optuna.create_study(direction="maximize", sampler=make_sampler(spec))
    study.add_trial(_oom(_config("ko-simcse", 64, 256)))
    assert refine_candidates(study.trials, spec, top_k=3, n=4, rng=random.Random(0)) == []
    with pytest.raises(RefineError, match="no completed trial"):
        enqueue_refine(study, spec, top_k=3, n=4)


def _opts(tmp_path: Path, **over: object) -> RunOptions:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    base: dict[str, object] = dict(
        storage_url=f"sqlite:///{tmp_path}/refine.db",
        tiny=True,
        device="cpu",
        cache_dir=Path(os.environ.get("SEARCH_CACHE", DEFAULT_CACHE)),
        worker="refine-test",
        study_name="refine",
        use_estimate=False,  # let batch 64 x 256 run out of memory for real
    )
    return RunOptions(**(base | over))  # type: ignore[arg-type]


@pytest.mark.train
def test_refine_on_a_study_with_a_real_oom(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "{ko-simcse: {}}", "  batch_size: [32, 64]\n  max_len: [128, 256]")
    opts = _opts(tmp_path)

    def init(study: optuna.Study) -> None:  # the two configs, in this order
        study.set_user_attr(attrs.STUDY_SPEC, spec.public_dict())
        study.set_user_attr(attrs.STUDY_N_TRIALS, 1)
        # Another lr for the OOM: 64 x 256 at BASE is new, only the frontier can rule it out.
        for batch, length, lr in ((64, 256, 1e-4), (32, 128, BASE["lr"])):
            study.enqueue_trial({"model": "ko-simcse", "batch_size": batch, "max_len": length,
                                 **BASE, "lr": lr})  # fmt: skip

    store = create_storage(opts.storage_url)
    open_study(store, "refine", direction="maximize", sampler=make_sampler(spec),
               pruner=make_pruner(spec), on_create=init)  # fmt: skip
    run_study(spec, _opts(tmp_path, memory_limit=LIMIT))  # 64 x 256: a real OOM
    summary = run_study(spec, _opts(tmp_path, n_trials=2, set_n_trials=True))  # 32 x 128
    oom, done = summary.study.get_trials()
    assert oom.user_attrs[attrs.OOM_KIND] == "real", oom.user_attrs.get(attrs.ERROR)
    assert done.state == TrialState.COMPLETE, done.user_attrs.get(attrs.ERROR)
    trials = summary.study.get_trials()

    # On the device the OOM happened on: 64 x 256 is ruled out, its neighbours are not.
    on_limit = refine_candidates(
        trials, spec, top_k=3, n=10, rng=random.Random(1), device_total_bytes=LIMIT
    )
    _check(on_limit, spec, trials)
    shapes = {_shape(c) for c in on_limit}
    assert ("ko-simcse", 64, 256) not in shapes
    assert {("ko-simcse", 64, 128), ("ko-simcse", 32, 256)} <= shapes
    # On the completed trial's own device (no cap: more memory) the OOM proves nothing.
    unbounded = refine_candidates(trials, spec, top_k=3, n=10, rng=random.Random(1))
    assert ("ko-simcse", 64, 256) in {_shape(c) for c in unbounded}

    # The command: enqueued with their stage, the budget grows by the count.
    args = ["refine", "--study", "refine", "--storage", opts.storage_url, "--n-trials", "3"]
    run = CliRunner().invoke(app, [*args, "--memory-limit", "640MiB", "--seed", "1"])
    assert run.exit_code == 0, run.output
    assert "enqueued 3 configs" in run.output and "budget now 5" in run.output
    study = optuna.load_study(study_name="refine", storage=opts.storage_url)
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 3 and study.user_attrs[attrs.STUDY_N_TRIALS] == 5
    assert all(t.user_attrs[attrs.STAGE] == "refine" for t in waiting)
    queued = [t.system_attrs["fixed_params"] for t in waiting]
    assert ("ko-simcse", 64, 256) not in {_shape(c) for c in queued}
    _check(queued, spec, [oom, done])
    # Again: only configs that are neither tried nor queued.
    again = enqueue_refine(study, spec, top_k=3, n=3, seed=1, device_total_bytes=LIMIT)
    assert not {params_key(c) for c in again} & {params_key(c) for c in queued}

    # They run like any trials: the next run takes the first enqueued one.
    after = run_study(spec, _opts(tmp_path, n_trials=3, set_n_trials=True))
    ran = after.study.get_trials()[2]
    assert ran.user_attrs[attrs.STAGE] == "refine" and ran.params == queued[0]
    assert ran.state == TrialState.COMPLETE, ran.user_attrs.get(attrs.ERROR)
