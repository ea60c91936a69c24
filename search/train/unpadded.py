"""Padding-free forward pass of BERT-family encoders: token-wise layers on real tokens only.

A batch right-padded to its longest row wastes the padded positions' share of every token-wise
layer (embeddings, QKV, attention output, FFN, LayerNorms, dropout). Here the real tokens of
one or more batches are packed into one ``(n_tokens, hidden)`` tensor; only attention, which
mixes tokens of a row, sees rows again: sorted by length and re-padded per block of a few
rows (so that attention's padding follows the rows' lengths too) for PyTorch's
``scaled_dot_product_attention`` with a key padding mask, or, on CUDA without attention
dropout, packed as they are for ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention's
variable-length kernel). The same idea as "Packing with FlashAttention" (Kundu et al. 2024)
and FlashAttention-2's ``unpad_input``, on the weights of a transformers ``BertModel``,
``RobertaModel`` or ``XLMRobertaModel``: no new parameters, the same state dict.

On a CPU the packed token count is rounded up to one of 16 sizes per octave (from 128 tokens
at most 6.25% more rows, ~3% on average; no row attends to the extra rows and no pooling reads
them): oneDNN builds and JIT-compiles a bf16 matmul kernel for every new shape (~15 ms each
with AMX), and a token count new at every step rebuilt a dozen kernels a step (the forward and
both gradients of each of the four weight shapes).

Dropout keeps its probabilities and places (embeddings, attention probabilities, the two
residual branches); on a CPU its masks come from 16-bit quarters of 64-bit random integers
(``MASK_BITS``; cheaper than ``bernoulli_``, by how much depends on the CPU: ``_keep``), so the
random streams differ from transformers'. With
gradient checkpointing on, each layer is recomputed in the backward pass (non-reentrant,
replaying the same dropout masks).

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=50)).eval()
    >>> ids = torch.tensor([[2, 5, 7, 3], [2, 9, 3, 0]])
    >>> mask = (ids != 0).long()
    >>> packed = pack([(ids, mask)])
    >>> hidden = packed_forward(model, packed)  # (7, 32): the 7 real tokens
    >>> full = model(input_ids=ids, attention_mask=mask).last_hidden_state
    >>> bool(torch.allclose(hidden, full[mask.bool()], atol=1e-5))
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "ATTENTION_BLOCK_ROWS",
    "MASK_BITS",
    "SUPPORTED_MODEL_TYPES",
    "VARLEN_ERRORS",
    "Packed",
    "bucketed",
    "dropout",
    "pack",
    "packed_forward",
    "pool",
    "supports",
]

# Model types whose transformers module tree this forward reproduces (BertModel's layout).
SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")  # positions start after padding id


def supports(model: Any) -> bool:
    """Whether ``model`` is an encoder this forward reproduces exactly.

    BERT, RoBERTa, XLM-R (and CamemBERT) encoders with absolute positions, bidirectional
    self-attention only (no decoder, no cross-attention) and the module names of transformers'
    ``BertModel``; anything else runs transformers' own forward.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return False
    if getattr(config, "position_embedding_type", "absolute") not in (None, "absolute"):
        return False
    embeddings = getattr(model, "embeddings", None)
    encoder = getattr(model, "encoder", None)
    if embeddings is None or encoder is None or not hasattr(encoder, "layer"):
        return False
    needed = ("word_embeddings", "position_embeddings", "LayerNorm", "dropout")
    if not all(hasattr(embeddings, name) for name in needed):
        return False
    for layer in encoder.layer:
        attention = getattr(layer, "attention", None)
        if attention is None or not hasattr(attention, "self") or not hasattr(layer, "output"):
            return False
        if getattr(layer, "crossattention", None) is not None:
            return False
    return True


