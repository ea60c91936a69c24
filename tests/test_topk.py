"""The top-K rule: after 20 tiny trials exactly K models are kept, those of the K best trials.

The trials are real (``run_study`` on a tiny replica, a few training pairs, one epoch), so
each one saves a real sentence-transformers directory in its own process and the worker's
keep subscriber uploads and removes real artifacts in the study's directory beside the SQLite
file. A second test plays two workers on one study in the order that could break the rule:
both tell before either uploads, one prunes before the other's upload is recorded, then both
prune at the same moment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

import optuna
import pytest
from _factories import trial_config
from optuna.trial import TrialState

from search.observe.keep import ModelKeeper
from search.observe.keep import extract_model
from search.observe.keep import keeper_for
from search.observe.keep import kept_models
from search.observe.keep import model_artifacts
from search.observe.keep import open_store
from search.observe.keep import removed_artifacts
from search.observe.keep import store_location
from search.observe.report import study_report
from search.observe.report_view import report_text
from search.observe.subscribers import standard_subscribers
from search.record.config import SaveBar
from search.record.config import TrialConfig
from search.spec.load import load_spec
from search.spec.options import DEFAULT_CACHE
from search.spec.options import RunOptions
from search.spec.study_spec import PACKAGE_DIR
from search.spec.study_spec import SpecError
from search.train.export import read_search_json
from search.worker.isolation import TrialOutcome
from search.worker.runner import run_study
from storage import create_storage

DEMO = PACKAGE_DIR / "studies/data/ko-demo"
K = 3
N = 20


def _spec(tmp_path: Path, top_k: int) -> Path:
    path = tmp_path / "topk.yaml"
    path.write_text(
        f"""study: {{name: topk, direction: maximize, metric: ndcg@10, n_trials: {N}}}
models:
  multilingual-minilm: {{}}
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
sampler: {{type: random, seed: 1}}
pruner: {{type: none}}
artifacts: {{top_k: {top_k}}}
""",
        encoding="utf-8",
    )
    return path


def _opts(tmp_path: Path) -> RunOptions:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    return RunOptions(
        storage_url=f"sqlite:///{tmp_path}/topk.db",
        tiny=True,
        device="cpu",
        cache_dir=Path(os.environ.get("SEARCH_CACHE", DEFAULT_CACHE)),  # reuse built replicas
        worker="topk-test",
        use_estimate=False,
    )


@pytest.mark.train
def test_twenty_trials_leave_the_k_best_models(tmp_path: Path) -> None:
    spec, opts = load_spec(_spec(tmp_path, K)), _opts(tmp_path)
    summary = run_study(spec, opts, subscribers=standard_subscribers(spec, opts))
    study = summary.study
    complete = [t for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert summary.trials_run == N and len(complete) == N
    best = sorted(complete, key=lambda t: (-t.value, t.number))[:K]

    kept = kept_models(study)
    assert sorted(kept) == sorted(t.number for t in best)
    store_dir = tmp_path / "topk.db.artifacts"
    assert {location for _, location in kept.values()} == {str(store_dir.resolve())}
    # The directory holds exactly the K kept models (every other upload was removed).
    assert sorted(p.name for p in store_dir.iterdir()) == sorted(a for a, _ in kept.values())
    uploaded = model_artifacts(study)  # recorded as study system attributes, after the tell
    assert len(uploaded) > K  # the rule was exercised: some models were pushed out
    # A trial that K kept models already beat when it started wrote no model (no "save" phase).
    saved = {t.number for t in complete if "save" in t.system_attrs["search:timings"]}
    assert set(uploaded) <= saved and K <= len(saved) < N
    assert removed_artifacts(study) == {a for n, (a, _) in uploaded.items() if n not in kept}

    # The report lists them, best first (the lean RDB read and Optuna's agree).
    report = study_report(study, storage=create_storage(_opts(tmp_path).storage_url))
    assert [m["trial"] for m in report["kept_models"]] == [t.number for t in best]
    assert report["kept_models"] == study_report(study)["kept_models"]
    assert "kept models: trials " + ", ".join(str(t.number) for t in best) in report_text(report)

    # A kept model is the trial's sentence-transformers directory, with its search.json.
    top = best[0]
    out = tmp_path / "best"
    meta = extract_model(open_store(str(store_dir)), kept[top.number][0], out)
    assert (out / "modules.json").is_file() and (out / "model.safetensors").is_file()
    assert meta == read_search_json(out)
    assert meta["study"] == study.study_name and meta["trial"] == top.number
    assert meta["value"] == pytest.approx(top.value)
    assert meta["config"]["lr"] == pytest.approx(top.params["lr"])
    assert [h["ndcg@10"] for h in meta["history"]] == pytest.approx([top.value])


def _saved(keeper: ModelKeeper, number: int) -> None:
    """What a trial's process leaves in its save_dir (a stand-in: the keeper checks the files)."""
    cfg = keeper.prepare(trial_config(), number)
    assert cfg.save_dir is not None and not Path(cfg.save_dir).exists()  # a path, no I/O
    Path(cfg.save_dir).mkdir()  # the trial's process creates it when it saves
    (Path(cfg.save_dir) / "modules.json").write_text("[]")
    (Path(cfg.save_dir) / "model.safetensors").write_bytes(b"\0" * 1024)


