"""The token and data cache: hits equal fresh computations, changed content misses, bounds hold,
damaged entries are recomputed, and a second process reads what the first one wrote."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _cli import run_search
from _factories import trial_config

from search.record.models import MODELS
from search.train import token_cache
from search.train.cache import DiskTier
from search.train.cache import MemoryTier
from search.train.cache import TwoTierCache
from search.train.cache import key_digest
from search.train.cache import payload_bytes
from search.train.cache import shared_cache
from search.train.cache_settings import CacheSettings
from search.train.data import KO_DEMO_DIR
from search.train.data import DataError
from search.train.data import EvalSet
from search.train.data import load_eval
from search.train.data import load_train
from search.train.encoder import BiEncoder
from search.train.loop import _build_dataset
from search.train.loop import train
from search.train.metrics import evaluate
from search.train.partial_eval import eval_sample
from search.train.tiny import build_tiny_replica

ROOT = Path(__file__).resolve().parents[1]
TINY = {"num_layers": 1, "hidden": 32, "heads": 2, "ffn": 64}


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache directory of this test alone (and an empty in-process tier)."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("SEARCH_DATA_CACHE", str(directory))
    return directory


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    """A copy of the shipped demo data the test may rewrite."""
    return Path(shutil.copytree(KO_DEMO_DIR, tmp_path / "demo"))


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny replicas with different tokenizers (WordPiece; SentencePiece with prefixes)."""
    work = tmp_path_factory.mktemp("replicas")
    texts = [t for e in load_train(KO_DEMO_DIR / "train.jsonl") for t in (e.query, e.positive)]
    return {
        name: build_tiny_replica(MODELS[name], work, texts, vocab_size=400, **TINY)
        for name in ("ko-simcse", "multilingual-e5-small")
    }


def _encoder(path: Path, name: str = "multilingual-e5-small", **changes: object) -> BiEncoder:
    return BiEncoder.from_config(trial_config(model=name, model_path=str(path), **changes))


def _hits() -> dict[str, int]:
    cache = shared_cache()
    assert cache is not None
    return dict(cache.hits)


