"""The study spec: the shipped one loads; bad ones give one-line errors naming field and value."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from search.spec.load import check_spec_data
from search.spec.load import load_spec
from search.spec.load import resolve_spec
from search.spec.study_spec import SpecError
from search.spec.study_spec import shipped_spec_path
from search.train.data import KO_DEMO_DIR

SHIPPED = shipped_spec_path("ko-retrieval")


def test_shipped_spec_has_the_conditions_of_the_issue() -> None:
    spec = resolve_spec("ko-retrieval", None)
    assert set(spec.models) == {
        "ko-simcse",
        "bge-m3-ko",
        "multilingual-minilm",
        "multilingual-e5-small",
    }
    assert spec.space.choices_for("bge-m3-ko") == {"batch_size": [32, 64], "max_len": [256, 384]}
    assert spec.space.choices_for("ko-simcse")["max_len"] == [128]
    assert spec.space.choices_for("multilingual-minilm") == {
        "batch_size": [32, 64, 128, 256],
        "max_len": [128, 256, 384, 512],
    }
    assert spec.study.direction == "maximize" and spec.study.metric == "ndcg@10"
    assert spec.space.lr.log and spec.space.temperature.log
    assert spec.resolve_path(spec.data.train).is_file()
    assert spec.sampler.multivariate and spec.sampler.group


def _write(tmp_path: Path, mutate: dict) -> Path:
    raw = yaml.safe_load(SHIPPED.read_text())
    for dotted, value in mutate.items():
        node = raw
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


_DELETE = object()


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        ({"models.gpt-2": {}}, ["field models", "gpt-2"]),
        ({"space.batch_size": [32, -1]}, ["space.batch_size", "-1"]),
        ({"space.conditions.bge-m3-ko.batch_size": [512]}, ["conditions.bge-m3-ko.batch_size"]),
        ({"space.lr": {"low": 1e-3, "high": 1e-5, "log": True}}, ["space.lr", "low"]),
        ({"space.temperature": {"low": 0.0, "high": 0.1, "log": True}}, ["temperature"]),
        ({"training.epochs": 0}, ["training.epochs", "0"]),
        ({"study.direction": "sideways"}, ["study.direction", "sideways"]),
        ({"study.metric": "bleu"}, ["study.metric", "bleu"]),
        ({"sampler.type": "grid"}, ["sampler.type", "grid"]),
        ({"data": _DELETE}, ["field data"]),
        ({"training.typo": 1}, ["training.typo"]),
    ],
)
def test_bad_spec_is_one_line_naming_file_and_field(
    tmp_path: Path, mutate: dict, expected: list[str]
) -> None:
    path = _write(tmp_path, mutate)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for part in expected:
        assert part in message


def test_condition_naming_a_model_not_in_models(tmp_path: Path) -> None:
    path = _write(tmp_path, {"models": {"ko-simcse": {}}})
    with pytest.raises(SpecError) as info:
        load_spec(path)
    # A check across fields names its field like any other (not "field (top level)").
    assert str(info.value).startswith(f"{path}: field space.conditions.")
    assert "'bge-m3-ko' is not one of models" in str(info.value)
    assert "top level" not in str(info.value)


def test_spec_check_counts_models_in_english(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from search.cli import app

    one = _write(
        tmp_path, {"models": {"ko-simcse": {}}, "space.conditions": {}, "stages": _DELETE}
    )
    result = CliRunner().invoke(app, ["spec", "check", str(one)])
    assert result.exit_code == 0, result.output
    assert "ok (1 model, study " in result.output
    many = CliRunner().invoke(app, ["spec", "check", str(SHIPPED)])
    assert many.exit_code == 0 and "ok (4 models, study " in many.output, many.output


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: [unclosed\n")
    with pytest.raises(SpecError, match="invalid YAML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="no shipped spec"):
        resolve_spec("no-such-study", None)


def test_relative_paths_resolve_against_the_spec_file(tmp_path: Path) -> None:
    path = _write(tmp_path, {"data.train": "d/train.jsonl"})
    spec = load_spec(path)
    assert spec.resolve_path(spec.data.train) == tmp_path / "d" / "train.jsonl"


def _no_conditions(tmp_path: Path, models: dict, max_len: list[int], **more: object) -> Path:
    return _write(
        tmp_path,
        {
            "models": models,
            "space.conditions": {},
            "space.max_len": max_len,
            "stages": _DELETE,  # the shipped stages name the four models
            **more,
        },
    )


@pytest.mark.parametrize(
    ("model", "limit"),
    [
        ("ko-simcse", 512),
        ("multilingual-minilm", 512),
        ("multilingual-e5-small", 512),
        ("bge-m3-ko", 8192),
    ],
)
def test_max_len_up_to_the_models_positions(tmp_path: Path, model: str, limit: int) -> None:
    spec = load_spec(_no_conditions(tmp_path, {model: {}}, [128, limit]))
    assert spec.space.choices_for(model)["max_len"] == [128, limit]
    path = _no_conditions(tmp_path, {model: {}}, [128, limit + 1])
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == (
        f"{path}: field space.max_len (value: {limit + 1}): {model} takes at most {limit} "
        f"tokens (its position embeddings); drop it, or give {model} its own "
        f"space.conditions.{model}.max_len"
    )


def test_max_len_beyond_positions_in_a_condition(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        {
            "models": {"ko-simcse": {}, "bge-m3-ko": {}},
            "space.max_len": [128, 1024],
            "space.conditions": {
                "bge-m3-ko": {"max_len": [1024]},
                "ko-simcse": {"max_len": [128, 1024]},
            },
        },
    )
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert "field space.conditions.ko-simcse.max_len (value: 1024)" in message
    assert "at most 512 tokens" in message and "\n" not in message


@pytest.mark.parametrize(
    ("field", "rng", "expected"),
    [
        ("temperature", {"low": 0.0, "high": 0.1}, "must stay above 0, but got low=0.0"),
        ("temperature", {"low": -0.1, "high": 0.1}, "must stay above 0, but got low=-0.1"),
        ("lr", {"low": 0.0, "high": 1e-3}, "must stay above 0"),
        ("warmup_ratio", {"low": 0.0, "high": 1.5}, "must lie within [0, 1]"),
        ("warmup_ratio", {"low": -0.1, "high": 0.2}, "must lie within [0, 1]"),
        ("weight_decay", {"low": -0.01, "high": 0.1}, "must be >= 0, but got low=-0.01"),
        ("lr", {"low": 1e-5, "high": float("inf")}, "must be finite"),
    ],
)
def test_ranges_the_objective_cannot_use(
    tmp_path: Path, field: str, rng: dict, expected: str
) -> None:
    path = _write(tmp_path, {f"space.{field}": rng})
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: field space.{field}: ")
    assert expected in message and "\n" not in message


def test_ranges_at_their_bounds_are_accepted(tmp_path: Path) -> None:
    spec = load_spec(
        _write(
            tmp_path,
            {
                "space.warmup_ratio": {"low": 0.0, "high": 1.0},
                "space.weight_decay": {"low": 0.0, "high": 0.5},
                "space.temperature": {"low": 0.001, "high": 0.5},
            },
        )
    )
    assert spec.space.warmup_ratio.high == 1.0 and spec.space.temperature.low == 0.001


@pytest.mark.parametrize(
    ("text", "field", "line", "first"),
    [
        (
            "models:\n  ko-simcse: {}\n  bge-m3-ko: {}\n  ko-simcse: {amp: false}\n",
            "models.ko-simcse",
            4,
            2,
        ),
        ("space:\n  lr: {low: 1.0e-5, high: 1.0e-4, low: 1.0e-6}\n", "space.lr.low", 2, 2),
        ("pruner: {type: none}\npruner: {type: median}\n", "pruner", 2, 1),
    ],
)
def test_duplicate_keys_are_rejected(
    tmp_path: Path, text: str, field: str, line: int, first: int
) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == (
        f"{path}: line {line}: field {field} is given twice (first on line {first}); YAML "
        "would keep only the last one: remove or rename one"
    )


def test_shipped_spec_copied_anywhere_still_finds_the_demo_data(tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "mine.yaml"
    copy.parent.mkdir()
    shutil.copy(SHIPPED, copy)
    spec = load_spec(copy)
    assert spec.data.train.startswith("package:")
    assert spec.resolve_path(spec.data.train) == KO_DEMO_DIR / "train.jsonl"
    assert spec.resolve_path(spec.data.eval) == KO_DEMO_DIR
    check_spec_data(spec)


def test_missing_data_names_the_spec_field_to_change(tmp_path: Path) -> None:
    path = _write(tmp_path, {"data.train": "data/train.jsonl"})
    spec = load_spec(path)
    with pytest.raises(SpecError) as info:
        check_spec_data(spec)
    assert str(info.value) == (
        f"{path}: field data.train (value: 'data/train.jsonl'): file not found at "
        f"{tmp_path / 'data' / 'train.jsonl'}; point data.train at your training JSONL "
        "(search spec init FILE writes a spec that uses the shipped demo data)"
    )
    path = _write(tmp_path, {"data.eval": "beir"})
    with pytest.raises(SpecError, match=r"field data.eval \(value: 'beir'\): directory not found"):
        check_spec_data(load_spec(path))
    path = _write(tmp_path, {"models.ko-simcse": {"path": "weights/ko-simcse"}})
    with pytest.raises(
        SpecError, match=r"field models.ko-simcse.path \(value: 'weights/ko-simcse'\)"
    ):
        check_spec_data(load_spec(path))
    check_spec_data(load_spec(path), model_paths=False)  # --tiny does not load the weights
