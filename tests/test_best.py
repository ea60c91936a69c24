"""``search best``: print the best trial, export its kept model, or retrain it when none is kept.

One tiny study (3 real trials, K = 1) serves every case: the best trial's kept model is
exported as it is; with that model marked removed (as for a study run with K = 0, or before
models were kept) the export retrains the exact config in an isolated process, and on a CPU the
retrained value is the recorded one.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from _cli import ROOT
from _cli import run_search
from _cli import search_env
from _finished_study import finished_study
from typer.testing import CliRunner

from search.cli import app
from search.observe.keep import kept_models
from search.observe.subscribers import standard_subscribers
from search.record import attrs
from search.spec.load import load_spec
from search.spec.options import DEFAULT_CACHE
from search.spec.options import RunOptions
from search.spec.study_spec import PACKAGE_DIR
from search.train.export import read_search_json
from search.worker.runner import run_study

DEMO = PACKAGE_DIR / "studies/data/ko-demo"
runner = CliRunner()


def _spec(path: Path, top_k: int) -> Path:
    path.write_text(
        f"""study: {{name: best, direction: maximize, metric: ndcg@10, n_trials: 3}}
models:
  multilingual-e5-small: {{}}
space:
  batch_size: [8]
  max_len: [32]
  lr: {{low: 1.0e-4, high: 5.0e-3, log: true}}
  temperature: {{low: 0.01, high: 0.1, log: true}}
  warmup_ratio: {{low: 0.0, high: 0.2}}
  weight_decay: {{low: 0.0, high: 0.1}}
training: {{epochs: 2, amp: true, gradient_checkpointing: false, hard_negatives: 0,
           seed: 0, max_train_samples: 16}}
data: {{train: {DEMO / "train.jsonl"}, eval: {DEMO}, split: test}}
sampler: {{type: random, seed: 3}}
pruner: {{type: none}}
artifacts: {{top_k: {top_k}}}
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="module")
def study_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny study of 3 completed trials whose best model is kept (K = 1)."""
    tmp = tmp_path_factory.mktemp("best")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    opts = RunOptions(
        storage_url=f"sqlite:///{tmp}/best.db",
        tiny=True,
        device="cpu",
        cache_dir=Path(os.environ.get("SEARCH_CACHE", DEFAULT_CACHE)),
        worker="best-test",
        use_estimate=False,
    )
    spec = load_spec(_spec(tmp / "best.yaml", 1))
    summary = run_study(spec, opts, subscribers=standard_subscribers(spec, opts))
    assert summary.trials_run == 3
    return tmp / "best.db"


def _copy_db(source: Path, target: Path) -> None:
    """Copy a SQLite study (WAL journal included) with SQLite's backup API."""
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def _url(db: Path) -> str:
    return f"sqlite:///{db}"


def _best(db: Path) -> optuna.trial.FrozenTrial:
    return optuna.load_study(study_name="best-tiny", storage=_url(db)).best_trial


def _kept(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str:
    """The artifact id of the trial's kept model (uploaded after its tell: a study attribute)."""
    return kept_models(study)[trial.number][0]


def _check_loads(out: Path, trial: optuna.trial.FrozenTrial) -> dict[str, object]:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out), device="cpu")
    assert st.prompts == {"query": "query: ", "document": "passage: "}
    assert st.encode_query(["검색 모델은 무엇인가요?"]).shape == (1, 64)  # the replica's hidden
    meta = read_search_json(out)
    assert meta is not None and meta["trial"] == trial.number and meta["study"] == "best-tiny"
    return meta


@pytest.mark.train
def test_best_prints_the_best_trial(study_db: Path) -> None:
    study = optuna.load_study(study_name="best-tiny", storage=_url(study_db))
    best = study.best_trial
    result = runner.invoke(app, ["best", "--study", "best-tiny", "--storage", _url(study_db)])
    assert result.exit_code == 0, result.output
    assert f"best trial {best.number} of study best-tiny: multilingual-e5-small" in result.output
    assert "a tiny replica of the model, not its real weights" in result.output
    assert _kept(study, best) in result.output
    assert f"lr: {best.params['lr']}" in result.output

    as_json = runner.invoke(
        app, ["best", "--study", "best-tiny", "--storage", _url(study_db), "--json"]
    )
    data = json.loads(as_json.stdout)
    assert data["trial"] == best.number and data["value"] == pytest.approx(best.value)
    assert data["artifact"]["id"] == _kept(study, best)
    assert data["tiny_replicas"] is True
    assert [h["ndcg@10"] for h in data["history"]][-1] == pytest.approx(best.value)


