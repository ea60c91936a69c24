"""Prune sooner: score a fixed sample of the eval set between epochs, on the examples axis.

Every intermediate value of a study sits on one step axis, training examples seen, so that a
pruner compares trials of different batch sizes at the same amount of training. The axis is
nominal: the end of epoch ``e`` is ``e x n`` (``n`` training examples, whatever the batch
size drops at the end of an epoch), and the sooner evaluations sit on the multiples of
``eval_every`` strictly inside an epoch (a step that crosses one reports that multiple).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from search.train.data import EvalSet

SAMPLE_SEED = 0  # the same eval sample for every trial of every study
OTHER_DOCS_PER_QUERY = 20  # non-relevant corpus documents kept per sampled query


def eval_sample(eval_set: EvalSet, n_queries: int) -> EvalSet:
    """A fixed sample of ``eval_set``: ``n_queries`` queries, their relevant documents, and
    ``OTHER_DOCS_PER_QUERY`` other documents per query (the whole set when it is as small).

    The sample depends only on the eval set, never on the trial, so every trial's sooner
    scores are comparable.
    """
    qids = sorted(eval_set.queries)
    if len(qids) <= n_queries and len(eval_set.corpus) <= n_queries * (OTHER_DOCS_PER_QUERY + 1):
        return eval_set
    rng = random.Random(SAMPLE_SEED)
    picked = sorted(rng.sample(qids, min(n_queries, len(qids))))
    relevant = {d for q in picked for d in eval_set.qrels.get(q, {})}
    others = sorted(d for d in eval_set.corpus if d not in relevant)
    extra = rng.sample(others, min(len(others), n_queries * OTHER_DOCS_PER_QUERY))
    keep = relevant | set(extra)
    return EvalSet(
        corpus={d: t for d, t in eval_set.corpus.items() if d in keep},
        queries={q: eval_set.queries[q] for q in picked},
        qrels={q: eval_set.qrels[q] for q in picked if q in eval_set.qrels},
    )


@dataclass
class ExamplesAxis:
    """Where a run stands on the examples axis, and when its next sooner evaluation is due.

    Args:
        n_examples: Training examples in one epoch (the nominal epoch length).
        every: Examples between sooner evaluations; None: none (per-epoch reports only).
    """

    n_examples: int
    every: int | None = None
    _next: int = 0

    def __post_init__(self) -> None:
        self._next = self.every or 0

    def epoch_end(self, epoch: int) -> int:
        """The step of epoch ``epoch``'s (1-based) full evaluation: ``epoch x n_examples``."""
        end = epoch * self.n_examples
        if self.every:
            self._next = max(self._next, (end // self.every + 1) * self.every)
        return end

    def due(self, epoch: int, seen_in_epoch: int) -> int | None:
        """The step to report at after a training step, or None when nothing is due.

        Args:
            epoch: The current epoch (1-based).
            seen_in_epoch: Training examples seen so far in this epoch.
        """
        if not self.every:
            return None
        end = epoch * self.n_examples
        now = (epoch - 1) * self.n_examples + seen_in_epoch
        if now < self._next or self._next >= end:
            return None
        point = (min(now, end - 1) // self.every) * self.every
        self._next = point + self.every
        return point