@dataclass(frozen=True)
class Packed:
    """The real tokens of one or more padded batches, concatenated batch after batch.

    Within a batch the rows are sorted longest first and cut into attention blocks of
    ``block_rows`` rows, each re-padded only to its own longest row: attention's padded work
    (``rows x width^2``) follows the rows' lengths instead of the batch's longest.

    Args:
        input_ids: ``(n_tokens + padding,)`` token ids.
        positions: ``(n_tokens + padding,)`` each token's column in its padded row (BERT's
            position).
        ranks: ``(n_tokens + padding,)`` each token's place among its row's real tokens
            (RoBERTa counts positions so: the same as ``positions`` when padded on the right).
        row_of_token: ``(n_tokens,)`` each real token's row (in packed row order, over all
            batches).
        cu_seqlens: ``(n_rows + 1,)`` int32 row offsets into the tokens (FlashAttention's).
        lengths: ``(n_rows,)`` tokens per row, in packed row order.
        blocks: Per attention block ``(rows, width, tokens)``; the blocks tile the tokens in
            order.
        block_index: Per block ``(tokens,)``: each token's place in the block's
            ``rows * width`` padded layout.
        block_keys: Per block its ``(rows, width)`` boolean key mask.
        batches: Per batch ``(first row, rows)`` in packed row order.
        unsort: Per batch ``(rows,)``: the packed row of each of the batch's input rows.
        max_len: The longest row's length.
        padding: Rows after the real tokens that round their count up to a size the matmul
            kernels have seen (:func:`bucketed`), or up to every row at its batch's full width
            (``pack(..., full_width=True)``); they belong to no row.
    """

    input_ids: Tensor
    positions: Tensor
    ranks: Tensor
    row_of_token: Tensor
    cu_seqlens: Tensor
    lengths: Tensor
    blocks: tuple[tuple[int, int, int], ...]
    block_index: tuple[Tensor, ...]
    block_keys: tuple[Tensor, ...]
    batches: tuple[tuple[int, int], ...]
    unsort: tuple[Tensor, ...]
    max_len: int
    padding: int = 0

    @property
    def n_tokens(self) -> int:
        """Real tokens in all batches."""
        return int(self.input_ids.shape[0]) - self.padding


# Token counts a CPU rounds up to, per octave (a power of two; 0: none): <= 1/16 more rows.
BUCKETS_PER_OCTAVE = 16


