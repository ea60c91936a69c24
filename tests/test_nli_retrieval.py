"""search.train.nli_retrieval on the real KLUE-NLI dev file (skipped where absent, not in CI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _factories import KLUE_JSON

from search.train.data import DataError
from search.train.data import load_eval
from search.train.data import load_train
from search.train.nli_retrieval import klue_nli_to_retrieval

# The klue_json fixture skips where the data is absent, and fails under CI (conftest).
needs_klue = pytest.mark.usefixtures("klue_json")


@pytest.fixture(scope="module")
def records(klue_json: Path) -> list[dict[str, str]]:
    return json.loads(klue_json.read_text(encoding="utf-8"))


@needs_klue
def test_splits_are_disjoint_and_cover_the_premises(
    tmp_path: Path, records: list[dict[str, str]]
) -> None:
    train_path, eval_dir = klue_nli_to_retrieval(KLUE_JSON, tmp_path, eval_fraction=0.2, seed=0)
    train = load_train(train_path)
    eval_set = load_eval(eval_dir, "test")
    train_queries = {ex.query for ex in train}
    eval_queries = set(eval_set.queries.values())
    assert train_queries.isdisjoint(eval_queries)
    entailed = {r["premise"] for r in records if r["gold_label"] == "entailment"}
    assert train_queries | eval_queries == entailed
    assert len(eval_queries) == round(0.2 * len(entailed))
    # The eval corpus is every hypothesis of the eval premises: distractors included.
    eval_hypotheses = {r["hypothesis"] for r in records if r["premise"] in eval_queries}
    assert set(eval_set.corpus.values()) == eval_hypotheses
    assert len(eval_set.corpus) > len(eval_set.queries)


@needs_klue
def test_a_known_premise_maps_to_its_entailment_and_contradiction(
    tmp_path: Path, records: list[dict[str, str]]
) -> None:
    train_path, eval_dir = klue_nli_to_retrieval(KLUE_JSON, tmp_path, seed=1)
    train = {ex.query: ex for ex in load_train(train_path)}
    eval_set = load_eval(eval_dir)
    premise = "10명이 함께 사용하기 불편함없이 만족했다."
    by_label = {r["gold_label"]: r["hypothesis"] for r in records if r["premise"] == premise}
    assert by_label["entailment"] == "10명이 함께 사용하기에 만족스러웠다."
    if premise in train:
        example = train[premise]
        assert example.positive == by_label["entailment"]
        assert example.negatives == (by_label["contradiction"],)
    else:
        query_id = next(q for q, text in eval_set.queries.items() if text == premise)
        relevant = [eval_set.corpus[doc] for doc in eval_set.qrels[query_id]]
        assert relevant == [by_label["entailment"]]
    # Every example's positive is an entailment of its query, its negatives contradictions.
    label_of = {(r["premise"], r["hypothesis"]): r["gold_label"] for r in records}
    for ex in train.values():
        assert label_of[(ex.query, ex.positive)] == "entailment"
        assert all(label_of[(ex.query, n)] == "contradiction" for n in ex.negatives)
    for query_id, rels in eval_set.qrels.items():
        query = eval_set.queries[query_id]
        assert all(label_of[(query, eval_set.corpus[d])] == "entailment" for d in rels)


@needs_klue
def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    def files(out: Path) -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    klue_nli_to_retrieval(KLUE_JSON, tmp_path / "a", seed=7)
    klue_nli_to_retrieval(KLUE_JSON, tmp_path / "b", seed=7)
    klue_nli_to_retrieval(KLUE_JSON, tmp_path / "c", seed=8)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert (
        files(tmp_path / "a")["eval/queries.jsonl"] != files(tmp_path / "c")["eval/queries.jsonl"]
    )


def test_premises_without_entailment_are_skipped(tmp_path: Path) -> None:
    rows = [
        {"guid": "g0", "premise": "P1", "hypothesis": "H1e", "gold_label": "entailment"},
        {"guid": "g1", "premise": "P1", "hypothesis": "H1c", "gold_label": "contradiction"},
        {"guid": "g2", "premise": "P2", "hypothesis": "H2n", "gold_label": "neutral"},
        {"guid": "g3", "premise": "P3", "hypothesis": "H3e", "gold_label": "entailment"},
        {"guid": "g4", "premise": "P3", "hypothesis": "H3x", "gold_label": "-"},
    ]
    src = tmp_path / "nli.json"
    src.write_text(json.dumps(rows), encoding="utf-8")
    train_path, eval_dir = klue_nli_to_retrieval(src, tmp_path / "out", eval_fraction=0.5)
    queries = {ex.query for ex in load_train(train_path)}
    queries |= set(load_eval(eval_dir).queries.values())
    assert queries == {"P1", "P3"}


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{", "bad JSON"),
        ('{"premise": "p"}', "expected a JSON list"),
        ('[{"premise": "p", "hypothesis": 3, "gold_label": "entailment"}]', "'hypothesis'"),
        ('[{"premise": "p", "hypothesis": "h", "gold_label": "neutral"}]', "0 premise(s)"),
    ],
)
def test_malformed_input_raises_data_error(tmp_path: Path, content: str, reason: str) -> None:
    src = tmp_path / "nli.json"
    src.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="nli.json") as info:
        klue_nli_to_retrieval(src, tmp_path / "out")
    assert reason in info.value.reason


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_eval_fraction_is_checked(tmp_path: Path, fraction: float) -> None:
    with pytest.raises(ValueError, match="eval_fraction"):
        klue_nli_to_retrieval(tmp_path / "absent.json", tmp_path, eval_fraction=fraction)
