"""Bad input through the real CLI: one line, exit 2, nothing written, and before torch loads.

Also: the run/worker options are declared once (``RunArgs``) and every one reaches RunOptions
or the CLI's own checks; ``search spec init`` writes a spec that runs on the demo data.
"""

from __future__ import annotations

import dataclasses
import subprocess
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from _cli import run_search
from typer.testing import CliRunner

from search.cli import app
from search.cli.run_options import WORKER_ONLY
from search.cli.run_options import RunArgs
from search.cli.run_options import run_options
from search.record import attrs
from search.record.stored_spec import store_spec_of
from search.record.stored_spec import stored_spec_of
from search.spec.load import load_spec
from search.spec.options import RunOptions
from search.spec.space_check import check_stored_space
from search.spec.study_spec import shipped_spec_path
from search.train.data import KO_DEMO_DIR
from search.train.data import MAX_LINE_BYTES

runner = CliRunner()


def _init(path: Path) -> Path:
    result = runner.invoke(app, ["spec", "init", str(path)])
    assert result.exit_code == 0, result.output
    return path


def _spec(tmp_path: Path, name: str = "spec.yaml", **changes: object) -> Path:
    """A spec written by ``search spec init`` with ``a__b=value`` changes."""
    path = _init(tmp_path / name)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if "models" in changes and "stages" not in changes:
        changes["stages"] = []  # the shipped stages name the four models
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    if raw.get("stages") == []:  # no stages: the key left out (an empty list is refused)
        del raw["stages"]
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def _counts(db: Path) -> list[tuple[str, int]]:
    if not db.exists():
        return []
    url = f"sqlite:///{db}"
    return [(s.study_name, s.n_trials) for s in optuna.get_all_study_summaries(url)]


def _one_error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.strip()]
    assert len(lines) == 1, output
    assert "Traceback" not in output
    return lines[0]


# --------------------------------------------------------------------- options declared once


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize("command", ["run", "worker"])
def test_help_lists_every_declared_option(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for f in dataclasses.fields(RunArgs):
        offered = command == "worker" or f.name not in WORKER_ONLY
        if f.name == "objective":  # hidden: tests and benchmarks only
            assert "--objective" not in result.output
        else:
            assert (_option(f.name) in result.output) == offered, f.name


def test_every_option_reaches_run_options_or_a_cli_check() -> None:
    """Adding an option without wiring it fails here (one field in RunArgs, one in RunOptions)."""
    cli_only = {"study", "spec", "force_space", "callback"}  # read by the CLI itself
    converted = {"storage", "memory_limit", "no_preflight", "no_frontier"}
    run_fields = {f.name for f in dataclasses.fields(RunOptions)}
    for f in dataclasses.fields(RunArgs):
        assert f.name in run_fields | cli_only | converted, f"{f.name} reaches nothing"
    args = RunArgs(
        storage="sqlite:///x.db",
        n_trials=7,
        set_n_trials=True,
        gpu="1",
        timeout=60.0,
        seed=3,
        tiny=True,
        device="cpu",
        memory_limit="1GiB",
        no_preflight=True,
        no_frontier=True,
        study_name="mine",
        objective="tests:fake",
    )
    opts = run_options(args)
    assert opts.storage_url == "sqlite:///x.db" and opts.memory_limit == 2**30
    assert (opts.n_trials, opts.set_n_trials, opts.gpu, opts.timeout, opts.seed) == (
        7,
        True,
        "1",
        60.0,
        3,
    )
    assert opts.tiny and opts.device == "cpu" and opts.study_name == "mine"
    assert not opts.use_estimate and not opts.use_frontier and opts.objective == "tests:fake"


# --------------------------------------------------------------------- bad spec, bad data


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"space__conditions": {}, "space__max_len": [128, 1024]},
            "field space.max_len (value: 1024): ko-simcse takes at most 512 tokens",
        ),
        (
            {"space__conditions__bge-m3-ko__max_len": [512], "space__max_len": [128, 512, 9000]},
            "field space.max_len (value: 9000): multilingual-minilm takes at most 512",
        ),
        (
            {"space__temperature": {"low": 0.0, "high": 0.1}},
            "space.temperature: must stay above 0",
        ),
        ({"space__lr": {"low": 0.0, "high": 0.001}}, "space.lr: must stay above 0"),
        (
            {"space__warmup_ratio": {"low": 0.0, "high": 1.5}},
            "space.warmup_ratio: must lie within",
        ),
        ({"space__weight_decay": {"low": -0.1, "high": 0.1}}, "space.weight_decay: must be >= 0"),
        ({"data__train": "data/train.jsonl"}, "field data.train (value: 'data/train.jsonl')"),
    ],
)
def test_bad_spec_is_one_line_exit_2_nothing_written(
    tmp_path: Path, changes: dict, expected: str
) -> None:
    spec = _spec(tmp_path, **changes)
    db = tmp_path / "s.db"
    result = runner.invoke(
        app, ["run", "--spec", str(spec), "--tiny", "--storage", f"sqlite:///{db}"]
    )
    assert result.exit_code == 2, result.output
    line = _one_error_line(result.output)
    assert str(spec) in line and expected in line, line
    assert not db.exists()


