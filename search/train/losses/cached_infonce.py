"""InfoNCE with a gradient cache: a large contrastive batch in the memory of a mini-batch."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from contextlib import AbstractContextManager
from contextlib import nullcontext
from types import TracebackType
from typing import Any

import torch
from torch import Tensor
from torch import nn
from torch.utils.checkpoint import get_device_states
from torch.utils.checkpoint import set_device_states

from search.train.losses._info_nce import InfoNCELoss
from search.train.losses._info_nce import Similarity

__all__ = ["CachedInfoNCELoss", "RandContext", "mini_batches"]

Encoder = Callable[[Tensor, Tensor], Tensor]  # (input_ids, attention_mask) -> (rows, dim)
Tokens = tuple[Tensor, Tensor]  # (input_ids, attention_mask), each (rows, width)


class RandContext:
    """Replays the random state of the moment it was created (sentence-transformers' RandContext).

    Created before a mini-batch is embedded without gradients and entered when it is embedded
    again with them, so dropout draws the same masks in both passes. The CPU generator and the
    CUDA generators of the devices of ``tensors`` are restored inside a ``fork_rng``: on exit the
    global random state is what it was on entry.
    """

    def __init__(self, *tensors: Tensor) -> None:
        self._cpu_state = torch.get_rng_state()
        self._devices, self._device_states = get_device_states(*tensors)
        self._fork: AbstractContextManager[Any] | None = None

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=self._devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self._cpu_state)
        set_device_states(self._devices, self._device_states)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._fork is not None
        self._fork.__exit__(exc_type, exc, traceback)
        self._fork = None


def mini_batches(tokens: Tokens, size: int) -> Iterator[Tokens]:
    """Consecutive rows of ``tokens`` by ``size``, each cut to its longest row (right padding)."""
    ids, mask = tokens
    for start in range(0, ids.shape[0], size):
        part_mask = mask[start : start + size]
        width = max(int(part_mask.sum(dim=1).max()), 1)
        yield ids[start : start + size, :width], part_mask[:, :width]


class CachedInfoNCELoss(nn.Module):
    """InfoNCE over a large batch, embedded in mini-batches: GradCache (Gao et al. 2021).

    The memory of a contrastive step grows with the batch because every text's activations
    are kept for the backward pass. The gradient cache splits the step in three:

    1. embed the queries and the passages in mini-batches of ``mini_batch_size`` rows without
       gradients, recording the random state before each mini-batch;
    2. compute the loss on the whole batch of embeddings and its gradient with respect to each
       embedding (the "cache": ``rows x dim`` floats);
    3. when the caller back-propagates the returned loss, embed each mini-batch again with
       gradients, under its recorded random state (the same dropout masks), and back-propagate
       the cached embedding gradients through it.

    The loss and the parameter gradients are those of the plain step over the same embeddings
    (exactly, up to float rounding, when dropout draws the same masks; with one mini-batch per
    pass they are the plain step's). Peak memory is one mini-batch's activations plus the
    embeddings and their gradients; the price is a second forward pass.

    The returned loss is a detached leaf whose gradient hook runs step 3, so the caller's
    ``scaler.scale(loss).backward()`` works unchanged (the hook receives the loss scale).

    Args:
        encoder: ``encoder(input_ids, attention_mask) -> (rows, dim)`` embeddings: the model.
        temperature: InfoNCE temperature (see :class:`InfoNCELoss`).
        mini_batch_size: Rows embedded at once, for queries and passages alike.
        similarity: ``"cos"`` or ``"dot"``.
        autocast: Context of every encoder call, entered in both passes (the second pass runs
            inside the caller's backward, outside its autocast).

    References:
        - Gao et al. 2021, Scaling Deep Contrastive Learning Batch Size under Memory Limited
          Setup (GradCache): https://arxiv.org/abs/2101.06983
        - sentence-transformers' ``CachedMultipleNegativesRankingLoss`` (the same algorithm
          and random-state handling over ``MultipleNegativesRankingLoss``).

    Requirements:
        1. (query, positive) pairs, optionally with the same number of hard negatives each.
        2. An encoder whose output for a row does not depend on the other rows of its
           mini-batch (no batch norm), as for any transformers encoder.

    Inputs:
        +-----------------------------------------------+-------------------------------------+
        | Inputs                                        | Shapes                              |
        +===============================================+=====================================+
        | query tokens (ids, mask)                      | ``(batch, seq_q)`` each             |
        +-----------------------------------------------+-------------------------------------+
        | passage tokens: positives, then negatives     | ``(batch * (1 + n_neg), seq_p)``    |
        +-----------------------------------------------+-------------------------------------+

    Relations:
        - :class:`InfoNCELoss` is the same loss on embeddings the caller computed with
          gradients (all activations of the batch in memory at once).

    Example:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> table = torch.nn.Embedding(10, 4)
        >>> encoder = lambda ids, mask: table(ids).mean(dim=1)
        >>> q = (torch.tensor([[1, 2], [3, 4], [5, 6]]), torch.ones(3, 2, dtype=torch.long))
        >>> p = (torch.tensor([[2, 1], [4, 3], [6, 5]]), torch.ones(3, 2, dtype=torch.long))
        >>> loss = CachedInfoNCELoss(encoder, 0.05, mini_batch_size=2)(q, p)
        >>> loss.backward()  # re-embeds each mini-batch and fills table.weight.grad
        >>> plain = InfoNCELoss(0.05)(encoder(*q), encoder(*p))
        >>> bool(torch.allclose(loss, plain))
        True
    """

    def __init__(
        self,
        encoder: Encoder,
        temperature: float = 0.05,
        *,
        mini_batch_size: int,
        similarity: Similarity = "cos",
        autocast: Callable[[], AbstractContextManager[object]] = nullcontext,
    ) -> None:
        super().__init__()
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be positive, but got {mini_batch_size=}.")
        self._encoder = encoder
        self._loss = InfoNCELoss(temperature, similarity=similarity)
        self._mini_batch_size = int(mini_batch_size)
        self._autocast = autocast

    @property
    def mini_batch_size(self) -> int:
        """Rows embedded at once."""
        return self._mini_batch_size

    def forward(self, queries: Tokens, passages: Tokens) -> Tensor:
        """The batch's mean InfoNCE loss; its ``backward()`` fills the encoder's gradients.

        Args:
            queries: ``(input_ids, attention_mask)`` of the ``batch`` queries.
            passages: The same for the ``batch`` positives followed by the hard negatives.

        Returns:
            A scalar float32 tensor. Under ``torch.no_grad`` it is a plain value (nothing is
            cached).
        """
        n = queries[0].shape[0]
        if passages[0].shape[0] < n:
            raise ValueError(
                f"passages must hold a positive for each of the {n} queries, but got "
                f"{passages[0].shape[0]} rows."
            )
        q_emb, q_states = self._embed_without_grad(queries)  # (batch, dim)
        p_emb, p_states = self._embed_without_grad(passages)  # (batch * (1 + n_neg), dim)
        if not torch.is_grad_enabled():
            return self._loss(q_emb, p_emb[:n], p_emb[n:])
        q_emb.requires_grad_()
        p_emb.requires_grad_()
        with torch.enable_grad():
            loss = self._loss(q_emb, p_emb[:n], p_emb[n:])
            loss.backward()  # the cache: d loss / d embedding, on the whole batch
        cache = [(queries, q_states, q_emb.grad), (passages, p_states, p_emb.grad)]
        loss = loss.detach().requires_grad_()
        loss.register_hook(lambda grad_output: self._backward(grad_output, cache))
        return loss

    def get_config_dict(self) -> dict[str, Any]:
        """The loss settings, for the trial's record."""
        return {**self._loss.get_config_dict(), "mini_batch_size": self._mini_batch_size}

    def _embed_without_grad(self, tokens: Tokens) -> tuple[Tensor, list[RandContext]]:
        """Embeddings of all rows (no graph) and the random state before each mini-batch."""
        parts: list[Tensor] = []
        states: list[RandContext] = []
        with torch.no_grad():
            for ids, mask in mini_batches(tokens, self._mini_batch_size):
                states.append(RandContext(ids))
                with self._autocast():
                    parts.append(self._encoder(ids, mask).float())  # (rows, dim)
        return torch.cat(parts), states

    def _backward(
        self, grad_output: Tensor, cache: list[tuple[Tokens, list[RandContext], Tensor | None]]
    ) -> None:
        """Re-embed each mini-batch with gradients and back-propagate its cached gradient."""
        with torch.enable_grad():
            for tokens, states, grads in cache:
                assert grads is not None
                start = 0
                for (ids, mask), state in zip(
                    mini_batches(tokens, self._mini_batch_size), states, strict=True
                ):
                    with state, self._autocast():
                        emb = self._encoder(ids, mask).float()  # (rows, dim)
                    part = grads[start : start + emb.shape[0]]
                    start += emb.shape[0]
                    # d/dθ <emb, g>: the chain rule with the cached d loss / d emb.
                    (torch.sum(emb * part) * grad_output).backward()
