"""Tiny replicas: right classes, loadable through from_pretrained, Korean-capable, reused."""

from __future__ import annotations

import hashlib
import inspect
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from _factories import KLUE_JSON
from _factories import SENTENCES
from transformers import AutoModel
from transformers import AutoTokenizer
from transformers import BertModel
from transformers import BertTokenizer
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase
from transformers import RobertaModel
from transformers import XLMRobertaModel
from transformers import XLMRobertaTokenizer

from search.record.models import MODELS
from search.train.tiny import MARKER
from search.train.tiny import TINY_DIMS
from search.train.tiny import build_tiny_replica
from search.train.tiny import tiny_info
from search.train.tiny import tiny_replica_dir

# transformers 5: BertTokenizerFast and XLMRobertaTokenizerFast are aliases of these classes.
ARCHITECTURES: dict[str, tuple[type[PreTrainedModel], type[PreTrainedTokenizerBase]]] = {
    "ko-simcse": (RobertaModel, BertTokenizer),
    "bge-m3-ko": (XLMRobertaModel, XLMRobertaTokenizer),
    "multilingual-minilm": (BertModel, XLMRobertaTokenizer),
    "multilingual-e5-small": (BertModel, XLMRobertaTokenizer),
}


def korean_texts() -> list[str]:
    """KLUE-NLI premises and hypotheses when the shared data is there, else a few sentences."""
    if not KLUE_JSON.is_file():
        return SENTENCES * 5
    records = json.loads(KLUE_JSON.read_text(encoding="utf-8"))
    return [r["premise"] for r in records] + [r["hypothesis"] for r in records]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return korean_texts()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> dict[str, Path]:
    cache = tmp_path_factory.mktemp("tiny")
    return {name: build_tiny_replica(info, cache, texts) for name, info in MODELS.items()}


def digest(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.mark.parametrize("name", list(MODELS))
def test_replica_has_the_real_classes_and_reloads(name: str, replicas: dict[str, Path]) -> None:
    path = replicas[name]
    model = AutoModel.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model_class, tokenizer_class = ARCHITECTURES[name]
    assert type(model) is model_class
    assert isinstance(tokenizer, tokenizer_class)
    assert path.name == f"{name}-tiny-L2-H64"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size) == (2, 64)
    assert (config.num_attention_heads, config.intermediate_size) == (4, 128)
    assert config.vocab_size == 4000 >= len(tokenizer)
    assert config.max_position_embeddings == MODELS[name].max_positions
    assert config.pad_token_id == tokenizer.pad_token_id
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == tiny_info(MODELS[name]).n_params  # what the memory estimate counts