def test_duplicate_model_is_one_line_exit_2(tmp_path: Path) -> None:
    spec = _init(tmp_path / "dup.yaml")
    text = spec.read_text(encoding="utf-8")
    spec.write_text(text.replace("models:\n", "models:\n  ko-simcse: {amp: false}\n", 1))
    assert text.count("ko-simcse:") + 1 == spec.read_text(encoding="utf-8").count("ko-simcse:")
    db = tmp_path / "s.db"
    result = runner.invoke(app, ["worker", "--spec", str(spec), "--storage", f"sqlite:///{db}"])
    assert result.exit_code == 2
    line = _one_error_line(result.output)
    assert "field models.ko-simcse is given twice" in line and str(spec) in line
    assert not db.exists()


def test_training_line_over_the_limit_is_one_line_exit_2(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    lines = (KO_DEMO_DIR / "train.jsonl").read_bytes().splitlines(keepends=True)
    big = b'{"query": "q", "positive": "' + b"p" * (2 * MAX_LINE_BYTES) + b'"}\n'
    train.write_bytes(b"".join([*lines[:4], big, *lines[4:]]))
    spec = _spec(tmp_path, data__train=str(train))
    db = tmp_path / "s.db"
    result = runner.invoke(app, ["run", "--spec", str(spec), "--storage", f"sqlite:///{db}"])
    assert result.exit_code == 2
    assert _one_error_line(result.output) == (
        f"error: {train}:5: line longer than 1048576 bytes (1 MiB, the limit for one record)"
    )
    assert not db.exists()


# --------------------------------------------------------------------- a study's stored space


def _existing_study(db: Path, spec_path: Path, name: str = "ko-retrieval") -> str:
    """A study created from ``spec_path`` with one finished trial, as the runner leaves it."""
    url = f"sqlite:///{db}"
    study = optuna.create_study(storage=url, study_name=name, direction="maximize")
    store_spec_of(study, load_spec(spec_path).public_dict())
    study.set_user_attr(attrs.STUDY_N_TRIALS, 4)
    trial = study.ask()
    trial.suggest_float("lr", 1e-5, 2e-4, log=True)
    study.tell(trial, 0.5)
    return url


def _stored(url: str, name: str = "ko-retrieval") -> dict:
    stored = stored_spec_of(optuna.load_study(study_name=name, storage=url))
    assert stored is not None
    return stored


def test_study_made_from_another_space_is_refused_with_the_differences(tmp_path: Path) -> None:
    old = _spec(tmp_path, "old.yaml")
    db = tmp_path / "s.db"
    url = _existing_study(db, old)
    new = _spec(
        tmp_path,
        "new.yaml",
        space__lr={"low": 1e-6, "high": 1e-4, "log": True},
        space__weight_decay={"low": 0.0, "high": 0.2},
        training__epochs=5,  # not part of the search: not compared
    )
    before = _counts(db)
    result = runner.invoke(app, ["run", "--spec", str(new), "--storage", url])
    assert result.exit_code == 2, result.output
    line = " ".join(result.output.split())
    assert line.startswith(f"error: {new}: study 'ko-retrieval' was created with ")
    assert "space.lr {low: 1e-05, high: 0.0002, log: true}, the spec has {low: 1e-06, " in line
    assert "space.weight_decay {low: 0.0, high: 0.1, log: false}, the spec has" in line
    assert "epochs" not in line and "--force-space" in line
    assert _counts(db) == before and _stored(url) == load_spec(old).public_dict()


def test_force_space_stores_the_new_space(tmp_path: Path) -> None:
    old = _spec(tmp_path, "old.yaml")
    db = tmp_path / "s.db"
    url = _existing_study(db, old)
    new = load_spec(
        _spec(tmp_path, "new.yaml", space__lr={"low": 1e-6, "high": 1e-4, "log": True})
    )
    check_stored_space(url, "ko-retrieval", new, force=True)
    assert _stored(url)["space"]["lr"] == {"low": 1e-6, "high": 1e-4, "log": True}
    check_stored_space(url, "ko-retrieval", new, force=False)  # now the same: no error
    assert _counts(db) == [("ko-retrieval", 1)]


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"space__batch_size": [32, 64, 96, 128]}, "batch_size (log scale)"),
        (
            {
                "models": {"ko-simcse": {}, "multilingual-minilm": {}},
                "space__conditions": {},
                "stages": [],
            },
            "model",
        ),
        ({"space__weight_decay": {"low": 0.001, "high": 0.1, "log": True}}, "weight_decay (log"),
    ],
)
def test_changes_optuna_cannot_mix_are_refused_even_with_force(
    tmp_path: Path, changes: dict, named: str
) -> None:
    old = _spec(tmp_path, "old.yaml")
    db = tmp_path / "s.db"
    url = _existing_study(db, old)
    new = _spec(tmp_path, "new.yaml", **changes)
    result = runner.invoke(app, ["run", "--spec", str(new), "--storage", url, "--force-space"])
    assert result.exit_code == 2, result.output
    line = " ".join(result.output.split())
    assert named in line and "not even with --force-space" in line
    assert _counts(db) == [("ko-retrieval", 1)] and _stored(url) == load_spec(old).public_dict()


