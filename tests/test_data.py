"""Tests of search.train.data: loaders, their one-line errors, and the shipped demo dataset."""

from __future__ import annotations

import importlib.util
import sys
import tracemalloc
from pathlib import Path

import pytest

from search.train.data import KO_DEMO_DIR
from search.train.data import MAX_LINE_BYTES
from search.train.data import DataError
from search.train.data import EvalSet
from search.train.data import TrainExample
from search.train.data import load_eval
from search.train.data import load_train
from search.train.data import validate_data

GOOD_TRAIN = (
    '{"query": "프랑스의 수도는?", "positive": "파리는 프랑스의 수도이다.", '
    '"negatives": ["베를린은 독일의 수도이다."]}\n'
    "\n"
    '{"query": "q2", "positive": "p2"}\n'
)
GOOD_CORPUS = (
    '{"_id": "d1", "title": "파리", "text": "프랑스의 수도이다."}\n'
    '{"_id": "d2", "text": "독일의 수도는 베를린이다."}\n'
    '{"_id": "d3", "title": "", "text": "로마는 이탈리아의 수도이다."}\n'
)
GOOD_QUERIES = (
    '{"_id": "q1", "text": "프랑스의 수도는?"}\n'
    '{"_id": "q2", "text": "독일의 수도는?"}\n'
    '{"_id": "q3", "text": "판정이 없는 질의"}\n'
)
GOOD_QRELS = "query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t2\nq2\td3\t0\nq3\td3\t0\n"


def write_beir(
    root: Path,
    *,
    corpus: str = GOOD_CORPUS,
    queries: str = GOOD_QUERIES,
    qrels: str = GOOD_QRELS,
    split: str = "test",
) -> Path:
    """Write a small BEIR directory under ``root`` and return it."""
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text(corpus, encoding="utf-8")
    (root / "queries.jsonl").write_text(queries, encoding="utf-8")
    (root / "qrels" / f"{split}.tsv").write_text(qrels, encoding="utf-8")
    return root


def test_load_train_reads_examples_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(GOOD_TRAIN, encoding="utf-8")
    examples = load_train(path)
    assert examples == [
        TrainExample(
            "프랑스의 수도는?", "파리는 프랑스의 수도이다.", ("베를린은 독일의 수도이다.",)
        ),
        TrainExample("q2", "p2", ()),
    ]
    assert load_train(str(path), max_samples=1) == examples[:1]


def test_load_train_rejects_non_positive_max_samples(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(GOOD_TRAIN, encoding="utf-8")
    with pytest.raises(ValueError, match="max_samples=0"):
        load_train(path, max_samples=0)


def test_load_eval_joins_title_and_drops_non_relevant(tmp_path: Path) -> None:
    eval_set = load_eval(write_beir(tmp_path))
    assert eval_set == EvalSet(
        corpus={
            "d1": "파리 프랑스의 수도이다.",
            "d2": "독일의 수도는 베를린이다.",
            "d3": "로마는 이탈리아의 수도이다.",
        },
        queries={"q1": "프랑스의 수도는?", "q2": "독일의 수도는?"},
        qrels={"q1": {"d1": 1}, "q2": {"d2": 2}},
    )


def test_load_eval_reads_other_split(tmp_path: Path) -> None:
    eval_set = load_eval(write_beir(tmp_path, split="dev"), "dev")
    assert set(eval_set.queries) == {"q1", "q2"}


TRAIN_CASES = [
    ("", None, "no examples"),
    ("\n\n", None, "no examples"),
    ('{"query": "q", "positive": "p"}\n{"query": "q", \n', 2, "bad JSON"),
    ('["q", "p"]\n', 1, "expected a JSON object, got array"),
    ('{"positive": "p"}\n', 1, "missing field 'query'"),
    ('{"query": "q"}\n', 1, "missing field 'positive'"),
    ('{"query": 3, "positive": "p"}\n', 1, "field 'query' must be a string, got number"),
    ('{"query": "q", "positive": "  "}\n', 1, "field 'positive' is empty"),
    ('{"query": "q", "positive": "p", "negatives": "n"}\n', 1, "'negatives' must be a list"),
    ('{"query": "q", "positive": "p", "negatives": ["n", null]}\n', 1, "negatives[1] must be"),
    ('{"query": "q", "positive": "p", "negatives": [""]}\n', 1, "negatives[0] is empty"),
]


@pytest.mark.parametrize(("content", "line", "reason"), TRAIN_CASES)
def test_load_train_errors_name_file_line_and_reason(
    tmp_path: Path, content: str, line: int | None, reason: str
) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_train(path)
    error = info.value
    assert error.path == str(path)
    assert error.line == line
    assert reason in error.reason
    where = str(path) if line is None else f"{path}:{line}"
    assert str(error).startswith(f"{where}: ")
    assert "\n" not in str(error)


def test_load_train_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found$"):
        load_train(tmp_path / "nope.jsonl")


def test_load_train_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r": is a directory$"):
        load_train(tmp_path)


