"""Retrieval metrics (nDCG, MRR, recall at k) and the evaluation of an encoder on an eval set.

Definitions are those of BEIR and sentence-transformers' ``InformationRetrievalEvaluator`` with
binary relevance; documents with equal scores rank by ascending column index, as that
evaluator breaks ties by ascending corpus id. Each mean comes with its standard error over
the queries (``ndcg@10_se``): the evaluation's own noise, which the pruner allows for
(``search.sampling.peer_pruner``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from search.record.attrs import SE_SUFFIX
from search.record.attrs import se_key

if TYPE_CHECKING:
    from search.train.data import EvalSet
    from search.train.encoder import BiEncoder

_QUERY_CHUNK = 256  # queries ranked at once: bounds the (chunk, n_rel, n_docs) comparison


def without_se(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` less the standard errors (what a run's final metrics and history keep)."""
    return {k: v for k, v in metrics.items() if not k.endswith(SE_SUFFIX)}


def _mean_and_se(per_query: Tensor) -> tuple[float, float]:
    """Mean over queries and its standard error ``sd / sqrt(n)`` (``sd`` with ddof 0: exactly
    the bootstrap standard error of the mean, without resampling)."""
    n = per_query.numel()
    return per_query.mean().item(), (per_query.std(correction=0) / math.sqrt(n)).item()


def _ranks_of_relevant(scores: Tensor, relevant: Sequence[set[int]]) -> Tensor:
    """0-based rank of each relevant document, ``(n_queries, max_relevant)``; padding is inf.

    The rank of document ``d`` is the number of documents scored higher, plus those scored the
    same with a lower index: the position a stable descending sort would give it, without
    sorting the whole row.
    """
    n_queries, n_docs = scores.shape
    width = max(len(r) for r in relevant)
    index = torch.zeros(n_queries, width, dtype=torch.long)
    valid = torch.zeros(n_queries, width, dtype=torch.bool)
    for q, docs in enumerate(relevant):
        ordered = sorted(docs)
        index[q, : len(ordered)] = torch.tensor(ordered, dtype=torch.long)
        valid[q, : len(ordered)] = True
    columns = torch.arange(n_docs)
    ranks = torch.empty(n_queries, width, dtype=torch.float64)
    for start in range(0, n_queries, _QUERY_CHUNK):
        rows = scores[start : start + _QUERY_CHUNK]  # (chunk, n_docs)
        idx = index[start : start + _QUERY_CHUNK]  # (chunk, width)
        rel_scores = rows.gather(1, idx).unsqueeze(-1)  # (chunk, width, 1)
        rows = rows.unsqueeze(1)  # (chunk, 1, n_docs)
        higher = (rows > rel_scores).sum(-1)
        tied_before = ((rows == rel_scores) & (columns < idx.unsqueeze(-1))).sum(-1)
        ranks[start : start + _QUERY_CHUNK] = (higher + tied_before).double()
    return ranks.masked_fill(~valid, math.inf)