def _trained(keeper: ModelKeeper) -> optuna.trial.Trial:
    trial = keeper.study.ask()
    _saved(keeper, trial.number)
    return trial


def _keep(keeper: ModelKeeper, trial: optuna.trial.Trial, value: float) -> None:
    """What the keep subscriber does once the trial is told: upload if it enters the top K."""
    keeper.keep(
        trial.number, TrialOutcome(status="complete", metrics={"ndcg@10": value}), "ndcg@10"
    )


def _finish(keeper: ModelKeeper, value: float) -> optuna.trial.Trial:
    trial = _trained(keeper)
    keeper.study.tell(trial, value)
    _keep(keeper, trial, value)
    return trial


def test_two_workers_finishing_together_leave_exactly_k(tmp_path: Path) -> None:
    """Both tell before either uploads, one prunes before the other's upload is recorded,
    both prune at once."""
    url, store = f"sqlite:///{tmp_path}/race.db", tmp_path / "store"
    optuna.create_study(study_name="race", storage=url, direction="maximize")
    a, b = (
        ModelKeeper(optuna.load_study(study_name="race", storage=url), 2, str(store))
        for _ in range(2)
    )
    for value in (0.5, 0.6, 0.7):  # three earlier trials, one worker after the other
        _finish(a, value)
        a.prune()
    lost = _trained(a)  # a model uploaded for a trial that did not complete must go too
    a.study.tell(lost, state=optuna.trial.TrialState.FAIL)
    _keep(a, lost, 0.95)

    first, second = _trained(a), _trained(b)
    a.study.tell(first, 0.9)  # both told, neither uploaded yet: both enter the top 2
    b.study.tell(second, 0.8)
    _keep(a, first, 0.9)
    a.prune()  # before the second's upload is recorded: it does not see that model
    _keep(b, second, 0.8)
    barrier = threading.Barrier(2)

    def prune(keeper: ModelKeeper) -> None:
        barrier.wait()
        keeper.prune()  # both remove the same artifacts: the loser's "not found" is fine

    threads = [threading.Thread(target=prune, args=(k,)) for k in (a, b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    study = optuna.load_study(study_name="race", storage=url)
    kept = kept_models(study)
    assert sorted(kept) == sorted([first.number, second.number])
    assert sorted(p.name for p in store.iterdir()) == sorted(a for a, _ in kept.values())
    assert lost.number not in kept


def test_where_models_are_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The spec's artifacts.store (relative to the spec), else $SEARCH_ARTIFACTS, else beside
    the SQLite file; a server database with neither keeps nothing and says so once."""
    monkeypatch.delenv("SEARCH_ARTIFACTS", raising=False)
    spec = load_spec(_spec(tmp_path, K))
    pg = "postgresql://u@db:5432/s"
    assert store_location(spec, f"sqlite:///{tmp_path}/s.db") == str(tmp_path / "s.db.artifacts")
    assert store_location(spec, pg) is None
    monkeypatch.setenv("SEARCH_ARTIFACTS", str(tmp_path / "env"))
    assert store_location(spec, pg) == str(tmp_path / "env")
    text = _spec(tmp_path, K).read_text() + "  store: models\n"
    (tmp_path / "stored.yaml").write_text(
        text.replace("artifacts: {top_k: 3}\n", "artifacts:\n  top_k: 3\n")
    )
    stored = load_spec(tmp_path / "stored.yaml")
    assert store_location(stored, pg) == str(tmp_path / "models")
    assert store_location(stored, pg, option="s3://bucket") == "s3://bucket"

    monkeypatch.delenv("SEARCH_ARTIFACTS")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/w.db")
    opts = RunOptions(storage_url=pg)
    keeper = keeper_for(study, spec, opts)
    assert not keeper.active and keeper_for(study, spec, opts) is keeper
    warned = [r.getMessage() for r in caplog.records if r.name == "search.observe.keep"]
    assert len(warned) == 1 and "no model is kept" in warned[0]
    cfg = trial_config()
    assert keeper.prepare(cfg, 0) is cfg  # no save_dir: the trial saves nothing


def test_a_bad_top_k_is_one_line(tmp_path: Path) -> None:
    path = _spec(tmp_path, -1)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert "artifacts.top_k" in str(err.value) and "\n" not in str(err.value)


def test_the_save_bar_is_the_k_th_kept_value(tmp_path: Path) -> None:
    """Once K models are kept, a trial is told the K-th best kept value: ending worse, it
    cannot be kept, so it writes nothing; a tie or better saves; None while fewer than K."""
    url = f"sqlite:///{tmp_path}/bar.db"
    study = optuna.create_study(study_name="bar", storage=url, direction="maximize")
    keeper = ModelKeeper(study, 2, str(tmp_path / "store"), "ndcg@10")
    assert keeper.prepare(trial_config(), 0).save_bar is None
    for value in (0.5, 0.7):
        _finish(keeper, value)
        keeper.prune()
    bar = keeper.prepare(trial_config(), 9).save_bar
    assert bar == SaveBar("ndcg@10", 0.5, maximize=True)
    assert bar.passes({"ndcg@10": 0.5}) and bar.passes({"ndcg@10": 0.6})
    assert not bar.passes({"ndcg@10": 0.49}) and not bar.passes({"ndcg@10": float("nan")})
    assert not bar.passes({"mrr@10": 0.9})  # without the metric it is never kept
    _finish(keeper, 0.9)  # pushes 0.5 out: the bar rises to the new K-th
    keeper.prune()
    assert keeper.prepare(trial_config(), 10).save_bar == SaveBar("ndcg@10", 0.7, True)
    assert (
        ModelKeeper(study, 2, str(tmp_path / "store")).prepare(trial_config(), 11).save_bar is None
    )

    low = optuna.create_study(study_name="low", storage=url, direction="minimize")
    keeper = ModelKeeper(low, 1, str(tmp_path / "store"), "loss")
    _finish(keeper, 0.3)
    keeper.prune()
    bar = keeper.prepare(trial_config(), 1).save_bar
    assert bar == SaveBar("loss", 0.3, maximize=False)
    assert bar.passes({"loss": 0.2}) and not bar.passes({"loss": 0.31})
    # Recorded configs round-trip it; a saved model's search.json does not carry it.
    cfg = dataclasses.replace(trial_config(), save_bar=bar)
    assert TrialConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