def test_load_train_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"query": "q", "positive": "p"}\n{"query": "\xff"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl:2: not UTF-8"):
        load_train(path)


EVAL_CASES = [
    # (file to break, its content, expected file, line, reason)
    ("corpus", "", "corpus.jsonl", None, "no documents"),
    ("corpus", '{"_id": "d1", "text": "a"}\n{"text": "b"}\n', "corpus.jsonl", 2, "field '_id'"),
    (
        "corpus",
        '{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n',
        "corpus.jsonl",
        2,
        "duplicate _id 'd1' (first on line 1)",
    ),
    ("corpus", '{"_id": "d1", "text": ["a"]}\n', "corpus.jsonl", 1, "'text' must be a string"),
    ("corpus", '{"_id": "d1", "text": "a", "title": 1}\n', "corpus.jsonl", 1, "'title' must be"),
    ("corpus", '{"_id": "d1", "text": ""}\n', "corpus.jsonl", 1, "'text' is empty"),
    ("corpus", '{"_id": null, "text": "a"}\n', "corpus.jsonl", 1, "'_id' must be a string"),
    ("corpus", "{not json}\n", "corpus.jsonl", 1, "bad JSON"),
    (
        "queries",
        '{"_id": "q1", "text": "a"}\n{"_id": "q1", "text": "b"}\n',
        "queries.jsonl",
        2,
        "duplicate _id 'q1'",
    ),
    ("queries", '{"_id": "q1"}\n', "queries.jsonl", 1, "missing field 'text'"),
    ("qrels", "", "test.tsv", None, "no qrels"),
    ("qrels", "q1\td1\t1\n", "test.tsv", 1, "expected the header"),
    ("qrels", "query-id\tcorpus-id\tscore\nq1\td1\n", "test.tsv", 2, "expected 3"),
    ("qrels", "query-id\tcorpus-id\tscore\nq1\td1\thigh\n", "test.tsv", 2, "not an integer"),
    ("qrels", "query-id\tcorpus-id\tscore\nq1\td1\t1.5\n", "test.tsv", 2, "not an integer"),
    ("qrels", "query-id\tcorpus-id\tscore\nq9\td1\t1\n", "test.tsv", 2, "unknown query id 'q9'"),
    ("qrels", "query-id\tcorpus-id\tscore\nq1\td9\t1\n", "test.tsv", 2, "unknown doc id 'd9'"),
    (
        "qrels",
        "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td1\t1\n",
        "test.tsv",
        3,
        "duplicate pair",
    ),
    ("qrels", "query-id\tcorpus-id\tscore\nq1\td1\t0\n", "test.tsv", None, "no query has"),
]


@pytest.mark.parametrize(("which", "content", "file", "line", "reason"), EVAL_CASES)
def test_load_eval_errors_name_file_line_and_reason(
    tmp_path: Path, which: str, content: str, file: str, line: int | None, reason: str
) -> None:
    root = write_beir(tmp_path, **{which: content})
    with pytest.raises(DataError) as info:
        load_eval(root)
    error = info.value
    assert Path(error.path).name == file
    assert error.line == line
    assert reason in error.reason
    assert file in str(error)
    assert "\n" not in str(error)


def test_load_eval_missing_split_names_the_available_ones(tmp_path: Path) -> None:
    root = write_beir(tmp_path)
    with pytest.raises(DataError, match=r"split 'dev' not found \(available: \['test'\]\)"):
        load_eval(root, "dev")


@pytest.mark.parametrize("missing", ["corpus.jsonl", "queries.jsonl"])
def test_load_eval_missing_file(tmp_path: Path, missing: str) -> None:
    root = write_beir(tmp_path)
    (root / missing).unlink()
    with pytest.raises(DataError, match=f"{missing}: file not found"):
        load_eval(root)


def test_load_eval_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="evaluation directory not found"):
        load_eval(tmp_path / "absent")


