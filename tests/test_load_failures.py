"""Weights that do not load: the trial says why, and the worker stops sampling that model.

Real tiny replicas, made unloadable on disk: one whose ``config.json`` asks for twice the hidden
size its weights have (transformers' own error only pointed at a report its quieted logging
hid), one whose ``model.safetensors`` lost its last bytes (the header still parses). Both are
loaded for real, in the worker's trial child.

The up-front weights check (``search.spec.model_facts``) stops a mismatched or truncated file
before any trial; these tests drive the worker past it on purpose (``Worker.open`` with
``model_paths`` and ``facts`` given: what loads is the caller's word), as a load failure that
no header shows (a broken tokenizer, a file changed after the check) would reach the trials.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from search.record import attrs
from search.record.errors import RunError
from search.record.models import MODELS
from search.record.trial_record import error_of
from search.spec.load import load_spec
from search.spec.options import DEFAULT_CACHE
from search.spec.options import RunOptions
from search.train.data import load_train
from search.train.tiny import build_tiny_replica
from search.train.tiny_layout import replica_facts
from search.worker.load_failures import LOAD_FAILURES_IN_A_ROW
from search.worker.worker import Worker

pytestmark = [
    pytest.mark.train,
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
]

HERE = "test_load_failures"  # the child imports load_only below by this module name
DEMO = Path(__file__).resolve().parents[1] / "search" / "studies" / "data" / "ko-demo"
INFO = MODELS["multilingual-minilm"]


def load_only(cfg: Any, *, report: Any = None, on_phase: Any = None) -> dict[str, Any]:
    """Load the trial's encoder as the training loop does (the same call), then stop."""
    from search.train.encoder import BiEncoder

    BiEncoder.from_config(cfg)
    return {"metrics": {"ndcg@10": 0.5}}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    cache = Path(os.environ.get("SEARCH_CACHE", DEFAULT_CACHE)) / "tiny"  # reuse a built one
    texts = [t for ex in load_train(DEMO / "train.jsonl") for t in (ex.query, ex.positive)]
    good = build_tiny_replica(INFO, cache, texts)
    out = tmp_path_factory.mktemp("unloadable")
    mismatched, truncated = out / "mismatched", out / "truncated"
    shutil.copytree(good, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    config["hidden_size"] *= 2
    config["intermediate_size"] *= 2
    (mismatched / "config.json").write_text(json.dumps(config))
    shutil.copytree(good, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4096])  # the header parses; the data fall short
    return {"good": good, "mismatched": mismatched, "truncated": truncated}


def _worker(
    tmp_path: Path, paths: dict[str, Path], n_trials: int, objective: str, good: Path
) -> Worker:
    spec_path = tmp_path / "load.yaml"
    models = "\n".join(f"  {name}: {{path: {path}}}" for name, path in paths.items())
    spec_path.write_text(
        f"""study: {{name: load, direction: maximize, metric: ndcg@10, n_trials: {n_trials}}}
models:
{models}
space:
  batch_size: [8]
  max_len: [32]
  lr: {{low: 1.0e-5, high: 5.0e-3, log: true}}
  temperature: {{low: 0.01, high: 0.1, log: true}}
  warmup_ratio: {{low: 0.0, high: 0.2}}
  weight_decay: {{low: 0.0, high: 0.1}}
training: {{epochs: 1, amp: false, gradient_checkpointing: false, hard_negatives: 0,
           seed: 0, max_train_samples: 16}}
data: {{train: {DEMO / "train.jsonl"}, eval: {DEMO}, split: test}}
sampler: {{type: random, seed: 3}}
pruner: {{type: none}}
""",
        encoding="utf-8",
    )
    spec = load_spec(spec_path)
    opts = RunOptions(
        storage_url=f"sqlite:///{tmp_path}/load.db",
        device="cpu",
        objective=objective,
        use_estimate=False,
        use_frontier=False,
    )
    facts = replica_facts(INFO, good)  # the replica's own (the broken ones' are the same)
    assert facts is not None
    return Worker.open(
        spec,
        opts,
        model_paths={name: str(path) for name, path in paths.items()},
        facts=dict.fromkeys(paths, facts),
    )


def test_a_mismatched_model_fails_with_the_real_reason_then_the_run_stops(
    tmp_path: Path, replicas: dict[str, Path]
) -> None:
    """The real training objective; the only model never loads: two trials, then one line."""
    paths = {"mismatched": replicas["mismatched"]}
    worker = _worker(tmp_path, paths, 10, "search.train.loop:train", replicas["good"])
    try:
        with pytest.raises(RunError) as caught:
            while not worker.step().stopped:
                pass
    finally:
        worker.close()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"no model left to search: the last {LOAD_FAILURES_IN_A_ROW} trials of 'mismatched' "
        "failed to load it: Cannot load model 'mismatched' from "
    )
    assert "its weights do not match its config.json: " in message
    assert "is [4000, 64] in the weights but [4000, 128] by the config" in message
    assert "see the above report" not in message
    trials = optuna.load_study(study_name="load", storage=worker.opts.storage_url).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] * LOAD_FAILURES_IN_A_ROW
    for trial in trials:
        assert trial.user_attrs[attrs.OUTCOME] == attrs.OUTCOME_FAILED
        assert error_of(trial).startswith("ModelLoadError: Cannot load model 'mismatched'")
        assert "differ in shape, e.g. " in error_of(trial)


def test_a_truncated_model_is_not_sampled_after_two_load_failures(
    tmp_path: Path, replicas: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Two models, one truncated: after its second load failure only the other is sampled, and
    the run spends its budget on it."""
    paths = {"truncated": replicas["truncated"], "good": replicas["good"]}
    worker = _worker(tmp_path, paths, 7, f"{HERE}:load_only", replicas["good"])
    with caplog.at_level(logging.WARNING, logger="search.worker.load_failures"):
        try:
            while not worker.step().stopped:
                pass
        finally:
            worker.close()
    trials = sorted(worker.study.get_trials(), key=lambda t: t.number)
    models = [t.params["model"] for t in trials]
    failed = [t.number for t in trials if t.state == TrialState.FAIL]
    assert [models[n] for n in failed] == ["truncated"] * LOAD_FAILURES_IN_A_ROW, models
    assert "truncated" not in models[failed[-1] + 1 :], models  # given up after the second
    assert [t.state for t in trials if t.params["model"] == "good"] == [TrialState.COMPLETE] * (
        len(trials) - LOAD_FAILURES_IN_A_ROW
    )
    assert len(trials) == 7  # the budget was spent, on the model that loads
    error = error_of(trials[failed[0]])
    assert "its weights file cannot be read, truncated or corrupt (SafetensorError: " in error
    [line] = [r.getMessage() for r in caplog.records if "not searched" in r.getMessage()]
    assert line.startswith(
        "model 'truncated' is not searched for the rest of this run: its last 2 trials failed "
        "to load it: Cannot load model 'truncated'"
    )
