"""Training and evaluation data: JSONL training pairs and BEIR evaluation sets, checked early.

Every loader rejects malformed input with a :class:`DataError` whose one-line message names the
file, the line and the reason, so that a study fails before any model is loaded.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "train.jsonl"
    >>> _ = path.write_text('{"query": "q", "positive": "p", "negatives": ["n"]}\\n')
    >>> load_train(path)
    [TrainExample(query='q', positive='p', negatives=('n',))]
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from typing import BinaryIO

KO_DEMO_DIR = Path(__file__).resolve().parents[1] / "studies" / "data" / "ko-demo"
"""The shipped Korean demo dataset: ``train.jsonl`` and a BEIR ``test`` split beside it."""

QRELS_HEADER = ("query-id", "corpus-id", "score")
MAX_LINE_BYTES = 2**20
"""Longest line a data file may have (1 MiB, line break excluded): one record, not a corpus."""


@dataclass(frozen=True)
class TrainExample:
    """One training query with its positive passage and optional hard negatives.

    Args:
        query: The query text.
        positive: A passage that answers the query.
        negatives: Passages on the same topic that do not answer it.
    """

    query: str
    positive: str
    negatives: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvalSet:
    """A retrieval evaluation set in memory (BEIR layout, one split).

    Args:
        corpus: Doc id -> text (``title + " " + text`` when the title is not empty).
        queries: Query id -> text, only queries with at least one relevant doc in the split.
        qrels: Query id -> {doc id: relevance}, relevance > 0 only.
    """

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]


class DataError(ValueError):
    """Malformed data, with the one-line message ``FILE:LINE: reason`` (``FILE: reason``).

    Args:
        path: The offending file (or directory).
        line: 1-based line number, or None when the reason is not about one line.
        reason: What is wrong, in a few words.
    """

    def __init__(self, path: str | Path, line: int | None, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = " ".join(reason.split())  # one line, whatever the cause said
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {self.reason}")


def load_train(path: str | Path, *, max_samples: int | None = None) -> list[TrainExample]:
    """Load training examples from JSONL (``query``, ``positive``, optional ``negatives``).

    Blank lines are skipped. Reading stops after ``max_samples`` examples, so later lines are
    not checked in that case.

    Args:
        path: The JSONL file.
        max_samples: Keep only the first examples (None: all).

    Returns:
        The examples in file order.

    Raises:
        DataError: The file is missing, empty or has a malformed line.
        ValueError: ``max_samples`` is not positive.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be positive or None, but got {max_samples=}.")
    examples: list[TrainExample] = []
    for line, obj in _iter_jsonl(Path(path)):
        query = _text_field(obj, "query", path, line)
        positive = _text_field(obj, "positive", path, line)
        negatives = _negatives_field(obj, path, line)
        examples.append(TrainExample(query, positive, negatives))
        if max_samples is not None and len(examples) >= max_samples:
            break
    if not examples:
        raise DataError(path, None, "no examples (the file is empty)")
    return examples


