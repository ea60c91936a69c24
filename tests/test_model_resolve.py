"""Weights checked before any trial: missing models stop the run, or --skip-unavailable."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import optuna
from _cli import run_search
from test_model_facts import MINILM
from test_model_facts import write_spec

from search.record import attrs
from search.sampling.sampler import make_sampler
from search.sampling.space import sample_params
from search.spec.load import load_spec
from search.spec.model_resolve import check_models

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
HUB_IDS = (
    "BM-K/KoSimCSE-roberta",
    "dragonkue/BGE-m3-ko",
    "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2",
    "intfloat/multilingual-e5-small",
)


def _search(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``search ARGS`` offline, with an empty Hugging Face cache."""
    hf_home = cwd / "hf-home"
    hf_home.mkdir(exist_ok=True)
    # The empty cache is the one read, not a hub cache of the developer's.
    hub = str(hf_home / "hub")
    full = {"HF_HUB_CACHE": hub, "HUGGINGFACE_HUB_CACHE": hub, **env}
    full |= {"HF_HOME": str(hf_home), "SEARCH_CACHE": str(cwd / "cache")}
    return run_search(*args, cwd=cwd, env=full, timeout=600)


def _studies(db: Path) -> list[str]:
    return optuna.get_all_study_names(f"sqlite:///{db}") if db.exists() else []


def test_missing_weights_stop_the_run_before_the_study_exists(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    run = _search(
        "run", "--study", "ko-retrieval", "--n-trials", "2", "--storage", f"sqlite:///{db}",
        cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    lines = [ln for ln in run.stderr.splitlines() if "hf download" in ln]
    assert len(lines) == 4, run.stderr  # one line per model, with its fix
    for hub_id, line in zip(HUB_IDS, lines, strict=True):
        assert f"hf download {hub_id}," in line and "HF_HUB_OFFLINE" in line, line
    assert "--tiny" in run.stderr
    assert _studies(db) == []  # no study created, no budget spent


def test_a_worker_that_cannot_load_a_model_says_so_and_exits_2(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, {"mini": {"path": str(MINILM)}, "ko-simcse": {}})
    db = tmp_path / "w.db"
    run = _search("worker", "--spec", str(spec), "--storage", f"sqlite:///{db}", cwd=tmp_path)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "1 of 2 models cannot be loaded" in run.stderr
    assert "ko-simcse (BM-K/KoSimCSE-roberta)" in run.stderr
    assert "--skip-unavailable (search only mini)" in run.stderr
    assert _studies(db) == []


def test_skip_unavailable_searches_only_the_present_model(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, {"ko-simcse": {}, "mini": {"path": str(MINILM)}})
    db = tmp_path / "skip.db"
    run = _search(
        "run", "--spec", str(spec), "--storage", f"sqlite:///{db}", "--device", "cpu",
        "--n-trials", "3", "--seed", "3", "--skip-unavailable",
        "--objective", "slow_objective:train",
        cwd=tmp_path, SEARCH_TEST_EPOCHS="1", SEARCH_TEST_EPOCH_S="0",
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    study = optuna.load_study(study_name="facts", storage=f"sqlite:///{db}")
    assert study.user_attrs[attrs.STUDY_MODELS] == ["mini"]  # recorded on the study
    trials = study.get_trials()
    assert len(trials) == 3
    assert {t.params["model"] for t in trials} == {"mini"}
    assert {t.user_attrs[attrs.MODEL_FACTS] for t in trials} == {f"config.json:{MINILM}"}
    # A worker joining that study needs only the recorded models: ko-simcse's absence is fine.
    joined = _search("worker", "--spec", str(spec), "--storage", f"sqlite:///{db}", cwd=tmp_path)
    assert joined.returncode == 0, joined.stdout + joined.stderr[-3000:]
    assert "0 trials run by this worker (stopped by budget)" in joined.stdout.replace("\n", " ")


def test_the_sampler_keeps_to_the_searched_models(tmp_path: Path) -> None:
    spec = load_spec(
        write_spec(tmp_path, {"a": {"path": str(MINILM)}, "b": {"path": str(MINILM)}})
    )
    study = optuna.create_study(sampler=make_sampler(spec, seed=0, models=["b"]))
    for _ in range(12):  # TPE's startup trials, then its proposals
        trial = study.ask()
        params = sample_params(trial, spec)
        study.tell(trial, 0.5)
        assert params.model == "b"


def _model_dir(path: Path, files: dict[str, str]) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_a_local_directory_needs_config_tokenizer_and_weights(tmp_path: Path) -> None:
    config = (MINILM / "config.json").read_text()
    no_weights = _model_dir(tmp_path / "a", {"config.json": config, "tokenizer.json": "{}"})
    index = {"weight_map": {"x": "model-1.safetensors", "y": "model-2.safetensors"}}
    sharded = _model_dir(
        tmp_path / "b",
        {
            "config.json": config,
            "tokenizer_config.json": "{}",
            "model.safetensors.index.json": json.dumps(index),
            "model-1.safetensors": "",
        },
    )
    spec = load_spec(
        write_spec(tmp_path, {"a": {"path": str(no_weights)}, "b": {"path": str(sharded)}})
    )
    a, b = check_models(spec)
    assert a.where is None and "weights" in a.problem and "tokenizer" not in a.problem
    assert b.where is None  # a shard is missing
    (sharded / "model-2.safetensors").write_text("")
    assert check_models(spec, ["b"])[0].where == "path"