def retrieval_metrics(
    scores: Tensor, relevant: Sequence[set[int]], *, k_values: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Mean nDCG@k, MRR@k and recall@k over queries, with binary relevance, and the standard
    error of each mean over the queries (``sd / sqrt(n)``, ddof 0: the bootstrap SE).

    Example:
        >>> import torch
        >>> scores = torch.tensor([[0.9, 0.8, 0.7, 0.1]])  # the relevant doc 2 ranks third
        >>> m = retrieval_metrics(scores, [{2}], k_values=(1, 10))
        >>> m["mrr@10"], m["recall@1"], round(m["ndcg@10"], 4)  # 1/3, 0, 1/log2(4)
        (0.3333333333333333, 0.0, 0.5)
        >>> m["ndcg@10_se"]  # one query: no spread
        0.0
        >>> m = retrieval_metrics(torch.eye(2)[[0, 0]], [{0}, {1}], k_values=(1,))
        >>> m["recall@1"], m["recall@1_se"]  # per query 1 and 0: sd 0.5, over sqrt(2)
        (0.5, 0.35355339059327373)

    Args:
        scores: Similarity of each query to each document, ``(n_queries, n_docs)``.
        relevant: For each query, the column indices of its relevant documents (non-empty).
        k_values: Cut-offs; each gives ``ndcg@k``, ``mrr@k`` and ``recall@k``.

    Returns:
        The metrics by name, e.g. ``{"ndcg@10": ..., "mrr@10": ..., "recall@1": ...}``, and
        their standard errors under ``search.record.attrs.se_key`` (``"ndcg@10_se"``, ...).
    """
    if scores.dim() != 2 or scores.shape[0] != len(relevant):
        raise ValueError(
            f"scores must be (n_queries, n_docs) with one row per relevant set, but got "
            f"{tuple(scores.shape)} and {len(relevant)} sets."
        )
    if not k_values or any(k < 1 for k in k_values):
        raise ValueError(f"k_values must be positive cut-offs, but got {k_values=}.")
    n_docs = scores.shape[1]
    for q, docs in enumerate(relevant):
        if not docs:
            raise ValueError(f"query {q} has no relevant document; leave it out of the scores.")
        if min(docs) < 0 or max(docs) >= n_docs:
            raise ValueError(f"query {q} names a document outside 0..{n_docs - 1}: {docs}.")
    ranks = _ranks_of_relevant(scores.detach().float().cpu(), relevant)  # (n_q, width)
    n_relevant = torch.tensor([len(r) for r in relevant], dtype=torch.float64)
    first = ranks.min(dim=1).values  # best rank of a relevant document per query
    gains = 1.0 / torch.log2(ranks + 2.0)  # inf ranks (padding) give 0
    metrics: dict[str, float] = {}
    for k in sorted(set(k_values)):
        in_top = ranks < k
        ideal = torch.tensor(
            [sum(1.0 / math.log2(i + 2) for i in range(min(k, len(r)))) for r in relevant],
            dtype=torch.float64,
        )
        dcg = (gains * in_top).sum(dim=1)
        mrr = torch.where(first < k, 1.0 / (first + 1.0), torch.zeros_like(first))
        per_query = {
            f"ndcg@{k}": dcg / ideal,
            f"mrr@{k}": mrr,
            f"recall@{k}": in_top.sum(dim=1) / n_relevant,
        }
        for name, values in per_query.items():
            metrics[name], metrics[se_key(name)] = _mean_and_se(values)
    return metrics


@dataclass(frozen=True)
class EvalTokens:
    """An eval set's scored queries and its corpus tokenised once, reused by every evaluation.

    Args:
        queries: ``tokenize`` output (``input_ids``, ``attention_mask``) of the queries that
            have a relevant document, in the eval set's order.
        corpus: The same for every corpus document, in the eval set's order.
    """

    queries: dict[str, Tensor]
    corpus: dict[str, Tensor]


@dataclass(frozen=True)
class _Ranking:
    """What an eval set ranks: the scored queries, the corpus, and the relevant columns."""

    queries: list[str]  # texts of the queries with a relevant document
    corpus: list[str]  # texts of every document, in column order
    relevant: list[set[int]]  # per scored query, its relevant documents' columns


def _ranking(eval_set: EvalSet) -> _Ranking:
    """The scored queries (those with a relevant document in the corpus) and the columns."""
    doc_ids = list(eval_set.corpus)
    column = {doc_id: i for i, doc_id in enumerate(doc_ids)}
    query_ids: list[str] = []
    relevant: list[set[int]] = []
    for qid in eval_set.queries:
        docs = {
            column[d] for d, rel in eval_set.qrels.get(qid, {}).items() if rel > 0 and d in column
        }
        if docs:
            query_ids.append(qid)
            relevant.append(docs)
    if not relevant:
        raise ValueError("the eval set has no query with a relevant document in its corpus.")
    return _Ranking(
        queries=[eval_set.queries[qid] for qid in query_ids],
        corpus=[eval_set.corpus[d] for d in doc_ids],
        relevant=relevant,
    )


def eval_tokens(encoder: BiEncoder, eval_set: EvalSet, *, max_len: int) -> EvalTokens:
    """Tokenise ``eval_set`` for :func:`evaluate` (``search.train.token_cache`` caches it).

    Args:
        encoder: The bi-encoder whose tokenizer and prefixes are used.
        eval_set: Corpus, queries and qrels.
        max_len: Longest tokenised input.

    Returns:
        The scored queries' and the corpus' token ids and masks.
    """
    ranking = _ranking(eval_set)
    return EvalTokens(
        queries=encoder.tokenize(ranking.queries, kind="query", max_len=max_len),
        corpus=encoder.tokenize(ranking.corpus, kind="passage", max_len=max_len),
    )


@torch.no_grad()
def evaluate(
    encoder: BiEncoder,
    eval_set: EvalSet,
    *,
    max_len: int,
    batch_size: int = 64,
    device: torch.device | None = None,
    tokens: EvalTokens | None = None,
) -> dict[str, float]:
    """Encode the eval set's queries and corpus, rank the corpus by cosine, return the metrics.

    Queries without a relevant document in the corpus are left out, as BEIR and
    sentence-transformers do. The encoder's own device is used (``device`` only moves the
    scores); its train/eval mode is restored afterwards.

    Args:
        encoder: The bi-encoder (its ``encode`` handles prefixes, pooling, normalisation).
        eval_set: Corpus, queries and qrels (relevance > 0 counts as relevant).
        max_len: Longest tokenised input.
        batch_size: Texts encoded at once.
        device: Where the score matrix is computed (default: where the embeddings are).
        tokens: ``eval_tokens(encoder, eval_set, max_len=max_len)``, computed once for many
            evaluations (None: tokenised here). The metrics are the same either way.

    Returns:
        The metrics by name (``ndcg@10``, ``mrr@10``, ``recall@1``, ``recall@5``, ...), with
        their standard errors (``ndcg@10_se``, ...; :func:`retrieval_metrics`).
    """
    ranking = _ranking(eval_set)
    q_tokens = d_tokens = None
    if tokens is not None:
        q_tokens, d_tokens = tokens.queries, tokens.corpus
        if len(q_tokens["input_ids"]) != len(ranking.queries) or len(d_tokens["input_ids"]) != len(
            ranking.corpus
        ):
            raise ValueError("tokens were not made from this eval set (row counts differ).")
    was_training = encoder.training
    encoder.eval()
    try:
        q_emb = encoder.encode(
            ranking.queries,
            kind="query",
            max_len=max_len,
            batch_size=batch_size,
            tokens=q_tokens,
        )
        d_emb = encoder.encode(
            ranking.corpus,
            kind="passage",
            max_len=max_len,
            batch_size=batch_size,
            tokens=d_tokens,
        )
    finally:
        encoder.train(was_training)
    if device is not None:
        q_emb, d_emb = q_emb.to(device), d_emb.to(device)
    # Cosine, as the loss and sentence-transformers' evaluator score (dot if already unit norm).
    q_emb = F.normalize(q_emb.float(), dim=-1)  # (n_queries, dim)
    d_emb = F.normalize(d_emb.float(), dim=-1)  # (n_docs, dim)
    scores = q_emb @ d_emb.T  # (n_queries, n_docs)
    return retrieval_metrics(scores, ranking.relevant)