def load_eval(directory: str | Path, split: str = "test") -> EvalSet:
    """Load one split of a BEIR directory (``corpus.jsonl``, ``queries.jsonl``, ``qrels/``).

    Qrels with score <= 0 are not relevant; queries without a relevant doc are dropped.

    Args:
        directory: The BEIR directory.
        split: Name of the qrels file, ``qrels/<split>.tsv``.

    Returns:
        The corpus, the queries with relevant docs, and their positive qrels.

    Raises:
        DataError: A file is missing, empty or malformed, an id is duplicated or unknown,
            or no query has a relevant doc.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(directory, None, "evaluation directory not found")
    qrels_path = directory / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        splits = sorted(p.stem for p in (directory / "qrels").glob("*.tsv"))
        raise DataError(qrels_path, None, f"split {split!r} not found (available: {splits})")

    corpus = _load_corpus(directory / "corpus.jsonl")
    all_queries = _load_queries(directory / "queries.jsonl")
    qrels = _load_qrels(qrels_path, all_queries, corpus)
    queries = {qid: text for qid, text in all_queries.items() if qid in qrels}
    return EvalSet(corpus=corpus, queries=queries, qrels=qrels)


def validate_data(train_path: str | Path, eval_dir: str | Path, split: str = "test") -> None:
    """Check the training file and the evaluation split before any model is loaded.

    Args:
        train_path: Training JSONL.
        eval_dir: BEIR directory.
        split: Qrels split to check.

    Raises:
        DataError: The first problem found.
    """
    load_train(train_path)
    load_eval(eval_dir, split)


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line of a JSONL file."""
    if not path.is_file():
        raise DataError(path, None, "is a directory" if path.is_dir() else "file not found")
    with path.open("rb") as f:
        for line, raw in _lines(f, path):
            try:
                text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(path, line, f"not UTF-8 ({exc.reason})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(path, line, f"bad JSON: {exc.msg} at column {exc.colno}") from None
            if not isinstance(obj, dict):
                raise DataError(path, line, f"expected a JSON object, got {_json_type(obj)}")
            yield line, obj


def _lines(f: BinaryIO, path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each line, never reading more than MAX_LINE_BYTES of one."""
    line = 0
    while raw := f.readline(MAX_LINE_BYTES + 2):  # + room for "\r\n"
        line += 1
        if len(raw.rstrip(b"\r\n")) > MAX_LINE_BYTES:
            raise DataError(
                path,
                line,
                f"line longer than {MAX_LINE_BYTES} bytes (1 MiB, the limit for one record)",
            )
        yield line, raw


def _text_field(
    obj: dict[str, Any], name: str, path: str | Path, line: int, *, allow_empty: bool = False
) -> str:
    """A required string field, non-empty unless ``allow_empty``."""
    if name not in obj:
        raise DataError(path, line, f"missing field {name!r}")
    value = obj[name]
    if not isinstance(value, str):
        raise DataError(path, line, f"field {name!r} must be a string, got {_json_type(value)}")
    if not allow_empty and not value.strip():
        raise DataError(path, line, f"field {name!r} is empty")
    return value


def _id_field(obj: dict[str, Any], path: Path, line: int) -> str:
    """The ``_id`` of a BEIR record: a non-empty string (an integer is read as its digits)."""
    if "_id" not in obj:
        raise DataError(path, line, "missing field '_id'")
    value = obj["_id"]
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(path, line, f"field '_id' must be a string, got {_json_type(value)}")
    if not value.strip():
        raise DataError(path, line, "field '_id' is empty")
    return value


def _negatives_field(obj: dict[str, Any], path: str | Path, line: int) -> tuple[str, ...]:
    """The optional ``negatives``: a list of non-empty strings."""
    value = obj.get("negatives", [])
    if not isinstance(value, list):
        raise DataError(path, line, f"field 'negatives' must be a list, got {_json_type(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            kind = _json_type(item)
            raise DataError(path, line, f"negatives[{i}] must be a string, got {kind}")
        if not item.strip():
            raise DataError(path, line, f"negatives[{i}] is empty")
    return tuple(value)


def _load_corpus(path: Path) -> dict[str, str]:
    """Doc id -> ``title + " " + text`` (text alone when the title is absent or empty)."""
    corpus: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line, obj in _iter_jsonl(path):
        doc_id = _id_field(obj, path, line)
        text = _text_field(obj, "text", path, line, allow_empty=True)
        title = obj.get("title")
        if title is not None and not isinstance(title, str):
            raise DataError(path, line, f"field 'title' must be a string, got {_json_type(title)}")
        if title and title.strip():
            text = f"{title} {text}" if text.strip() else title
        if not text.strip():
            raise DataError(path, line, "field 'text' is empty (and no title)")
        if doc_id in corpus:
            raise DataError(
                path, line, f"duplicate _id {doc_id!r} (first on line {first_line[doc_id]})"
            )
        corpus[doc_id] = text
        first_line[doc_id] = line
    if not corpus:
        raise DataError(path, None, "no documents (the file is empty)")
    return corpus


def _load_queries(path: Path) -> dict[str, str]:
    """Query id -> text."""
    queries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line, obj in _iter_jsonl(path):
        query_id = _id_field(obj, path, line)
        text = _text_field(obj, "text", path, line)
        if query_id in queries:
            raise DataError(
                path, line, f"duplicate _id {query_id!r} (first on line {first_line[query_id]})"
            )
        queries[query_id] = text
        first_line[query_id] = line
    if not queries:
        raise DataError(path, None, "no queries (the file is empty)")
    return queries


def _load_qrels(
    path: Path, queries: dict[str, str], corpus: dict[str, str]
) -> dict[str, dict[str, int]]:
    """Positive qrels of one split, every id checked against the queries and the corpus."""
    qrels: dict[str, dict[str, int]] = {}
    seen: dict[tuple[str, str], int] = {}
    header_seen = False
    with path.open("rb") as f:
        for line, raw in _lines(f, path):
            try:
                text = raw.decode("utf-8-sig" if line == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(path, line, f"not UTF-8 ({exc.reason})") from None
            if not text.strip():
                continue
            fields = [field.strip() for field in text.rstrip("\r\n").split("\t")]
            if not header_seen:
                if tuple(fields) != QRELS_HEADER:
                    want = "\\t".join(QRELS_HEADER)
                    raise DataError(path, line, f"expected the header {want!r}")
                header_seen = True
                continue
            if len(fields) != 3:
                raise DataError(path, line, f"expected 3 tab-separated fields, got {len(fields)}")
            query_id, doc_id, score_text = fields
            try:
                score = int(score_text)
            except ValueError:
                raise DataError(path, line, f"score {score_text!r} is not an integer") from None
            if query_id not in queries:
                raise DataError(path, line, f"unknown query id {query_id!r}")
            if doc_id not in corpus:
                raise DataError(path, line, f"unknown doc id {doc_id!r}")
            if (query_id, doc_id) in seen:
                first = seen[(query_id, doc_id)]
                raise DataError(
                    path,
                    line,
                    f"duplicate pair ({query_id!r}, {doc_id!r}) (first on line {first})",
                )
            seen[(query_id, doc_id)] = line
            if score > 0:
                qrels.setdefault(query_id, {})[doc_id] = score
    if not header_seen:
        raise DataError(path, None, "no qrels (the file is empty)")
    if not qrels:
        raise DataError(path, None, "no query has a relevant doc (score > 0)")
    return qrels


def _json_type(value: object) -> str:
    """The JSON name of a decoded value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