@pytest.mark.train
def test_export_writes_the_kept_model(study_db: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = runner.invoke(
        app, ["best", "--study", "best-tiny", "--storage", _url(study_db), "--export", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "its kept model" in result.output
    assert "a tiny replica, not the real weights" in result.output
    meta = _check_loads(out, _best(study_db))
    assert "retrained" not in meta


@pytest.mark.train
def test_export_retrains_when_no_model_was_kept(study_db: Path, tmp_path: Path) -> None:
    db = tmp_path / "copy.db"
    _copy_db(study_db, db)
    study = optuna.load_study(study_name="best-tiny", storage=_url(db))
    best = study.best_trial
    artifact = _kept(study, best)
    study._storage.set_study_system_attr(
        study._study_id, attrs.MODEL_REMOVED_PREFIX + artifact, best.number
    )
    out = tmp_path / "retrained"
    out.mkdir()  # an empty directory is fine
    args = ["--study", "best-tiny", "--storage", _url(db), "--export", str(out), "--device", "cpu"]
    result = runner.invoke(app, ["best", *args])
    assert result.exit_code == 0, result.output
    assert "retrained" in result.output and "artifact: none kept" in result.output
    meta = _check_loads(out, best)
    assert meta["retrained"] is True
    # CPU, same seed: the retrain repeats the recorded value (the tolerance's justification).
    assert abs(float(meta["value"]) - best.value) < 1e-6  # type: ignore[arg-type]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".retrained.")]


@pytest.mark.train
def test_export_refuses_a_retrain_off_tolerance(study_db: Path, tmp_path: Path) -> None:
    db = tmp_path / "copy.db"
    _copy_db(study_db, db)
    study = optuna.load_study(study_name="best-tiny", storage=_url(db))
    best = study.best_trial
    study._storage.set_study_system_attr(
        study._study_id, attrs.MODEL_REMOVED_PREFIX + _kept(study, best), 0
    )
    out = tmp_path / "model"
    # The training data changed since the trial: other pairs give another value.
    args = ["best", "--study", "best-tiny", "--storage", _url(db), "--export", str(out)]
    config = best.system_attrs[attrs.SYSTEM_CONFIG]
    changed = tmp_path / "train.jsonl"
    lines = Path(config["train_path"]).read_text(encoding="utf-8").splitlines()
    changed.write_text("\n".join(reversed(lines)) + "\n", encoding="utf-8")
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE trial_system_attributes SET value_json = ? WHERE trial_id = ? AND key = ?",
            (
                json.dumps({**config, "train_path": str(changed)}),
                best._trial_id,
                attrs.SYSTEM_CONFIG,
            ),
        )
    result = runner.invoke(app, [*args, "--tolerance", "0"])
    assert result.exit_code == 1, result.output
    assert "off by more than the tolerance" in result.output
    assert not out.exists()  # nothing exported


def test_best_answers_mistakes_in_one_line(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    study = optuna.create_study(study_name="empty", storage=_url(db))
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    cases = [
        (["--study", "nope"], "no such study"),
        (["--study", "empty"], "has no completed trial"),
    ]
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    cases.append((["--study", "empty", "--export", str(full)], "not empty"))
    cases.append((["--study", "empty", "--device", "gpu0"], "--device"))
    for args, expected in cases:
        result = runner.invoke(app, ["best", "--storage", _url(db), *args])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0], result.output
    assert not any(p.name.startswith(".full") for p in tmp_path.iterdir())


@pytest.mark.train
def test_retrain_builds_a_tiny_replica_that_left_the_cache(study_db: Path, tmp_path: Path) -> None:
    """A --tiny trial whose replica was deleted: the export builds it again and still matches."""
    db = tmp_path / "copy.db"
    _copy_db(study_db, db)
    study = optuna.load_study(study_name="best-tiny", storage=_url(db))
    best = study.best_trial
    study._storage.set_study_system_attr(
        study._study_id, attrs.MODEL_REMOVED_PREFIX + _kept(study, best), 0
    )
    config = best.system_attrs[attrs.SYSTEM_CONFIG]
    gone = tmp_path / "cache" / "tiny" / Path(config["model_path"]).name
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE trial_system_attributes SET value_json = ? WHERE trial_id = ? AND key = ?",
            (json.dumps({**config, "model_path": str(gone)}), best._trial_id, attrs.SYSTEM_CONFIG),
        )
    out = tmp_path / "model"
    result = runner.invoke(
        app, ["best", "--study", "best-tiny", "--storage", _url(db), "--export", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert (gone / "config.json").is_file()  # built again where the trial had it
    meta = _check_loads(out, best)
    assert abs(float(meta["value"]) - best.value) < 1e-6  # type: ignore[arg-type]


def _dump(db: Path) -> list[str]:
    """Every row of a SQLite study file, to show that a refused command wrote nothing."""
    with sqlite3.connect(db) as conn:
        return list(conn.iterdump())


def _one_line_refusal(result: object, *words: str) -> None:
    assert result.returncode == 2, result.stderr  # type: ignore[attr-defined]
    lines = [line for line in result.stderr.splitlines() if line.strip()]  # type: ignore[attr-defined]
    assert len(lines) == 1 and all(w in lines[0] for w in words), result.stderr  # type: ignore[attr-defined]


@pytest.mark.train
def test_replica_and_real_trials_never_share_a_study(study_db: Path, tmp_path: Path) -> None:
    """The --tiny study is recorded as replicas; run and worker without --tiny are refused (the
    record, else for an older study its trials' model paths), --tiny on a real study too;
    refine's run command then carries --tiny."""
    db = tmp_path / "copy.db"
    _copy_db(study_db, db)
    spec = str(study_db.parent / "best.yaml")
    study = optuna.load_study(study_name="best-tiny", storage=_url(db))
    assert study._storage.get_study_system_attrs(study._study_id)[attrs.STUDY_REPLICAS] is True
    before = _dump(db)
    args = ["--spec", spec, "--study-name", "best-tiny", "--storage", _url(db)]
    _one_line_refusal(run_search("run", *args), "'best-tiny'", "--tiny")
    with sqlite3.connect(db) as conn:  # a study from before the record: its trials say it
        conn.execute("DELETE FROM study_system_attributes WHERE key = ?", (attrs.STUDY_REPLICAS,))
    before = _dump(db)
    _one_line_refusal(run_search("worker", *args), "'best-tiny'", "--tiny")
    assert _dump(db) == before  # nothing written

    real = tmp_path / "real.db"
    finished_study(_url(real), "real")  # trials of real weights (model_path /models/...)
    before = _dump(real)
    tiny = ["--spec", spec, "--study-name", "real", "--storage", _url(real), "--tiny"]
    _one_line_refusal(run_search("run", *tiny), "'real'", "--tiny")
    assert _dump(real) == before

    refine = run_search(
        "refine", "--study", "best-tiny", "--storage", _url(db), "--n-trials", "1",
        env={"COLUMNS": "60"},
    )  # fmt: skip
    assert refine.returncode == 0, refine.stderr
    command = next(line for line in refine.stdout.splitlines() if "run them:" in line)
    # One line however long (the tmp paths pass the 180 columns of piped output): the
    # storage URL stays with its --storage, and --tiny follows the study's record.
    assert len(command) > 180, command
    assert f"--study-name best-tiny --storage {_url(db)} --tiny" in command, refine.stdout


@pytest.mark.train
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_an_exported_model_follows_the_umask(study_db: Path, tmp_path: Path, umask: int) -> None:
    """Weights, configs and directories of an export get ``0666/0777 & ~umask`` like the
    tokenizer files (as ``SentenceTransformer.save``), not tempfile's 0600/0700."""
    out = tmp_path / "model"
    command = [sys.executable, "-m", "search.cli", "best", "--study", "best-tiny"]
    command += ["--storage", _url(study_db), "--export", str(out)]
    done = subprocess.run(
        ["sh", "-c", f'umask {umask:03o} && exec "$@"', "sh", *command],
        env=search_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    paths = [out, *out.rglob("*")]
    assert {p.name for p in paths} >= {"model.safetensors", "modules.json", "config.json"}
    wrong = {
        str(p.relative_to(out)): oct(stat.S_IMODE(p.stat().st_mode))
        for p in paths
        if stat.S_IMODE(p.stat().st_mode) != (0o777 if p.is_dir() else 0o666) & ~umask
    }
    assert not wrong, wrong


@pytest.mark.train
def test_config_lines_say_what_ran(study_db: Path) -> None:
    """amp: true on a CPU with a 64-wide replica ran fp32: the record and the lines say so."""
    from search.record.trial_record import trial_summary

    study = optuna.load_study(study_name="best-tiny", storage=_url(study_db))
    for trial in study.trials:
        assert trial.system_attrs[attrs.SYSTEM_CONFIG]["amp"] is True  # what was asked
        assert trial.user_attrs[attrs.PRECISION] == "fp32"  # what ran
        assert "(cpu, fp32)" in trial_summary(trial)  # the dashboard's trial note
    result = runner.invoke(app, ["report", "--study", "best-tiny", "--storage", _url(study_db)])
    assert result.exit_code == 0, result.output
    best = " ".join(result.output.split("\n\n")[0].split())  # the best line, wrapped at 100
    assert best.startswith("best:") and "precision=fp32" in best and "device=cpu" in best, best
    assert "amp=" not in best, best


def test_the_spec_is_kept_for_scripts_not_in_the_dashboards_user_attributes(
    study_db: Path, tmp_path: Path
) -> None:
    """A study keeps its spec as the system attribute ``search:spec`` (read by scripts through
    ``stored_spec``), not as a user attribute the dashboard shows as a blob; a study made
    before (the user attribute ``spec``) is still read."""
    from search.record.stored_spec import stored_spec_of

    target = tmp_path / "copy.db"
    _copy_db(study_db, target)
    study = optuna.load_study(study_name="best-tiny", storage=f"sqlite:///{target}")
    assert "spec" not in study.user_attrs
    stored = stored_spec_of(study)
    assert stored is not None and stored["study"]["name"]
    old = optuna.create_study(study_name="older", storage=f"sqlite:///{target}")
    old.set_user_attr("spec", stored)  # how studies kept it before
    assert stored_spec_of(old) == stored