def test_optuna_really_refuses_changed_choices(tmp_path: Path) -> None:
    """Why the refusal above holds even with --force-space."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}")
    trial = study.ask()
    trial.suggest_categorical("batch_size.ko-simcse", [32, 64])
    study.tell(trial, 1.0)
    with pytest.raises(ValueError, match="dynamic value space"):
        study.ask().suggest_categorical("batch_size.ko-simcse", [32, 64, 128])


# --------------------------------------------------------------------- answered before torch


def _search(*args: str, cwd: Path, importtime: bool = False) -> subprocess.CompletedProcess[str]:
    flags = ["-X", "importtime"] if importtime else []
    return run_search(*args, cwd=cwd, env={"COLUMNS": "200"}, python_flags=flags)


def _imported(stderr: str) -> set[str]:
    return {
        line.rsplit("|", 1)[1].strip()
        for line in stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.mark.parametrize(
    "case", ["bad spec", "bad data", "bad option", "duplicate key", "max_len", "stored space"]
)
def test_mistakes_are_answered_before_torch_is_imported(tmp_path: Path, case: str) -> None:
    db = tmp_path / "s.db"
    args = ["--storage", f"sqlite:///{db}"]
    if case == "bad spec":
        spec = _spec(tmp_path, training__epochs=0)
    elif case == "bad data":
        (tmp_path / "train.jsonl").write_text('{"query": "질문"}\n', encoding="utf-8")
        spec = _spec(tmp_path, data__train=str(tmp_path / "train.jsonl"))
    elif case == "bad option":
        spec, args = _spec(tmp_path), [*args, "--memory-limit", "lots"]
    elif case == "duplicate key":
        spec = _init(tmp_path / "spec.yaml")
        spec.write_text(spec.read_text(encoding="utf-8") + "pruner: {type: none}\n")
    elif case == "max_len":
        spec = _spec(tmp_path, space__conditions={}, space__max_len=[2048])
    else:
        _existing_study(db, _spec(tmp_path, "old.yaml"))
        spec = _spec(tmp_path, space__lr={"low": 1e-6, "high": 1e-4, "log": True})
    run = _search("run", "--spec", str(spec), *args, cwd=tmp_path, importtime=True)
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [ln for ln in run.stderr.splitlines() if not ln.startswith("import time:")]
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    assert run.stdout == ""  # no progress bar, no study line
    modules = _imported(run.stderr)
    assert {"typer", "search.spec.study_spec"} <= modules  # the hook saw the imports
    assert not {"torch", "transformers", "search.worker.runner"} & modules


# --------------------------------------------------------------------- search spec init


def test_spec_init_writes_a_spec_on_the_demo_data(tmp_path: Path) -> None:
    target = tmp_path / "my-study.yaml"
    result = runner.invoke(app, ["spec", "init", str(target), "--from", "ko-retrieval"])
    assert result.exit_code == 0, result.output
    assert f"wrote {target}" in " ".join(result.output.split())
    spec = load_spec(target)
    assert spec.resolve_path(spec.data.train) == KO_DEMO_DIR / "train.jsonl"
    assert spec.resolve_path(spec.data.eval) == KO_DEMO_DIR
    assert target.read_text(encoding="utf-8").startswith("# Written by `search spec init`")
    shipped = load_spec(shipped_spec_path("ko-retrieval")).public_dict()
    assert {**spec.public_dict(), "source": ""} == {**shipped, "source": ""}
    check = runner.invoke(app, ["spec", "check", str(target)])
    assert check.exit_code == 0 and "ok" in check.output


def test_spec_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    target = tmp_path / "mine.yaml"
    target.write_text("study: {name: mine}\n")
    result = runner.invoke(app, ["spec", "init", str(target)])
    assert result.exit_code == 2
    assert _one_error_line(result.output) == (
        f"error: {target}: already exists; pass --force to overwrite it"
    )
    assert target.read_text() == "study: {name: mine}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.yaml"]  # no leftover
    result = runner.invoke(app, ["spec", "init", str(target), "--force"])
    assert result.exit_code == 0 and load_spec(target).study.name == "ko-retrieval"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--from", "nope"], "--from 'nope': no shipped spec of that name"),
        ([], "directory"),
    ],
)
def test_spec_init_errors(tmp_path: Path, args: list[str], expected: str) -> None:
    target = tmp_path / "missing-dir" / "x.yaml" if not args else tmp_path / "x.yaml"
    result = runner.invoke(app, ["spec", "init", str(target), *args])
    assert result.exit_code == 2 and expected in _one_error_line(result.output)
    assert not target.exists()


@pytest.mark.train
def test_a_spec_from_spec_init_runs(tmp_path: Path) -> None:
    """The copied spec runs from another directory (its data paths are package: paths)."""
    spec = _spec(
        tmp_path,
        models={"multilingual-minilm": {}},
        space__conditions={},
        space__batch_size=[8],
        space__max_len=[32],
        training__epochs=1,
        training__max_train_samples=16,
    )
    run = _search("run", "--spec", str(spec), "--tiny", "--n-trials", "1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    study = optuna.load_study(
        study_name="ko-retrieval-tiny", storage=f"sqlite:///{tmp_path}/search.db"
    )
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.COMPLETE]


@pytest.mark.postgres
def test_stored_space_is_checked_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    name = f"space-{uuid.uuid4().hex[:8]}"
    old = _spec(tmp_path, "old.yaml")
    study = optuna.create_study(storage=pg_url, study_name=name, direction="maximize")
    try:
        study.set_user_attr(attrs.STUDY_SPEC, load_spec(old).public_dict())  # an older study
        new = _spec(
            tmp_path, "new.yaml", space__temperature={"low": 0.02, "high": 0.2, "log": True}
        )
        args = ["run", "--spec", str(new), "--storage", pg_url, "--study-name", name]
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        line = _one_error_line(" ".join(result.output.split()))
        assert f"study '{name}' was created with space.temperature {{low: 0.01, high: 0.1" in line
        assert optuna.load_study(study_name=name, storage=pg_url).trials == []
    finally:
        optuna.delete_study(study_name=name, storage=pg_url)
