"""KLUE-NLI as a Korean retrieval task: premise = query, entailment = positive passage.

The conversion follows SimCSE-style NLI training: each premise becomes a query, its entailment
hypotheses its positives and its contradiction hypotheses its hard negatives. Premises are split
between a training JSONL and a BEIR evaluation directory, so no query is in both. The KLUE data
is CC BY-SA 4.0 (the KLUE authors); so is what this writes, and a README saying so goes with it.

Example:
    >>> from pathlib import Path
    >>> src = Path("../shared/data/klue-nli/klue-nli-v1.1_dev.json")
    >>> train_path, eval_dir = klue_nli_to_retrieval(src, "/tmp/klue")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from search.train.data import DataError

LABELS = ("entailment", "neutral", "contradiction")
LICENSE_NOTE = """\
# KLUE-NLI as a retrieval task

Converted by `search.train.nli_retrieval.klue_nli_to_retrieval` from {source}
(seed {seed}, eval fraction {eval_fraction}): premise = query, entailment hypothesis =
positive, contradiction hypothesis = hard negative; the eval corpus is every hypothesis of
the eval premises.

License: Creative Commons Attribution-ShareAlike 4.0 International (CC BY-SA 4.0),
(c) the KLUE authors (KLUE-benchmark/KLUE). This derivative is under CC BY-SA 4.0 too.
"""


@dataclass
class _Premise:
    """The hypotheses of one premise, by label, in file order."""

    text: str
    first_guid: str
    hypotheses: dict[str, list[tuple[str, str]]] = field(
        default_factory=lambda: {label: [] for label in LABELS}
    )  # label -> [(guid, hypothesis)]


def klue_nli_to_retrieval(
    json_path: str | Path,
    out_dir: str | Path,
    *,
    eval_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Turn KLUE-NLI into a training JSONL and a BEIR evaluation directory.

    Records are grouped by premise; premises without an entailment hypothesis are skipped.
    Each entailment hypothesis gives one training example whose negatives are the premise's
    contradiction hypotheses. The premises are shuffled with ``seed`` and ``eval_fraction`` of
    them go to evaluation, whose corpus is every hypothesis of the eval premises (entailment,
    neutral and contradiction; identical texts share one doc) and whose qrels (split ``test``)
    mark the entailment hypotheses relevant.

    Args:
        json_path: KLUE-NLI JSON (a list of records with premise, hypothesis, gold_label).
        out_dir: Where to write ``train.jsonl`` and ``eval/`` (created if needed).
        eval_fraction: Share of the premises kept for evaluation, in (0, 1).
        seed: Seed of the premise split; the same seed gives the same files.

    Returns:
        The training JSONL path and the evaluation directory.

    Raises:
        DataError: The JSON is missing, malformed, or has too few usable premises.
        ValueError: ``eval_fraction`` is not in (0, 1).
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), but got {eval_fraction=}.")
    premises = _read_premises(Path(json_path))
    usable = [p for p in premises if p.hypotheses["entailment"]]
    if len(usable) < 2:
        raise DataError(json_path, None, f"{len(usable)} premise(s) with an entailment, need 2")

    order = list(range(len(usable)))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(usable) * eval_fraction)), len(usable) - 1)
    eval_ids = set(order[:n_eval])
    train_part = [p for i, p in enumerate(usable) if i not in eval_ids]
    eval_part = [p for i, p in enumerate(usable) if i in eval_ids]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_path = out_dir / "train.jsonl"
    _write_train(train_path, train_part)
    eval_dir = out_dir / "eval"
    _write_eval(eval_dir, eval_part)
    note = LICENSE_NOTE.format(source=Path(json_path).name, seed=seed, eval_fraction=eval_fraction)
    (out_dir / "README.md").write_text(note, encoding="utf-8")
    return train_path, eval_dir


def _read_premises(path: Path) -> list[_Premise]:
    """Group the records by premise, in order of first appearance."""
    if not path.is_file():
        raise DataError(path, None, "file not found")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(path, exc.lineno, f"bad JSON: {exc.msg}") from None
    except UnicodeDecodeError as exc:
        raise DataError(path, None, f"not UTF-8 ({exc.reason})") from None
    if not isinstance(records, list):
        raise DataError(path, None, "expected a JSON list of records")
    premises: dict[str, _Premise] = {}
    for i, record in enumerate(records):
        premise, hypothesis, label = _fields(path, i, record)
        if label not in LABELS:  # e.g. "-" where annotators disagreed
            continue
        guid = str(record.get("guid", i))
        group = premises.setdefault(premise, _Premise(premise, guid))
        group.hypotheses[label].append((guid, hypothesis))
    return list(premises.values())


def _fields(path: Path, index: int, record: Any) -> tuple[str, str, str]:
    """premise, hypothesis, gold_label of one record, checked."""
    if not isinstance(record, dict):
        raise DataError(path, None, f"record {index} is not a JSON object")
    values = []
    for name in ("premise", "hypothesis", "gold_label"):
        value = record.get(name)
        if not isinstance(value, str) or not value.strip():
            raise DataError(path, None, f"record {index}: field {name!r} missing or not a string")
        values.append(value.strip())
    return values[0], values[1], values[2]


def _write_train(path: Path, premises: list[_Premise]) -> None:
    """One example per entailment hypothesis; contradictions are its hard negatives."""
    with path.open("w", encoding="utf-8") as f:
        for premise in premises:
            negatives = [text for _, text in premise.hypotheses["contradiction"]]
            for _, positive in premise.hypotheses["entailment"]:
                row = {"query": premise.text, "positive": positive, "negatives": negatives}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_eval(directory: Path, premises: list[_Premise]) -> None:
    """BEIR files: every hypothesis in the corpus, entailments relevant (split ``test``)."""
    (directory / "qrels").mkdir(parents=True, exist_ok=True)
    doc_ids: dict[str, str] = {}  # hypothesis text -> doc id (the first record's guid)
    with (directory / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for premise in premises:
            for label in LABELS:
                for guid, text in premise.hypotheses[label]:
                    if text in doc_ids:
                        continue
                    doc_ids[text] = guid
                    f.write(json.dumps({"_id": guid, "text": text}, ensure_ascii=False) + "\n")
    with (
        (directory / "queries.jsonl").open("w", encoding="utf-8") as queries,
        (directory / "qrels" / "test.tsv").open("w", encoding="utf-8") as qrels,
    ):
        qrels.write("query-id\tcorpus-id\tscore\n")
        for premise in premises:
            query_id = f"q-{premise.first_guid}"
            row = {"_id": query_id, "text": premise.text}
            queries.write(json.dumps(row, ensure_ascii=False) + "\n")
            relevant = dict.fromkeys(doc_ids[text] for _, text in premise.hypotheses["entailment"])
            for doc_id in relevant:
                qrels.write(f"{query_id}\t{doc_id}\t1\n")
