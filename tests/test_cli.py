"""The ``search`` command as a user meets it: help, one-line errors with exit 2, a tiny run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml
from _cli import run_search
from typer.testing import CliRunner

from search.cli import app
from search.record import attrs
from search.spec.study_spec import shipped_spec_path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "search" / "studies" / "data" / "ko-demo"
runner = CliRunner()


@pytest.mark.parametrize("args", [[], ["run"], ["worker"], ["report"], ["storage", "check"]])
def test_every_command_explains_itself(args: list[str]) -> None:
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output
    assert len(result.output.splitlines()) > 5


def _spec(tmp_path: Path, **changes: object) -> Path:
    """A small variant of the shipped spec, with absolute data paths, written to tmp_path."""
    raw = yaml.safe_load(shipped_spec_path("ko-retrieval").read_text())
    raw["data"] = {"train": str(DEMO / "train.jsonl"), "eval": str(DEMO), "split": "test"}
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    if raw.get("stages") == []:  # no stages: the key left out (an empty list is refused)
        del raw["stages"]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


def _no_study_written(db: Path) -> bool:
    if not db.exists():
        return True
    return not optuna.get_all_study_summaries(f"sqlite:///{db}")


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"space__batch_size": [32, "big"]}, "space.batch_size"),
        ({"models__llama": {}}, "llama"),
        ({"training__epochs": -1}, "training.epochs"),
    ],
)
def test_bad_spec_is_exit_2_one_line_nothing_written(
    tmp_path: Path, changes: dict, expected: str
) -> None:
    db = tmp_path / "s.db"
    spec = _spec(tmp_path, **changes)
    result = runner.invoke(
        app, ["run", "--spec", str(spec), "--tiny", "--storage", f"sqlite:///{db}"]
    )
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and expected in lines[0] and str(spec) in lines[0], result.output
    assert "Traceback" not in result.output
    assert _no_study_written(db)


def test_malformed_training_data_is_exit_2_naming_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "train.jsonl"
    good = (DEMO / "train.jsonl").read_text(encoding="utf-8").splitlines()
    bad.write_text("\n".join([*good[:3], '{"query": "질문"}', *good[3:6]]) + "\n")
    spec = _spec(tmp_path, data__train=str(bad))
    db = tmp_path / "s.db"
    result = runner.invoke(app, ["run", "--spec", str(spec), "--storage", f"sqlite:///{db}"])
    assert result.exit_code == 2
    assert f"{bad}:4" in result.output and "positive" in result.output
    assert _no_study_written(db)


def test_unknown_shipped_study_and_bad_memory_limit(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 's.db'}"
    result = runner.invoke(app, ["run", "--study", "nope", "--storage", db])
    assert result.exit_code == 2 and "no shipped spec" in result.output
    result = runner.invoke(
        app, ["run", "--study", "ko-retrieval", "--memory-limit", "lots", "--storage", db]
    )
    assert result.exit_code == 2 and "--memory-limit" in result.output


@pytest.mark.parametrize("device", ["tpu", "cuda:x"])
def test_bad_device_is_exit_2_nothing_written(tmp_path: Path, device: str) -> None:
    db = tmp_path / "s.db"
    result = runner.invoke(
        app, ["run", "--study", "ko-retrieval", "--device", device, "--storage", f"sqlite:///{db}"]
    )
    assert result.exit_code == 2 and "--device" in result.output, result.output
    assert _no_study_written(db)


def test_report_of_a_missing_study_is_exit_2(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    optuna.create_study(storage=url, study_name="other")  # report opens existing files only
    result = runner.invoke(app, ["report", "--study", "nope", "--storage", url])
    assert result.exit_code == 2 and "no such study" in result.output and "other" in result.output


def _search(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_search(*args, cwd=cwd, timeout=600)


@pytest.mark.train
def test_tiny_run_tries_every_model_and_reports(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        training__epochs=1,
        training__max_train_samples=64,
        space__batch_size=[16, 32],
        space__max_len=[64, 128],
        space__conditions={
            "bge-m3-ko": {"batch_size": [16], "max_len": [64, 128]},
            "ko-simcse": {"max_len": [64]},
        },
    )
    run = _search(
        "run", "--spec", str(spec), "--tiny", "--n-trials", "5", "--seed", "1", cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-2000:]
    db = tmp_path / "search.db"
    assert db.exists() and str(db) in run.stdout.replace("\n", "")
    study = optuna.load_study(study_name="ko-retrieval-tiny", storage=f"sqlite:///{db}")
    trials = study.get_trials()
    assert len(trials) == 5
    assert {t.system_attrs[attrs.SYSTEM_CONFIG]["model"] for t in trials[:4]} == {
        "ko-simcse",
        "bge-m3-ko",
        "multilingual-minilm",
        "multilingual-e5-small",
    }
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all(0.0 <= t.value <= 1.0 for t in done)
    assert all(attrs.PEAK_MEMORY_MB in t.user_attrs for t in done)
    report = _search("report", "--study", "ko-retrieval-tiny", "--json", cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    data = json.loads(report.stdout)
    assert {row["model"] for row in data["models"]} == {
        "ko-simcse",
        "bge-m3-ko",
        "multilingual-minilm",
        "multilingual-e5-small",
    }
    assert sum(row["trials"] for row in data["models"]) == 5


@pytest.mark.train
def test_real_weights_missing_stops_with_a_fix(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        models={"multilingual-minilm": {}},
        space__conditions={},
        space__batch_size=[8],
        space__max_len=[64],
        training__max_train_samples=16,
        stages=[],  # the shipped stages name the other models
    )
    run = _search("run", "--spec", str(spec), "--n-trials", "3", "--device", "cpu", cwd=tmp_path)
    # Checked before any trial (search.spec.model_resolve): exit 2, one line per missing model.
    assert run.returncode == 2, run.stderr
    err = " ".join(run.stderr.split())
    hub_id = "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"
    assert f"multilingual-minilm ({hub_id})" in err and f"hf download {hub_id}" in err
    assert "--tiny" in err
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "search.db").exists()  # no study, no budget spent