@pytest.mark.parametrize("name", list(MODELS))
def test_tokenizes_korean_into_many_known_pieces(name: str, replicas: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(replicas[name])
    info = MODELS[name]
    ids = tokenizer(SENTENCES[:4])["input_ids"]
    flat = [i for row in ids for i in row]
    assert tokenizer.unk_token_id not in flat
    assert len(set(flat) - set(tokenizer.all_special_ids)) > 20
    assert all(
        row[0] == tokenizer.cls_token_id and row[-1] == tokenizer.sep_token_id for row in ids
    )
    prefixed = tokenizer(info.query_prefix + "Hello 검색 query: 123")["input_ids"]
    assert tokenizer.unk_token_id not in prefixed  # ASCII, e5's prefixes included


def test_special_ids_follow_the_real_tokenizers(replicas: dict[str, Path]) -> None:
    wordpiece = AutoTokenizer.from_pretrained(replicas["ko-simcse"])  # klue/roberta-base ids
    assert wordpiece.convert_tokens_to_ids(["[CLS]", "[PAD]", "[SEP]", "[UNK]"]) == [0, 1, 2, 3]
    xlmr = AutoTokenizer.from_pretrained(replicas["bge-m3-ko"])
    assert xlmr.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert xlmr.mask_token_id == len(xlmr) - 1


@pytest.mark.parametrize("name", list(MODELS))
def test_accepts_512_tokens(name: str, replicas: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(replicas[name])
    model = AutoModel.from_pretrained(replicas[name])
    batch = tokenizer(
        [" ".join(SENTENCES * 20)], max_length=512, truncation=True, return_tensors="pt"
    )
    assert batch["input_ids"].shape == (1, 512)
    with torch.no_grad():
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert hidden.last_hidden_state.shape == (1, 512, 64)


def test_second_build_reuses_the_directory(
    replicas: dict[str, Path], texts: list[str], tmp_path: Path
) -> None:
    path = replicas["ko-simcse"]
    before = digest(path)
    weights_inode = (path / "model.safetensors").stat().st_ino
    again = build_tiny_replica(MODELS["ko-simcse"], path.parent, ["다른 문장"])
    assert again == path
    assert digest(again) == before
    assert (again / "model.safetensors").stat().st_ino == weights_inode
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_deterministic_for_a_seed_and_leaves_global_rng(
    replicas: dict[str, Path], texts: list[str], tmp_path: Path
) -> None:
    state = torch.random.get_rng_state()
    for name in ("ko-simcse", "bge-m3-ko"):
        rebuilt = build_tiny_replica(MODELS[name], tmp_path, texts)
        assert digest(rebuilt) == digest(replicas[name])
    assert torch.equal(torch.random.get_rng_state(), state)
    other = build_tiny_replica(MODELS["ko-simcse"], tmp_path, texts, seed=1)
    assert other.name == "ko-simcse-tiny-L2-H64-S1"
    assert digest(other)["model.safetensors"] != digest(replicas["ko-simcse"])["model.safetensors"]


def test_concurrent_builds_share_one_complete_replica(tmp_path: Path) -> None:
    info = MODELS["multilingual-minilm"]

    def build(_: int) -> Path:
        return build_tiny_replica(info, tmp_path, SENTENCES, vocab_size=500)

    with ThreadPoolExecutor(max_workers=3) as pool:
        paths = list(pool.map(build, range(3)))
    assert paths == [tiny_replica_dir(info, tmp_path, vocab_size=500)] * 3
    assert (paths[0] / MARKER).is_file()
    assert type(AutoModel.from_pretrained(paths[0])) is BertModel
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [paths[0].name]


def test_replica_dir_names_non_default_dims(tmp_path: Path) -> None:
    info = MODELS["bge-m3-ko"]
    assert tiny_replica_dir(info, tmp_path) == tmp_path / "bge-m3-ko-tiny-L2-H64"
    named = tiny_replica_dir(info, tmp_path, num_layers=3, hidden=32, heads=2, vocab_size=900)
    assert named.name == "bge-m3-ko-tiny-L3-H32-A2-V900"
    assert not named.exists()


def test_tiny_info_keeps_positions_pooling_and_prefixes() -> None:
    info = MODELS["multilingual-e5-small"]
    tiny = tiny_info(info, **TINY_DIMS)
    assert (tiny.num_layers, tiny.hidden, tiny.heads, tiny.ffn, tiny.vocab) == (
        2,
        64,
        4,
        128,
        4000,
    )
    assert (tiny.max_positions, tiny.pooling, tiny.normalize) == (512, "mean", True)
    assert (tiny.query_prefix, tiny.passage_prefix) == ("query: ", "passage: ")
    assert tiny_info(MODELS["bge-m3-ko"], hidden=32).max_tokens == 8192
    defaults = {
        k: p.default
        for k, p in inspect.signature(build_tiny_replica).parameters.items()
        if k in TINY_DIMS
    }
    assert defaults == TINY_DIMS


def test_rejects_impossible_replicas(tmp_path: Path) -> None:
    info = MODELS["ko-simcse"]
    with pytest.raises(ValueError, match="multiple of heads"):
        build_tiny_replica(info, tmp_path, SENTENCES, hidden=66, heads=4)
    with pytest.raises(ValueError, match="non-empty texts"):
        build_tiny_replica(info, tmp_path, ["", "  "])
    for small in (info, MODELS["bge-m3-ko"]):
        with pytest.raises(ValueError, match="raise vocab_size"):
            build_tiny_replica(small, tmp_path, SENTENCES, vocab_size=40)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


@pytest.mark.parametrize("name", ["ko-simcse", "bge-m3-ko"])
def test_too_many_characters_leave_out_the_rarest(name: str, tmp_path: Path) -> None:
    common = "오늘 서울의 날씨는 맑고 따뜻합니다."
    rare = ["".join(chr(0xAC00 + 3 * (10 * i + j)) for j in range(10)) for i in range(300)]
    path = build_tiny_replica(MODELS[name], tmp_path, [common] * 30 + rare, vocab_size=1000)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) <= 1000  # 3000 distinct characters would not fit
    assert tokenizer.unk_token_id not in tokenizer(common)["input_ids"]
    assert tokenizer.unk_token_id in tokenizer(rare[-1])["input_ids"]


def test_a_replicas_marker_gives_its_config_facts_without_transformers(
    replicas: dict[str, Path], tmp_path: Path
) -> None:
    import dataclasses

    from search.spec.model_facts import facts_of_directory
    from search.train.tiny_layout import replica_facts

    for name, path in replicas.items():
        info = MODELS[name]
        from_marker = replica_facts(info, path)
        assert from_marker is not None and from_marker.source == f"{MARKER}:{path}"
        from_config = facts_of_directory(info, path)  # transformers' AutoConfig
        assert dataclasses.replace(from_marker, source=from_config.source) == from_config
    assert replica_facts(MODELS["ko-simcse"], tmp_path) is None  # no marker: not a replica
    (tmp_path / MARKER).write_text("{}", encoding="utf-8")
    assert replica_facts(MODELS["ko-simcse"], tmp_path) is None  # a marker without dims