def test_validate_data_checks_both(tmp_path: Path) -> None:
    train = tmp_path / "train.jsonl"
    train.write_text(GOOD_TRAIN, encoding="utf-8")
    root = write_beir(tmp_path / "eval")
    validate_data(train, root, "test")
    with pytest.raises(DataError, match="dev"):
        validate_data(train, root, "dev")
    train.write_text('{"query": "q"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="missing field 'positive'"):
        validate_data(train, root, "test")


def test_demo_dataset_validates() -> None:
    validate_data(KO_DEMO_DIR / "train.jsonl", KO_DEMO_DIR, "test")


def test_demo_dataset_shape() -> None:
    train = load_train(KO_DEMO_DIR / "train.jsonl")
    eval_set = load_eval(KO_DEMO_DIR, "test")
    assert 300 <= len(train) <= 500
    assert 80 <= len(eval_set.queries) <= 150
    assert all(1 <= len(ex.negatives) <= 2 for ex in train)
    assert all(ex.positive not in ex.negatives for ex in train)
    train_queries = {ex.query for ex in train}
    assert len(train_queries) == len(train)
    assert train_queries.isdisjoint(eval_set.queries.values())
    # The corpus holds more than the eval positives: distractors are there too.
    positives = {doc for rels in eval_set.qrels.values() for doc in rels}
    assert len(eval_set.corpus) > len(positives)
    # Korean text, not placeholders.
    assert all(any("\uac00" <= ch <= "\ud7a3" for ch in ex.query) for ex in train)


def test_demo_dataset_is_small_and_licensed() -> None:
    size = sum(p.stat().st_size for p in KO_DEMO_DIR.rglob("*") if p.is_file())
    assert size < 320_000
    assert "CC0-1.0" in (KO_DEMO_DIR / "README.md").read_text(encoding="utf-8")


def test_demo_dataset_matches_its_generator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = Path(__file__).parents[1] / "tools" / "make_ko_demo.py"
    spec = importlib.util.spec_from_file_location("make_ko_demo", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "make_ko_demo", module)  # dataclasses look it up there
    spec.loader.exec_module(module)
    module.write(tmp_path)
    for path in sorted(p for p in tmp_path.rglob("*") if p.is_file()):
        shipped = KO_DEMO_DIR / path.relative_to(tmp_path)
        assert shipped.read_bytes() == path.read_bytes(), f"{shipped} is stale: rerun {script}"


def _record(size: int) -> bytes:
    """A valid training line of exactly ``size`` bytes (line break excluded)."""
    head = b'{"query": "q", "positive": "'
    tail = b'"}'
    return head + b"p" * (size - len(head) - len(tail)) + tail


def test_a_line_at_the_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(_record(MAX_LINE_BYTES) + b"\r\n" + _record(100) + b"\n")
    examples = load_train(path)
    assert len(examples) == 2 and len(examples[0].positive) > MAX_LINE_BYTES - 100


@pytest.mark.parametrize("size", [MAX_LINE_BYTES + 1, 20 * MAX_LINE_BYTES])
def test_a_line_over_the_limit_is_rejected_without_reading_it_whole(
    tmp_path: Path, size: int
) -> None:
    path = tmp_path / "train.jsonl"
    path.write_bytes(_record(100) + b"\n" + _record(size) + b"\n" + _record(100) + b"\n")
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            load_train(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (
        str(info.value)
        == f"{path}:2: line longer than {MAX_LINE_BYTES} bytes (1 MiB, the limit for one record)"
    )
    assert peak < 4 * MAX_LINE_BYTES  # a 20 MiB line is never held whole


@pytest.mark.parametrize("name", ["corpus.jsonl", "queries.jsonl", "qrels/test.tsv"])
def test_eval_files_have_the_line_limit_too(tmp_path: Path, name: str) -> None:
    write_beir(tmp_path)
    target = tmp_path / name
    lines = target.read_bytes().splitlines(keepends=True)
    lines.insert(1, b"x" * (MAX_LINE_BYTES + 1) + b"\n")
    target.write_bytes(b"".join(lines))
    with pytest.raises(DataError, match=r":2: line longer than 1048576 bytes"):
        load_eval(tmp_path)