def bucketed(n: int) -> int:
    """``n`` rounded up to one of ``BUCKETS_PER_OCTAVE`` sizes between each power of two.

    Multiples of 8 below 128 tokens; ``n`` itself when ``BUCKETS_PER_OCTAVE`` is 0.

    Example:
        >>> [bucketed(n) for n in (5, 100, 1500, 3000, 6144)]
        [8, 104, 1536, 3072, 6144]
    """
    if BUCKETS_PER_OCTAVE == 0:
        return n
    octave = n.bit_length() - 1  # n is in [2**octave, 2**(octave + 1))
    step = max(8, 1 << max(0, octave - (BUCKETS_PER_OCTAVE.bit_length() - 1)))
    return -(-n // step) * step


ATTENTION_BLOCK_ROWS = 8  # rows per attention block on a CPU (sorted by length, padded per block)
# Bits of each dropout mask draw on a CPU (16 or 32): p is kept to within 2**-MASK_BITS.
MASK_BITS = 16
_MASK_DTYPES = {16: torch.int16, 32: torch.int32}
VARLEN_ERRORS: list[str] = []  # why varlen_attn failed in this process (then SDPA runs instead)


def pack(
    batches: Sequence[tuple[Tensor, Tensor]],
    *,
    block_rows: int | None = None,
    bucket: bool | None = None,
    full_width: bool = False,
) -> Packed:
    """Pack padded ``(input_ids, attention_mask)`` batches into their real tokens.

    Args:
        batches: ``(input_ids, attention_mask)`` pairs, ``(rows, width)`` each, a row's real
            tokens contiguous (padded on the right, or on the left); widths may differ.
        block_rows: Rows per attention block (default: ``ATTENTION_BLOCK_ROWS`` on a CPU; on
            CUDA a whole batch, where one kernel launch beats several small ones).
        bucket: Round the token count up with :func:`bucketed` (default: on a CPU, where a new
            matmul shape costs a kernel build; CUDA's libraries pick kernels without one).
        full_width: Cost every row at its batch's full width, for the same result: attention
            blocks as wide as the batch, and padding tokens up to ``rows x width`` a batch,
            which go through every layer but attention and pooling. The most memory a
            padding-free step of this shape can take (the fail-fast step), not its padding.

    Returns:
        The packed tokens, on the batches' device.
    """
    ids_parts, pos_parts, rank_parts, row_parts, length_parts, unsort = [], [], [], [], [], []
    blocks, block_index, block_keys, spans = [], [], [], []
    tokens = rows_before = 0
    for input_ids, attention_mask in batches:
        rows, width = input_ids.shape
        block = block_rows or (rows if input_ids.is_cuda else ATTENTION_BLOCK_ROWS)
        lengths = attention_mask.sum(dim=1)  # (rows,)
        order = torch.argsort(lengths, descending=True, stable=True)  # longest row first
        mask = attention_mask[order]  # (rows, width)
        flat = mask.reshape(-1).nonzero().squeeze(1)  # (n,) real tokens, in sorted row order
        rank = (mask.long().cumsum(dim=1) - 1).reshape(-1)[flat]  # (n,)
        row = flat // width  # (n,) sorted row of each token
        ids_parts.append(input_ids[order].reshape(-1)[flat])
        pos_parts.append(flat % width)
        rank_parts.append(rank)
        row_parts.append(row + rows_before)
        sorted_lengths = lengths[order]
        length_parts.append(sorted_lengths)
        unsort.append(torch.argsort(order) + rows_before)
        spans.append((rows_before, rows))
        host_lengths = sorted_lengths.tolist()
        offset = 0  # tokens of this batch in the blocks before
        for first in range(0, rows, block):
            count = min(block, rows - first)
            # Its longest row (sorted), or the batch's width: the widest a block can be.
            block_width = width if full_width else max(int(host_lengths[first]), 1)
            n = int(sum(host_lengths[first : first + count]))
            here = slice(offset, offset + n)
            block_index.append((row[here] - first) * block_width + rank[here])
            places = torch.arange(block_width, device=mask.device)
            block_keys.append(places < sorted_lengths[first : first + count, None])
            blocks.append((count, block_width, n))
            offset += n
        tokens += offset
        rows_before += rows
    lengths = torch.cat(length_parts)
    cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    on_cpu = not batches or not batches[0][0].is_cuda
    if full_width:  # every row at full width: already a shape a trial's kernels will see
        padding = sum(int(ids.numel()) for ids, _ in batches) - tokens
    else:
        padding = bucketed(tokens) - tokens if (on_cpu if bucket is None else bucket) else 0
    if padding:
        extra = ids_parts[-1].new_zeros(padding)  # token id 0 at position 0: any valid row
        for parts in (ids_parts, pos_parts, rank_parts):
            parts.append(extra)
    return Packed(
        input_ids=torch.cat(ids_parts),
        positions=torch.cat(pos_parts),
        ranks=torch.cat(rank_parts),
        row_of_token=torch.cat(row_parts),
        cu_seqlens=cu_seqlens,
        lengths=lengths,
        blocks=tuple(blocks),
        block_index=tuple(block_index),
        block_keys=tuple(block_keys),
        batches=tuple(spans),
        unsort=tuple(unsort),
        max_len=int(lengths.max()) if len(lengths) else 0,
        padding=padding,
    )


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout (``F.dropout``'s semantics) with a cheaper mask on a CPU.

    Each element is zeroed with probability ``p`` and the rest scaled by ``1 / (1 - p)``.
    """
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    return _MaskedScale.apply(x, _keep(x.shape, p, x.device), 1.0 / (1.0 - p))


class _MaskedScale(torch.autograd.Function):
    """``x * keep * scale`` whose backward is ``grad * keep * scale``, saving the bool mask only.

    The mask enters as its bytes (a uint8 view, converted to ``x``'s dtype): on a CPU the ops
    that read a bool tensor (``where``, ``masked_fill``, a bool ``to`` or ``mul``) run 4-7x slower
    than a multiply of the same size, while a uint8 conversion runs at the multiply's speed.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return (x * keep.view(torch.uint8).to(x.dtype)).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return (grad * keep.view(torch.uint8).to(grad.dtype)).mul_(ctx.scale), None, None


def _keep(shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """A boolean mask, each element True with probability ``1 - p`` (to within ``2**-MASK_BITS``).

    On a CPU each 64-bit draw of the generator is cut into ``64 // MASK_BITS`` uniform integers:
    at 16 bits a dropout's forward and backward costs 0.8x of 32-bit halves on an AMX CPU
    (``bench/bench_dropout_masks.py``), which cost 0.9x of ``bernoulli_`` there and 0.4x on an
    AVX512-BF16 CPU without AMX (BENCHMARKS.md, "Steps per token"). Elsewhere ``torch.rand``.
    """
    if device.type != "cpu":
        return torch.rand(shape, device=device) >= p
    threshold = round(p * 2**MASK_BITS) - 2 ** (MASK_BITS - 1)
    if threshold >= 2 ** (MASK_BITS - 1):  # p rounds to 1 at this resolution: nothing kept
        return torch.zeros(shape, dtype=torch.bool)
    n = math.prod(shape)
    per_draw = 64 // MASK_BITS
    bits = torch.empty((-(-n // per_draw),), dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    return bits.view(_MASK_DTYPES[MASK_BITS])[:n].view(shape) >= threshold


def _embed(model: Any, packed: Packed) -> Tensor:
    """Word + position (+ token type 0) embeddings, LayerNorm, dropout: ``(n_tokens, hidden)``."""
    emb = model.embeddings
    positions = packed.positions
    if model.config.model_type in _OFFSET_POSITIONS:
        positions = packed.ranks + (int(emb.padding_idx) + 1)  # RoBERTa counts from padding + 1
    hidden = emb.word_embeddings(packed.input_ids)
    token_type = getattr(emb, "token_type_embeddings", None)
    if token_type is not None:
        hidden = hidden + token_type.weight[0]  # every token has type 0, as the HF default
    hidden = hidden + emb.position_embeddings(positions)
    hidden = emb.LayerNorm(hidden)
    return dropout(hidden, emb.dropout.p, emb.training)


def _attention(
    qkv: Tensor, packed: Packed, heads: int, p: float, training: bool, scale: float
) -> Tensor:
    """Bidirectional attention of each row's tokens over its own tokens.

    Args:
        qkv: ``(n_tokens, 3, heads, head_dim)`` queries, keys and values.
        packed: Where the tokens' rows are.
        heads: Attention heads.
        p: Attention-probability dropout (applied in training only).
        training: Whether dropout is on.
        scale: Score scale (``head_dim ** -0.5``).

    Returns:
        ``(n_tokens + padding, heads * head_dim)`` attention outputs (zeros on the padding).
    """
    out = _real_attention(qkv[: packed.n_tokens], packed, heads, p, training, scale)
    if packed.padding:
        out = torch.cat([out, out.new_zeros(packed.padding, out.shape[1])])
    return out


def _real_attention(
    qkv: Tensor, packed: Packed, heads: int, p: float, training: bool, scale: float
) -> Tensor:
    """:func:`_attention` on the real tokens: ``(n_tokens, heads * head_dim)``."""
    n, _, _, head_dim = qkv.shape
    drop = p if training else 0.0
    if drop == 0.0 and _varlen_runs(qkv):
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = qkv.unbind(1)  # (n_tokens, heads, head_dim) each
        try:
            out = varlen_attn(
                q,
                k,
                v,
                packed.cu_seqlens,
                packed.cu_seqlens,
                packed.max_len,
                packed.max_len,
                scale=scale,
            )
        except RuntimeError as exc:  # a kernel this build or device lacks: SDPA from now on
            first_line = (str(exc).splitlines() or [""])[0][:200]
            VARLEN_ERRORS.append(f"{type(exc).__name__}: {first_line}")
            warnings.warn(f"varlen_attn failed, SDPA instead: {VARLEN_ERRORS[-1]}", stacklevel=2)
        else:
            assert isinstance(out, Tensor)  # no auxiliary outputs were asked for
            return out.reshape(n, heads * head_dim)
    outs = []
    # The blocks tile the tokens in order. split's backward is one cat of the blocks' gradients;
    # a slice per block would add a zero-filled gradient of the whole qkv per block.
    parts = qkv.split([count for _, _, count in packed.blocks])
    for (rows, width, count), flat, keys, part in zip(
        packed.blocks, packed.block_index, packed.block_keys, parts, strict=True
    ):
        part = part.reshape(count, 3 * heads * head_dim)
        padded = part.new_zeros(rows * width, part.shape[1]).index_copy(0, flat, part)
        padded = padded.view(rows, width, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = padded.unbind(0)  # (rows, heads, width, head_dim) each
        if drop > 0.0 and not qkv.is_cuda:
            # The math path: PyTorch's CPU kernels drop attention probabilities no faster. The
            # key mask is an additive bias, scaled scores and bias in one baddbmm: no bool
            # read of the scores (slow on these CPUs) and no pass to scale the queries.
            scores = _masked_scores(q, k, keys, scale)  # (rows, heads, width, width)
            probs = dropout(scores.softmax(dim=-1), drop, True)
            out = torch.matmul(probs.to(v.dtype), v)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keys[:, None, None, :], dropout_p=drop, scale=scale
            )  # (rows, heads, width, head_dim)
        out = out.permute(0, 2, 1, 3).reshape(rows * width, heads * head_dim)
        outs.append(out[flat])
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _masked_scores(q: Tensor, k: Tensor, keys: Tensor, scale: float) -> Tensor:
    """``scale * q @ k^T`` with the padded keys at the dtype's lowest value.

    Args:
        q: ``(rows, heads, width, head_dim)`` queries (``k``: keys, the same shape).
        keys: ``(rows, width)`` boolean key mask.
        scale: Score scale.

    Returns:
        ``(rows, heads, width, width)`` scores.
    """
    rows, heads, width, head_dim = q.shape
    bias = torch.zeros(keys.shape, dtype=q.dtype, device=q.device)
    bias = bias.masked_fill_(~keys, torch.finfo(q.dtype).min)  # (rows, width): small
    bias = bias[:, None, None, :].expand(rows, heads, 1, width).reshape(rows * heads, 1, width)
    q3 = q.reshape(rows * heads, width, head_dim)
    k3 = k.reshape(rows * heads, width, head_dim)
    scores = torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha=scale)
    return scores.view(rows, heads, width, width)


def _varlen_runs(qkv: Tensor) -> bool:
    """Whether FlashAttention's varlen kernel takes ``qkv``: CUDA, fp16/bf16, Ampere or newer."""
    if VARLEN_ERRORS or not qkv.is_cuda or qkv.dtype not in (torch.float16, torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(qkv.device) < (8, 0):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _layer(layer: Any, hidden: Tensor, packed: Packed) -> Tensor:
    """One transformer layer (BertLayer's arithmetic) on packed tokens."""
    self_attn = layer.attention.self
    heads = int(self_attn.num_attention_heads)
    head_dim = int(self_attn.attention_head_size)
    weight = torch.cat([self_attn.query.weight, self_attn.key.weight, self_attn.value.weight])
    bias = torch.cat([self_attn.query.bias, self_attn.key.bias, self_attn.value.bias])
    qkv = F.linear(hidden, weight, bias).view(-1, 3, heads, head_dim)
    scale = float(getattr(self_attn, "scaling", head_dim**-0.5))
    context = _attention(qkv, packed, heads, self_attn.dropout.p, self_attn.training, scale)
    out = layer.attention.output
    attended = out.LayerNorm(dropout(out.dense(context), out.dropout.p, out.training) + hidden)
    inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(attended))
    ffn = layer.output
    return ffn.LayerNorm(dropout(ffn.dense(inner), ffn.dropout.p, ffn.training) + attended)


def packed_forward(model: Any, packed: Packed) -> Tensor:
    """The last hidden state of the packed tokens: ``(n_tokens, hidden)``.

    Args:
        model: A model ``supports`` accepts; its train/eval mode decides dropout, and its
            layers' ``gradient_checkpointing`` flag (transformers' checkpointing switch)
            whether each layer is recomputed in the backward pass.
        packed: From :func:`pack`.
    """
    hidden = _embed(model, packed)
    for layer in model.encoder.layer:
        if getattr(layer, "gradient_checkpointing", False) and layer.training:
            if torch.is_grad_enabled():
                hidden = checkpoint(_layer, layer, hidden, packed, use_reentrant=False)
                continue
        hidden = _layer(layer, hidden, packed)
    return hidden[: packed.n_tokens] if packed.padding else hidden


def pool(hidden: Tensor, packed: Packed, pooling: str) -> list[Tensor]:
    """Pool packed hidden states per row, in float32, one ``(rows, hidden)`` tensor per batch.

    Args:
        hidden: ``(n_tokens, hidden)`` from :func:`packed_forward`.
        packed: The same packing.
        pooling: ``cls`` (a row's first token), ``last-token`` (its last) or ``mean``.
    """
    starts = packed.cu_seqlens[:-1].long()  # (n_rows,)
    if pooling == "cls":
        pooled = hidden[starts].float()
    elif pooling == "last-token":
        pooled = hidden[starts + packed.lengths - 1].float()
    else:
        n_rows = int(packed.lengths.shape[0])
        sums = hidden.new_zeros((n_rows, hidden.shape[1]), dtype=torch.float32)
        sums = sums.index_add(0, packed.row_of_token, hidden.float())
        pooled = sums / packed.lengths.clamp(min=1)[:, None].float()
    return [pooled[rows] for rows in packed.unsort]  # each batch in its input order
