"""The study spec: the shipped one loads; bad ones give one-line errors naming field and value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from search.spec import SpecError
from search.spec import load_spec
from search.spec import resolve_spec
from search.spec import shipped_spec_path

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
    with pytest.raises(SpecError, match="bge-m3-ko"):
        load_spec(path)


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
