"""`search spec from-wandb`: the team's old W&B sweep becomes a spec that loads, with the
conditions the sweep could not express; what cannot be mapped is one line and exit code 2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from search.cli import app
from search.spec.load import check_spec_data
from search.spec.load import load_spec
from search.spec.wandb_sweep import SweepError
from search.spec.wandb_sweep import convert_sweep

SWEEP = Path(__file__).parent / "fixtures" / "wandb_sweep.yaml"
runner = CliRunner()


def _one_line(result: Any) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    return str(lines[0])


def test_the_teams_sweep_converts_to_a_spec_that_loads(tmp_path: Path) -> None:
    target = tmp_path / "from-sweep.yaml"
    result = runner.invoke(app, ["spec", "from-wandb", str(SWEEP), "-o", str(target)])
    assert result.exit_code == 0, result.output
    spec = load_spec(target)
    check_spec_data(spec, model_paths=False)  # the shipped demo data, found from anywhere
    assert (spec.study.name, spec.study.metric, spec.study.direction) == (
        "ko-retrieval-sweep",
        "ndcg@10",
        "maximize",
    )
    assert spec.study.n_trials == 100  # run_cap
    assert spec.sampler.type == "random"  # method: random
    # Hugging Face ids became the spec's model names.
    assert list(spec.models) == [
        "ko-simcse",
        "bge-m3-ko",
        "multilingual-minilm",
        "multilingual-e5-small",
    ]
    assert spec.models["bge-m3-ko"].gradient_checkpointing is True  # as the shipped spec
    assert spec.space.batch_size == [32, 64, 128, 256] and spec.space.max_len[-1] == 512
    assert (spec.space.lr.low, spec.space.lr.high, spec.space.lr.log) == (1e-5, 2e-4, True)
    assert (spec.space.weight_decay.low, spec.space.weight_decay.high) == (0.0, 0.1)
    assert spec.training.epochs == 2
    # The conditions the sweep could not express.
    assert spec.space.choices_for("bge-m3-ko") == {"batch_size": [32, 64], "max_len": [256, 384]}
    assert spec.space.choices_for("ko-simcse")["max_len"] == [128]
    assert spec.space.choices_for("multilingual-e5-small")["batch_size"] == [32, 64, 128, 256]
    text = target.read_text(encoding="utf-8")
    assert text.startswith("# Written by `search spec from-wandb`")
    assert "shipped demo data" in text and "added the condition bge-m3-ko" in text
    assert "added the condition bge-m3-ko" in " ".join(result.output.split())


def test_without_output_the_spec_goes_to_stdout(tmp_path: Path) -> None:
    result = runner.invoke(app, ["spec", "from-wandb", str(SWEEP)])
    assert result.exit_code == 0, result.output
    (tmp_path / "spec.yaml").write_text(result.stdout, encoding="utf-8")
    assert load_spec(tmp_path / "spec.yaml").study.name == "ko-retrieval-sweep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def _sweep(tmp_path: Path, parameters: dict[str, Any], **top: Any) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"method": "bayes", **top, "parameters": parameters}))
    return path


@pytest.mark.parametrize(
    ("parameters", "top", "expected"),
    [
        (
            {"lr": {"distribution": "normal", "mu": 0.0, "sigma": 1.0}},
            {},
            "parameters.lr.distribution: 'normal' cannot be mapped (supported: uniform, "
            "log_uniform_values, int_uniform, q_uniform, categorical)",
        ),
        ({"dropout": {"values": [0.1, 0.2]}}, {}, "parameters.dropout: unknown parameter"),
        (
            {"warmup_ratio": {"value": 0.1}},
            {},
            "parameters.warmup_ratio: a fixed warmup_ratio (0.1) cannot be mapped",
        ),
        ({"model": {"values": ["bert"]}}, {}, "parameters.model: unknown model 'bert'"),
        ({"batch_size": {"min": 0.5, "max": 8.5}}, {}, "parameters.batch_size: distribution"),
        ({}, {"method": "hyperopt"}, "method: 'hyperopt' cannot be mapped"),
        ({}, {"metric": {"name": "eval/loss"}}, "metric.name: 'eval/loss' cannot be mapped"),
    ],
)
def test_what_cannot_be_mapped_is_one_line_and_exit_2(
    tmp_path: Path, parameters: dict[str, Any], top: dict[str, Any], expected: str
) -> None:
    sweep = _sweep(tmp_path, parameters, **top)
    target = tmp_path / "spec.yaml"
    result = runner.invoke(app, ["spec", "from-wandb", str(sweep), "-o", str(target)])
    assert result.exit_code == 2, result.output
    line = _one_line(result)
    assert line.startswith(f"error: {sweep}: ") and expected in line, line
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]  # nothing written


def test_an_existing_output_is_kept_without_force(tmp_path: Path) -> None:
    target = tmp_path / "spec.yaml"
    target.write_text("mine\n")
    result = runner.invoke(app, ["spec", "from-wandb", str(SWEEP), "-o", str(target)])
    assert result.exit_code == 2 and "already exists" in _one_line(result)
    assert target.read_text() == "mine\n"
    result = runner.invoke(app, ["spec", "from-wandb", str(SWEEP), "-o", str(target), "--force"])
    assert result.exit_code == 0 and load_spec(target).study.n_trials == 100


@pytest.mark.parametrize(
    ("name", "metric"),
    [("eval/ndcg@10", "ndcg@10"), ("ndcg_at_10", "ndcg@10"), ("val/MRR@10", "mrr@10"),
     ("eval_recall@5", "recall@5"), ("recall_10", "recall@10")],
)  # fmt: skip
def test_metric_names_map_to_the_specs(name: str, metric: str) -> None:
    sweep = {"metric": {"name": name, "goal": "minimize"}, "parameters": {}}
    study = convert_sweep(sweep, where="s.yaml").spec["study"]
    assert (study["metric"], study["direction"]) == (metric, "minimize")


def test_methods_values_and_ids_map() -> None:
    sweep = {
        "method": "grid",
        "parameters": {
            "model": {"values": ["multilingual-e5-small", "org/new-encoder"]},
            "batch_size": {"values": [64, 32]},
            "max_len": {"value": 256},
            "learning_rate": {"values": ["1e-5", 3e-5, 1e-4]},  # PyYAML reads 1e-5 as text
            "temperature": {"values": [0.02, 0.05]},  # a grid lists values (W&B's refuses ranges)
            "epochs": {"values": [1, 3]},
        },
    }
    result = convert_sweep(sweep, where="s.yaml")
    spec = result.spec
    assert spec["sampler"]["type"] == "tpe"
    assert spec["study"]["n_trials"] == 2 * 2 * 1 * 3 * 2 * 2  # the grid: every combination
    assert spec["models"]["new-encoder"] == {"id": "org/new-encoder"}
    assert spec["space"]["batch_size"] == [32, 64] and spec["space"]["max_len"] == [256]
    assert spec["space"]["lr"] == {"low": 1e-5, "high": 1e-4, "log": True}
    assert spec["space"]["temperature"] == {"low": 0.02, "high": 0.05}
    # Not in the sweep: the shipped ranges.
    assert spec["space"]["warmup_ratio"] == {"low": 0.0, "high": 0.2}
    assert spec["training"]["epochs"] == 3
    assert any("pruner stops" in note for note in result.notes)


def test_a_condition_outside_the_sweeps_choices_is_left_to_the_preflight() -> None:
    sweep = {"parameters": {"model": {"value": "bge-m3-ko"}, "batch_size": {"values": [128]}}}
    result = convert_sweep(sweep, where="s.yaml")
    conditions = result.spec["space"].get("conditions", {})
    assert "batch_size" not in conditions.get("bge-m3-ko", {})
    assert conditions["bge-m3-ko"]["max_len"] == [256, 384]
    assert any("preflight skips" in note for note in result.notes)


def test_sweep_error_is_a_spec_error_of_one_line() -> None:
    with pytest.raises(SweepError, match=r"^s.yaml: parameters.x: unknown parameter") as err:
        convert_sweep({"parameters": {"x": {"value": 1}}}, where="s.yaml")
    assert "\n" not in str(err.value)