def _payload(n: int, fill: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return {"x": torch.full((n,), fill, dtype=torch.uint8)}, {}


# --- settings ------------------------------------------------------------------------------


def test_settings_default_location_bounds_and_off(tmp_path: Path) -> None:
    service = CacheSettings.from_env({"SEARCH_CACHE": str(tmp_path)})
    assert service.directory == tmp_path / "data" and service.enabled  # beside the replicas
    assert service.disk_bytes == 4 * 2**30 and service.memory_bytes == 256 * 2**20
    assert CacheSettings.from_env({}).directory == Path.home() / ".cache" / "search" / "data"
    own = CacheSettings.from_env({"SEARCH_CACHE": "/c", "SEARCH_DATA_CACHE": str(tmp_path)})
    assert own.directory == tmp_path
    sized = CacheSettings.from_env(
        {"SEARCH_DATA_CACHE_DISK_BYTES": "300MiB", "SEARCH_DATA_CACHE_MEMORY_BYTES": "1.5K"}
    )
    assert (sized.disk_bytes, sized.memory_bytes) == (300 * 2**20, 1536)
    for off in ("off", "0", "OFF"):
        assert not CacheSettings.from_env({"SEARCH_DATA_CACHE": off}).enabled
    with pytest.raises(ValueError, match="SEARCH_DATA_CACHE_DISK_BYTES"):
        CacheSettings.from_env({"SEARCH_DATA_CACHE_DISK_BYTES": "lots"})


def test_cache_off_writes_nothing(
    demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEARCH_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("SEARCH_DATA_CACHE", "off")
    assert shared_cache() is None
    assert token_cache.load_train_cached(demo / "train.jsonl") == load_train(demo / "train.jsonl")
    assert not (tmp_path / "c").exists()


# --- the tiers -----------------------------------------------------------------------------


def test_memory_tier_never_holds_more_than_its_bound() -> None:
    tier = MemoryTier(max_bytes=1000)
    for i in range(20):
        tier.put(f"e{i}", _payload(300, i))
        assert tier.nbytes <= 1000
        assert tier.nbytes == sum(payload_bytes(_payload(300)) for _ in range(len(tier)))
    assert len(tier) == 3 and "e19" in tier and "e16" not in tier
    assert tier.get("e17") is not None  # now the most recently used: e18 goes next
    tier.put("e20", _payload(300))
    assert "e17" in tier and "e18" not in tier
    tier.put("huge", _payload(1001))  # larger than the bound: not kept, nothing evicted
    assert "huge" not in tier and len(tier) == 3


def test_disk_tier_evicts_least_recently_used_down_to_its_bound(tmp_path: Path) -> None:
    tier = DiskTier(tmp_path, max_bytes=3 * 1200)
    for i in range(3):
        tier.put(f"e{i}", _payload(1000, i))
        os.utime(tier.path(f"e{i}"), (1000.0 + i, 1000.0 + i))  # distinct ages
    assert tier.get("e0") is not None  # a hit makes e0 the most recent
    tier.put("e3", _payload(1000, 3))
    on_disk = sorted(p.name.split(".")[0] for p in tmp_path.iterdir())
    assert on_disk == ["e0", "e2", "e3"]  # e1 was the least recently used
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) <= tier.max_bytes
    got = tier.get("e2")
    assert got is not None and got[0]["x"].tolist() == [2] * 1000


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_disk_entry_is_recomputed_not_trusted(tmp_path: Path, damage: str) -> None:
    settings = CacheSettings(tmp_path, disk_bytes=2**20, memory_bytes=2**20)
    calls: list[int] = []

    def compute() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        calls.append(1)
        return {"x": torch.arange(500)}, {"m": "v"}

    TwoTierCache(settings).get_or_compute({"k": 1}, compute)
    (entry,) = (tmp_path / "v1").iterdir()
    raw = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        middle = len(raw) // 2
        entry.write_bytes(raw[:middle] + bytes([raw[middle] ^ 0xFF]) + raw[middle + 1 :])
    else:
        entry.write_bytes(b"")
    fresh = TwoTierCache(settings)  # another process: an empty memory tier
    tensors, meta = fresh.get_or_compute({"k": 1}, compute)
    assert len(calls) == 2 and fresh.hits["miss"] == 1
    assert tensors["x"].tolist() == list(range(500)) and meta == {"m": "v"}
    assert TwoTierCache(settings).get_or_compute({"k": 1}, compute)[0]["x"].equal(tensors["x"])
    assert len(calls) == 2  # the rewritten entry is good


def test_killed_writer_leaves_no_entry(tmp_path: Path) -> None:
    """A writer killed before its rename leaves a temporary file, never a readable entry."""
    tier = DiskTier(tmp_path, max_bytes=2**20)
    (tmp_path / ".tmp-abc.entry").write_bytes(b"half an entry")
    assert tier.get("abc") is None
    tier.put("e", _payload(10))
    assert tier.get("e") is not None


# --- the data ------------------------------------------------------------------------------


def test_train_data_hit_equals_fresh_and_a_rewritten_file_misses(
    demo: Path, cache_dir: Path
) -> None:
    path = demo / "train.jsonl"
    fresh = load_train(path)
    assert token_cache.load_train_cached(path) == fresh
    assert token_cache.load_train_cached(path) == fresh
    assert _hits()["miss"] == 1 and _hits()["memory"] == 1
    # Same size, same mtime, other content: the first query's first two characters swapped.
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    row = json.loads(lines[0])
    row["query"] = row["query"][1] + row["query"][0] + row["query"][2:]
    changed = json.dumps(row, ensure_ascii=False) + "\n"
    assert len(changed.encode()) == len(lines[0].encode())
    stat = path.stat()
    path.write_text(changed + "".join(lines[1:]), encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size
    again = token_cache.load_train_cached(path)
    assert again == load_train(path) != fresh
    assert _hits()["miss"] == 2
    assert token_cache.load_train_cached(path, max_samples=5) == again[:5]  # another key


def test_data_errors_are_never_cached(demo: Path, cache_dir: Path) -> None:
    path = demo / "train.jsonl"
    good = path.read_bytes()
    path.write_bytes(good + b'{"query": "q"}\n')
    for _ in range(2):
        with pytest.raises(DataError, match="missing field 'positive'"):
            token_cache.load_train_cached(path)
    corpus = demo / "corpus.jsonl"
    corpus.write_bytes(corpus.read_bytes() + b'{"_id": "x"}\n')
    for _ in range(2):
        with pytest.raises(DataError, match="missing field 'text'"):
            token_cache.load_eval_cached(demo)
    assert _hits()["memory"] == _hits()["disk"] == 0


def test_eval_data_hit_equals_fresh_and_a_changed_qrels_misses(
    demo: Path, cache_dir: Path
) -> None:
    assert token_cache.load_eval_cached(demo) == load_eval(demo)
    assert token_cache.load_eval_cached(demo) == load_eval(demo)
    qrels = demo / "qrels" / "test.tsv"
    lines = qrels.read_text().splitlines(keepends=True)
    qrels.write_text("".join(lines[:-1]))  # one relevance judgement fewer
    assert token_cache.load_eval_cached(demo) == load_eval(demo)
    assert _hits() == {"memory": 1, "disk": 0, "miss": 2}


# --- the token ids -------------------------------------------------------------------------


def _tables(encoder: BiEncoder, demo: Path, max_len: int = 32, k: int = 1) -> list[torch.Tensor]:
    data = _build_dataset(
        encoder, load_train(demo / "train.jsonl"), max_len=max_len, hard_negatives=k
    )
    return [
        data.queries.input_ids,
        data.queries.attention_mask,
        data.queries.lengths,
        data.passages.input_ids,
        data.passages.attention_mask,
        data.passages.lengths,
        data.query,
        data.positive,
        data.negatives,
    ]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(x.dtype == y.dtype and x.equal(y) for x, y in zip(a, b, strict=True))


def test_the_environments_bounds_hold_for_real_entries(
    replicas: dict[str, Path], demo: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory bound below one token table: never kept in memory, read from disk instead. Disk
    bound of one table: the older of two tables goes."""
    encoder = _encoder(replicas["multilingual-e5-small"])
    monkeypatch.setenv("SEARCH_DATA_CACHE_MEMORY_BYTES", "1K")
    first = _tables(encoder, demo)
    size = max(p.stat().st_size for p in (cache_dir / "v1").iterdir())
    assert _same(_tables(encoder, demo), first)
    cache = shared_cache()
    assert cache is not None and cache.memory.nbytes <= 1024
    assert cache.hits == {"memory": 0, "disk": 1, "miss": 1}
    monkeypatch.setenv("SEARCH_DATA_CACHE_DISK_BYTES", str(size + 100))  # one table fits, not two
    _tables(encoder, demo, max_len=24)
    sizes = [p.stat().st_size for p in (cache_dir / "v1").iterdir()]
    assert len(sizes) == 1 and sum(sizes) <= size + 100
    _tables(encoder, demo)  # evicted: computed again
    assert _hits() == {"memory": 0, "disk": 0, "miss": 2}  # (new settings: a new cache)


@pytest.mark.parametrize("k", [0, 1])
def test_training_tokens_hit_equals_fresh(
    replicas: dict[str, Path], demo: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch, k: int
) -> None:
    encoder = _encoder(replicas["multilingual-e5-small"])
    cold, warm = _tables(encoder, demo, k=k), _tables(encoder, demo, k=k)
    assert _hits()["memory"] == 1
    monkeypatch.setenv("SEARCH_DATA_CACHE", "off")
    assert _same(cold, _tables(encoder, demo, k=k)) and _same(warm, cold)


def test_training_tokens_miss_for_another_tokenizer_max_len_prefix_or_data(
    replicas: dict[str, Path], demo: Path, cache_dir: Path
) -> None:
    e5 = _encoder(replicas["multilingual-e5-small"])
    _tables(e5, demo)
    misses = _hits()["miss"]
    # Each of these must compute afresh (a miss), never reuse the first entry.
    _tables(_encoder(replicas["ko-simcse"], name="ko-simcse"), demo)
    _tables(e5, demo, max_len=24)
    _tables(_encoder(replicas["multilingual-e5-small"], query_prefix="Q: "), demo)
    _tables(_encoder(replicas["multilingual-e5-small"], passage_prefix=""), demo)
    path = demo / "train.jsonl"
    path.write_text(path.read_text(encoding="utf-8").replace("의", "이", 1), encoding="utf-8")
    _tables(e5, demo)
    assert _hits()["miss"] == misses + 5 and _hits()["memory"] == 0


def test_hard_negatives_miss_only_where_they_change_the_tables(
    replicas: dict[str, Path], demo: Path, cache_dir: Path
) -> None:
    encoder = _encoder(replicas["multilingual-e5-small"])
    most = max(len(e.negatives) for e in load_train(demo / "train.jsonl"))
    _tables(encoder, demo, k=most)
    _tables(encoder, demo, k=0)
    assert _hits()["miss"] == 2
    _tables(encoder, demo, k=most + 3)  # keeps as many negatives as there are: a hit
    assert _hits() == {"memory": 1, "disk": 0, "miss": 2}


def test_evaluation_from_cached_ids_gives_the_same_metrics(
    replicas: dict[str, Path], demo: Path, cache_dir: Path
) -> None:
    encoder = _encoder(replicas["multilingual-e5-small"])
    eval_set = load_eval(demo)
    for subset in (eval_set, eval_sample(eval_set, 10)):
        plain = evaluate(encoder, subset, max_len=32, batch_size=7)
        for _ in range(2):  # a miss, then a hit
            tokens = token_cache.cached_eval_tokens(encoder, subset, max_len=32)
            # Batches ordered by token count, not characters: other batches, same numbers.
            got = evaluate(encoder, subset, max_len=32, batch_size=7, tokens=tokens)
            assert got == pytest.approx(plain, rel=1e-6, abs=1e-9)
    assert _hits() == {"memory": 2, "disk": 0, "miss": 2}
    texts = list(eval_set.corpus.values())
    ids = encoder.tokenize(texts, kind="passage", max_len=32)
    by_tokens = encoder.encode(texts, kind="passage", max_len=32, batch_size=7, tokens=ids)
    by_chars = encoder.encode(texts, kind="passage", max_len=32, batch_size=7)
    assert torch.allclose(by_tokens, by_chars, atol=1e-5)
    other = EvalSet(dict(list(eval_set.corpus.items())[:-1]), eval_set.queries, eval_set.qrels)
    with pytest.raises(ValueError, match="tokens were not made from this eval set"):
        evaluate(encoder, other, max_len=32, tokens=tokens)


@pytest.mark.train
def test_trials_with_a_warm_cache_train_the_same(
    replicas: dict[str, Path], demo: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = trial_config(
        model="multilingual-e5-small",
        model_path=str(replicas["multilingual-e5-small"]),
        train_path=str(demo / "train.jsonl"),
        eval_dir=str(demo),
        batch_size=16,
        hard_negatives=1,
        max_train_samples=64,
        eval_every_steps=32,
        eval_sample_queries=8,
    )
    partial: list[dict[str, float]] = []

    def keep(step: int, metrics: dict[str, float]) -> bool:
        partial.append(metrics)
        return False  # never prune

    cold = train(cfg, report_partial=keep)
    warm = train(cfg, report_partial=keep)
    assert _hits()["miss"] == 5 and _hits()["memory"] == 5  # data x2, tokens, eval, sample
    monkeypatch.setenv("SEARCH_DATA_CACHE", "off")
    off = train(cfg, report_partial=keep)
    assert cold.history == warm.history == off.history
    n = len(partial) // 3
    assert n and partial[:n] == partial[n : 2 * n] == partial[2 * n :]
    # A changed training file between two trials: trained on the new data, not the cached.
    monkeypatch.setenv("SEARCH_DATA_CACHE", str(cache_dir))
    path = demo / "train.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[64:128] + lines[:64]), encoding="utf-8")
    changed = train(dataclasses.replace(cfg, eval_every_steps=None))
    monkeypatch.setenv("SEARCH_DATA_CACHE", "off")
    assert changed.history == train(dataclasses.replace(cfg, eval_every_steps=None)).history
    assert changed.history != cold.history


_CHILD = """
import json, sys
from search.train import token_cache
from search.train.cache import shared_cache
from search.train.encoder import BiEncoder
from search.train.loop import _build_dataset
from search.record.config import TrialConfig
cfg = TrialConfig.from_json(json.loads(sys.argv[1]))
encoder = BiEncoder.from_config(cfg)
examples = token_cache.load_train_cached(cfg.train_path)
data = _build_dataset(encoder, examples, max_len=cfg.max_len, hard_negatives=1)
tokens = token_cache.cached_eval_tokens(
    encoder, token_cache.load_eval_cached(cfg.eval_dir), max_len=cfg.max_len
)
print(json.dumps({**shared_cache().hits, "sum": int(data.passages.input_ids.sum())}))
"""


def test_a_second_process_reads_the_first_ones_entries(
    replicas: dict[str, Path], demo: Path, cache_dir: Path
) -> None:
    cfg = trial_config(
        model="multilingual-e5-small",
        model_path=str(replicas["multilingual-e5-small"]),
        train_path=str(demo / "train.jsonl"),
        eval_dir=str(demo),
    )
    encoder = BiEncoder.from_config(cfg)
    data = _build_dataset(
        encoder, token_cache.load_train_cached(demo / "train.jsonl"), max_len=32, hard_negatives=1
    )
    token_cache.cached_eval_tokens(encoder, token_cache.load_eval_cached(demo), max_len=32)
    assert _hits() == {"memory": 0, "disk": 0, "miss": 4}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SEARCH_DATA_CACHE": str(cache_dir)}
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(cfg.to_json())],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    hits = json.loads(child.stdout.splitlines()[-1])
    assert (hits["disk"], hits["miss"]) == (4, 0)
    assert hits["sum"] == int(data.passages.input_ids.sum())


def test_key_digest_is_content_only() -> None:
    assert key_digest({"file": "abc", "max_len": 32}) != key_digest({"file": "abc", "max_len": 33})


@pytest.fixture(autouse=True)
def _no_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("variable", "value"),
    [("SEARCH_DATA_CACHE_DISK_BYTES", "lots"), ("SEARCH_DATA_CACHE_MEMORY_BYTES", "-1")],
)
def test_a_bad_cache_bound_is_one_line_and_exit_2_before_any_study(
    tmp_path: Path, variable: str, value: str
) -> None:
    done = run_search(
        "run", "--study", "ko-retrieval", "--tiny", "--storage", f"sqlite:///{tmp_path}/c.db",
        cwd=tmp_path, env={variable: value},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"${variable} must" in done.stderr and value.upper() in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "c.db").exists()  # no trial burnt on it, no study written
