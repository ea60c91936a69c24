"""Retrieval metrics against hand-computed values and sentence-transformers' evaluator."""

from __future__ import annotations

import math

import pytest
import torch

from search.train.metrics import retrieval_metrics


def test_one_relevant_doc_at_rank_three() -> None:
    scores = torch.tensor([[0.9, 0.5, 0.7, 0.8, 0.1]])  # ranking: 0, 3, 2, 1, 4
    m = retrieval_metrics(scores, [{2}], k_values=(1, 2, 3, 10))
    assert m["mrr@10"] == pytest.approx(1 / 3)
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(4))  # = 0.5
    assert m["recall@1"] == 0.0
    assert m["recall@2"] == 0.0
    assert m["mrr@2"] == 0.0
    assert m["ndcg@2"] == 0.0
    assert m["recall@3"] == 1.0
    assert m["recall@10"] == 1.0


def test_two_relevant_docs() -> None:
    scores = torch.tensor([[0.9, 0.5, 0.7, 0.8, 0.1]])  # ranking: 0, 3, 2, 1, 4
    m = retrieval_metrics(scores, [{3, 4}], k_values=(1, 2, 5))
    # doc 3 at rank 2, doc 4 at rank 5.
    assert m["mrr@5"] == pytest.approx(1 / 2)
    assert m["recall@1"] == 0.0
    assert m["recall@2"] == pytest.approx(1 / 2)
    assert m["recall@5"] == 1.0
    idcg_2 = 1 + 1 / math.log2(3)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3)) / idcg_2)
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(6)) / idcg_2)
    # With k = 1 the ideal DCG counts one relevant doc only (min(k, |relevant|)).
    assert m["ndcg@1"] == 0.0


def test_ideal_dcg_uses_min_of_k_and_relevant_count() -> None:
    scores = torch.tensor([[0.9, 0.8, 0.7]])
    m = retrieval_metrics(scores, [{0, 1, 2}], k_values=(1, 2))
    assert m["ndcg@1"] == pytest.approx(1.0)
    assert m["ndcg@2"] == pytest.approx(1.0)
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == pytest.approx(2 / 3)


def test_ties_rank_lower_index_first() -> None:
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.2], [0.5, 0.5, 0.5, 0.2]])
    m = retrieval_metrics(scores, [{2}, {0}], k_values=(1, 10))
    # Query 0: doc 2 ties with docs 0 and 1 and comes after them (rank 3); query 1: rank 1.
    assert m["mrr@10"] == pytest.approx((1 / 3 + 1) / 2)
    assert m["recall@1"] == pytest.approx(1 / 2)
    assert m["ndcg@10"] == pytest.approx((1 / math.log2(4) + 1) / 2)


def test_mean_over_queries_and_default_keys() -> None:
    scores = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    m = retrieval_metrics(scores, [{0}, {1}])
    assert set(m) >= {"ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10"}
    assert m["recall@1"] == pytest.approx(0.5)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 2) / 2)


def test_many_queries_cross_chunk_boundary() -> None:
    # 300 queries (more than one internal chunk), relevant doc at a known rank each.
    n_queries, n_docs = 300, 20
    scores = torch.arange(n_docs, 0, -1, dtype=torch.float32).repeat(n_queries, 1)
    relevant = [{q % n_docs} for q in range(n_queries)]  # rank = q % n_docs + 1
    m = retrieval_metrics(scores, relevant, k_values=(10,))
    expected_mrr = sum(1 / (q % n_docs + 1) for q in range(n_queries) if q % n_docs < 10)
    assert m["mrr@10"] == pytest.approx(expected_mrr / n_queries)


def test_agrees_with_sentence_transformers_evaluator() -> None:
    from sentence_transformers.sentence_transformer import evaluation as st_eval

    gen = torch.Generator().manual_seed(0)
    n_queries, n_docs = 40, 30
    scores = torch.randn(n_queries, n_docs, generator=gen).round(decimals=1)  # some ties
    relevant = [
        set(torch.randperm(n_docs, generator=gen)[: 1 + q % 3].tolist()) for q in range(n_queries)
    ]
    qids = [f"q{q:03d}" for q in range(n_queries)]
    cids = [f"d{d:03d}" for d in range(n_docs)]  # string order = column order (tie-break)
    evaluator = st_eval.InformationRetrievalEvaluator(
        queries={qid: "x" for qid in qids},
        corpus={cid: "x" for cid in cids},
        relevant_docs={qids[q]: {cids[d] for d in relevant[q]} for q in range(n_queries)},
        mrr_at_k=[1, 5, 10],
        ndcg_at_k=[1, 5, 10],
        precision_recall_at_k=[1, 5, 10],
        write_csv=False,
    )
    results = [
        [{"corpus_id": cids[d], "score": float(scores[q, d])} for d in range(n_docs)]
        for q in range(n_queries)
    ]
    expected = evaluator.compute_metrics(results)
    ours = retrieval_metrics(scores, relevant, k_values=(1, 5, 10))
    for k in (1, 5, 10):
        assert ours[f"ndcg@{k}"] == pytest.approx(expected["ndcg@k"][k])
        assert ours[f"mrr@{k}"] == pytest.approx(expected["mrr@k"][k])
        assert ours[f"recall@{k}"] == pytest.approx(expected["recall@k"][k])


def test_bad_input_raises() -> None:
    with pytest.raises(ValueError):
        retrieval_metrics(torch.zeros(2, 3), [{0}])  # one set for two queries
    with pytest.raises(ValueError):
        retrieval_metrics(torch.zeros(1, 3), [set()])  # no relevant doc
    with pytest.raises(ValueError):
        retrieval_metrics(torch.zeros(1, 3), [{3}])  # outside the corpus
    with pytest.raises(ValueError):
        retrieval_metrics(torch.zeros(1, 3), [{0}], k_values=(0,))
