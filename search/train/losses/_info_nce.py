"""InfoNCE with in-batch negatives and optional hard negatives (the bi-encoder's objective)."""

from __future__ import annotations

from typing import Any
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch import nn

Similarity = Literal["cos", "dot"]


class InfoNCELoss(nn.Module):
    """Contrastive loss of a query against its positive, every other positive and hard negatives.

    For a batch of ``(query_i, positive_i, negatives_i)`` the candidates of every query are all
    positives of the batch followed by all hard negatives of the batch; the score matrix
    ``sim(q, candidates) / temperature`` of shape ``(batch, batch * (1 + n_neg))`` goes through a
    cross-entropy whose target for row ``i`` is column ``i`` (the query's own positive). Scores
    are computed in float32 even under autocast: dividing bf16 similarities by a small
    temperature would throw away most of their precision.

    Args:
        temperature: Divides the similarities before the softmax (``scale = 1 / temperature``
            in sentence-transformers' terms); smaller values sharpen the distribution.
        similarity: ``"cos"`` (cosine: embeddings are L2-normalised first) or ``"dot"``.

    References:
        - van den Oord et al. 2018, Representation Learning with Contrastive Predictive
          Coding (InfoNCE): https://arxiv.org/abs/1807.03748
        - Henderson et al. 2017, Efficient Natural Language Response Suggestion for Smart Reply
          (in-batch negatives; sentence-transformers' MultipleNegativesRankingLoss):
          https://arxiv.org/abs/1705.00652
        - Karpukhin et al. 2020, Dense Passage Retrieval for Open-Domain Question Answering
          (in-batch plus hard negatives): https://arxiv.org/abs/2004.04906

    Requirements:
        1. (query, positive) pairs, optionally with the same number ``n_neg`` of hard negatives
           per query.
        2. Batches of more than one pair: the other pairs' positives are the negatives.

    Inputs:
        +-----------------------------------------------+-------------------------------------+
        | Inputs                                        | Shapes                              |
        +===============================================+=====================================+
        | (query, positive) embeddings                  | ``(batch, dim)``, ``(batch, dim)``  |
        +-----------------------------------------------+-------------------------------------+
        | (query, positive, negatives) embeddings       | ... and ``(batch * n_neg, dim)``    |
        +-----------------------------------------------+-------------------------------------+

    Relations:
        - sentence-transformers' ``MultipleNegativesRankingLoss`` with ``scale=1/temperature``
          and ``directions=("query_to_doc",)`` computes the same value; this class takes
          embeddings rather than a model so the training loop owns the encoder.

    Example:
        >>> import torch
        >>> loss = InfoNCELoss(temperature=0.05)
        >>> q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> p = torch.tensor([[0.8, 0.6], [0.6, 0.8]])  # cosine 0.8 to its query, 0.6 to the other
        >>> round(loss(q, p).item(), 4)  # log(1 + exp(-0.2 / 0.05))
        0.0181
        >>> n = p.flip(0)  # each query's hard negative is as close as its positive
        >>> round(loss(q, p, n).item(), 4)  # log(2 + 2 * exp(-0.2 / 0.05))
        0.7113
        >>> loss.get_config_dict()
        {'temperature': 0.05, 'similarity': 'cos'}
    """

    def __init__(self, temperature: float = 0.05, *, similarity: Similarity = "cos") -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, but got {temperature=}.")
        if similarity not in ("cos", "dot"):
            raise ValueError(f"similarity must be 'cos' or 'dot', but got {similarity=}.")
        self._temperature = float(temperature)
        self._similarity: Similarity = similarity

    @property
    def temperature(self) -> float:
        """The softmax temperature."""
        return self._temperature

    def forward(
        self, query_emb: Tensor, positive_emb: Tensor, negative_emb: Tensor | None = None
    ) -> Tensor:
        """Mean InfoNCE loss of the batch (see ``compute_loss_from_embeddings``)."""
        return self.compute_loss_from_embeddings(query_emb, positive_emb, negative_emb)

    def compute_loss_from_embeddings(
        self, query_emb: Tensor, positive_emb: Tensor, negative_emb: Tensor | None = None
    ) -> Tensor:
        """Mean InfoNCE loss of a batch of embeddings.

        Args:
            query_emb: Query embeddings, ``(batch, dim)``.
            positive_emb: Embedding of each query's positive, ``(batch, dim)``.
            negative_emb: Hard negatives of the batch, ``(batch * n_neg, dim)``, or None.

        Returns:
            A scalar float32 tensor.
        """
        if query_emb.dim() != 2 or query_emb.shape != positive_emb.shape:
            raise ValueError(
                "query_emb and positive_emb must both be (batch, dim), but got "
                f"{tuple(query_emb.shape)} and {tuple(positive_emb.shape)}."
            )
        candidates = positive_emb  # (batch, dim)
        if negative_emb is not None and negative_emb.numel() > 0:
            if negative_emb.dim() != 2 or negative_emb.shape[1] != query_emb.shape[1]:
                raise ValueError(
                    f"negative_emb must be (batch * n_neg, {query_emb.shape[1]}), but got "
                    f"{tuple(negative_emb.shape)}."
                )
            candidates = torch.cat([positive_emb, negative_emb])  # (batch * (1 + n_neg), dim)
        queries = query_emb.float()  # (batch, dim)
        candidates = candidates.float()
        if self._similarity == "cos":
            queries = F.normalize(queries, dim=-1)
            candidates = F.normalize(candidates, dim=-1)
        scores = queries @ candidates.T / self._temperature  # (batch, batch * (1 + n_neg))
        target = torch.arange(scores.shape[0], device=scores.device)  # own positive: column i
        return F.cross_entropy(scores, target)

    def get_config_dict(self) -> dict[str, Any]:
        """The loss settings, for the trial's record."""
        return {"temperature": self._temperature, "similarity": self._similarity}
