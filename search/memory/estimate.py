"""Peak training memory of one trial, estimated from the architecture before loading the model.

The estimate is a sum of named parts, so a skipped trial can say what did not fit:

* **model states** with AdamW: fp32 parameters (4 bytes each), fp32 gradients (4), two fp32
  moments (8) - the 16 bytes per parameter of the ZeRO paper. Under AMP (``torch.autocast``)
  the weights stay fp32 and autocast caches a 16-bit copy of each for the step (+2): the 18
  bytes of Hugging Face's "anatomy of model memory".
* **activations** per transformer layer after Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", arXiv:2205.05198), generalised to any element
  size ``e``, dropout-mask size ``m`` and feed-forward size ``f``::

      s*b*((8*h + 2*f)*e + 2*h*m)  +  a*s^2*b*(2*e + m)   [the stored attention matrices]

  With ``e=2, m=1, f=4h`` this is the paper's ``s*b*h*(34 + 5*a*s/h)``. Fused attention (SDPA
  on CUDA: flash / memory-efficient kernels) does not store the attention matrices; it keeps a
  logsumexp of ``a*s*b`` fp32 values instead. Full gradient checkpointing keeps each layer's
  input (``s*b*h*e``) plus the activations of the layer being recomputed (on CPU one layer at
  a time over both passes, measured; on CUDA one per pass). The embedding block keeps its
  LayerNorm input (fp32) and a dropout mask.
* **the bi-encoder**: the encoder runs over ``b`` queries and ``b*(1 + negatives)`` passages,
  each with its own length (both ``max_len`` by default: the worst-case first step that
  ``fail_fast`` runs), and both graphs live until the backward pass; plus the
  ``b x b*(1 + negatives)`` score matrix (fp32 scores, their softmax, their gradient).
* **overhead**: the backward pass's working set (about one layer's activations, as gradients),
  and on CUDA the context and cuBLAS/cuDNN workspaces plus a share for the caching allocator's
  fragmentation. On CPU the estimate models the live peak, measured with glibc's mmap threshold
  fixed (``search.worker.isolation.MALLOC_MMAP_THRESHOLD``: freed activations go back to the
  system, so the peak is the live tensors plus a fixed cost, the same in every run). A trial
  fixes it only under a CPU ``--memory-limit``; otherwise it keeps glibc's own threshold and
  its resident peak can be higher (README, "Capped").

CPU (fp32 and bf16 autocast, padded and padding-free; the trial's resident memory above the
worker process's baseline) is calibrated on counts of saved tensors and measured peaks of tiny
replicas and of the real all-MiniLM-L6-v2 on this machine (see :data:`CPU_CALIBRATION`,
``bench/count_saved_tensors.py``, ``bench/bench_estimate_real.py``); the CUDA constants are
first-principles values waiting for the GPU measurement of issue 3 (and do not model the
padding-free forward).
"""

from __future__ import annotations

from dataclasses import asdict
from dataclasses import dataclass

from search.record.config import TrialConfig
from search.record.models import ModelInfo
from search.record.precision import uses_autocast

__all__ = [
    "CPU_CALIBRATION",
    "CUDA_CONTEXT_BYTES",
    "PADDING_FREE_TYPES",
    "MemoryEstimate",
    "estimate_peak_memory",
    "layer_activation_bytes",
    "runs_padding_free",
]

MIB = 1024**2

# CUDA context + cuBLAS/cuDNN workspaces of a PyTorch process (about 500-600 MiB on H100-class
# cards with lazy module loading); not seen by torch.cuda.max_memory_allocated, seen by NVML.
CUDA_CONTEXT_BYTES = 600 * MIB
# Share of the dynamic memory (activations, scores) lost to the caching allocator's
# fragmentation on CUDA (an assumption until measured on a GPU).
CUDA_FRAGMENTATION = 0.05

# Measured on this machine (2 cores, torch 2.13 CPU, transformers 5.24), see
# ``estimate_peak_memory``: extra resident bytes of a trial beyond the states and activations
# (tokenizer, data, evaluation, allocator slack), and what the eager CPU path stores per layer.
CPU_CALIBRATION: dict[str, float] = {
    "base_bytes": 50 * MIB,  # fixed cost of a training run on CPU (measured, see docstring)
    "scale": 1.05,  # multiplier on states + activations: leans to over-estimating (docstring)
    # Share of the largest layer's activations the backward pass adds on top of the stored
    # ones. Without checkpointing none: at the peak few of the layer's tensors are live (the
    # live heap, mallinfo2, is the stored activations within 3%). With checkpointing the live
    # peak is the layer inputs plus 1.04-1.16 x the largest layer (24 tiny configs, 8-64 x
    # 64-256, mallinfo2 after every aten op): the recomputed layer plus 0.1. Freed heap that
    # glibc keeps resident is not counted: the calibration runs with a fixed mmap threshold
    # (search.worker.isolation.MALLOC_MMAP_THRESHOLD), which returns freed activations to the
    # system; so does a trial under a CPU --memory-limit.
    "working_set": 0.0,
    "working_set_checkpointing": 0.1,
    # h-sized tensors stored per token and layer, counted with saved_tensors_hooks on tiny
    # BERT/XLM-R layers: fp32 stores 9 (the paper's 8 + the scaled query of SDPA's math path);
    # under CPU bf16 autocast the bf16 casts of each linear's input add copies (15 at 2 bytes).
    "hidden_elements_fp32": 9,
    "hidden_elements_bf16": 15,
    # Bytes per attention-matrix element: softmax output, dropout mask and dropout output, all
    # fp32 on CPU (softmax runs in fp32 under autocast too).
    "attention_bytes": 12,
    # With the gradient cache, h-sized fp32 tensors per token of the WHOLE batch that stay
    # resident over the step beyond the model (measured, not explained: peaks of isolated
    # trials on a tiny replica, 64 tokens, L2/H64: batch 256 in mini-batches of 32 and 64
    # and batch 32 in 8, were 38, 28 and 6 MiB above the estimate without this term).
    "cache_hidden_elements": 3,
    # The padding-free layer (search.train.unpadded, issue 19), counted the same way
    # (bench/count_saved_tensors.py): h-sized tensors per token of the element size, beside the
    # feed-forward's two f-sized ones and two 1-byte (bool) dropout masks. fp32 stores 11: the
    # paper's 8 less the separate Q, K, V views, plus the packed QKV that the re-padding's
    # index_copy keeps (3h), the scaled query and the contiguous copies of K and V that the 4-d
    # matmuls make (3). Under bf16 autocast 13 at 2 bytes: the bf16 casts of the linears'
    # inputs, the LayerNorms' inputs in fp32 (2 each). Its attention takes the math path with
    # dropout and keeps the softmax output, a bool dropout mask and the dropped probabilities:
    # 4 + 1 + 4 bytes per element in fp32, 2 + 1 + 2 under bf16 autocast (softmax stays bf16).
    "hidden_elements_padding_free_fp32": 11,
    "hidden_elements_padding_free_bf16": 13,
    "attention_bytes_padding_free_fp32": 9,
    "attention_bytes_padding_free_bf16": 5,
    # The padding-free attention's per-block tensors (scaled Q, K and V copies, softmax output,
    # dropout mask, dropped probabilities: rows x width x h, rows x a x width^2) below the mmap
    # threshold live in glibc's heap among the blocks' transients of the same sizes; the holes
    # they leave stay resident. Counted once more (1.0; not fitted: on the real MiniLM at
    # max_len 64 the estimate without it was short by 0.9-1.1 x these tensors' bytes, at 128
    # fp32, where they are all above the threshold, it was not).
    "small_block_copies": 1.0,
}

# Rows per attention block of the padding-free forward on a CPU
# (search.train.unpadded.ATTENTION_BLOCK_ROWS) and glibc's mmap threshold of the calibration
# (search.worker.isolation.MALLOC_MMAP_THRESHOLD): tests keep them equal.
ATTENTION_BLOCK_ROWS = 8
MMAP_THRESHOLD = 1 * MIB

# Model types whose encoder runs padding-free (search.train.unpadded.SUPPORTED_MODEL_TYPES; not
# imported: that module loads torch, which a preflight does not need; a test keeps them equal).
PADDING_FREE_TYPES = ("bert", "roberta", "xlm-roberta", "camembert")


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak training memory of one trial, in bytes, by part.

    Args:
        total_bytes: Sum of the parts: the peak to compare with the device's free memory.
        params_bytes: Weights (fp32, plus autocast's 16-bit copies under AMP).
        grads_bytes: Gradients (fp32, like the weights) live at the peak: on CPU without
            checkpointing only those beyond the activations, which the backward pass frees as
            it makes them.
        optimizer_bytes: AdamW's two fp32 moments.
        activations_bytes: Everything the forward passes keep for the backward pass.
        scores_bytes: The query x passage score matrix, its softmax and gradient.
        overhead_bytes: Backward working set, CUDA context and fragmentation, or the CPU
            calibration's fixed cost.
        cache_bytes: With the gradient cache, the batch's embeddings and their gradients
            (the activations are then one mini-batch's).
    """

    total_bytes: int
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    scores_bytes: int
    overhead_bytes: int
    cache_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        """The parts by name (what a trial or a report records)."""
        return asdict(self)

    @property
    def total_mb(self) -> float:
        """``total_bytes`` in MiB (what ``memory_estimate_mb`` records)."""
        return self.total_bytes / MIB


def layer_activation_bytes(
    seq: int,
    batch: int,
    hidden: int,
    heads: int,
    ffn: int,
    *,
    elem_bytes: int,
    mask_bytes: int,
    attention_matrix: bool,
    hidden_elements: float = 8,
    attention_bytes: int | None = None,
) -> int:
    """Bytes one transformer layer keeps for its backward pass (Korthikanti et al. 2022).

    Example:
        >>> s, b, h, a = 512, 8, 1024, 16  # the paper's s*b*h*(34 + 5*a*s/h) at 16 bits
        >>> layer_activation_bytes(s, b, h, a, 4 * h, elem_bytes=2, mask_bytes=1,
        ...                        attention_matrix=True) == s * b * h * (34 + 5 * a * s // h)
        True

    Args:
        seq: Tokens per sequence (``s``).
        batch: Sequences (``b``).
        hidden: Hidden size (``h``).
        heads: Attention heads (``a``).
        ffn: Feed-forward size (``f``; the paper has ``4h``).
        elem_bytes: Bytes per stored activation (2 under AMP, 4 in fp32).
        mask_bytes: Bytes per dropout-mask element (1 on CUDA, the element size on CPU).
        attention_matrix: Whether the ``a*s*s`` attention probabilities are stored (eager or
            math attention) or not (fused SDPA kernels, which keep a logsumexp instead).
        hidden_elements: ``h``-sized tensors stored per token: 8 in the paper (attention input,
            Q, K, V, projection input, feed-forward input, two LayerNorm inputs).
        attention_bytes: Bytes per stored attention-matrix element (default ``2*e + m``:
            softmax output, dropout output, dropout mask).

    Returns:
        The layer's stored activations in bytes.
    """
    sb = seq * batch
    per_token = (hidden_elements * hidden + 2 * ffn) * elem_bytes + 2 * hidden * mask_bytes
    stored = sb * per_token
    if attention_matrix:
        per_element = 2 * elem_bytes + mask_bytes if attention_bytes is None else attention_bytes
        stored += heads * seq * seq * batch * per_element
    else:
        stored += heads * sb * 4  # logsumexp of the fused kernels, fp32
    return int(stored)


def _small_block_bytes(arch: ModelInfo, seq: int, batch: int, elem_bytes: int) -> int:
    """Bytes of one padding-free layer's per-block attention tensors under the mmap threshold.

    Rows are cut into blocks of ``ATTENTION_BLOCK_ROWS``, each padded to ``seq`` (the worst
    case: every row full); per block three ``rows x seq x h`` tensors of the element size and,
    per ``rows x a x seq^2`` element, the softmax output and dropped probabilities (the element
    size) and a bool mask.
    """
    small = 0
    full, rest = divmod(batch, ATTENTION_BLOCK_ROWS)
    for rows, count in ((ATTENTION_BLOCK_ROWS, full), (rest, 1 if rest else 0)):
        hidden = rows * seq * arch.hidden * elem_bytes
        scores = rows * arch.heads * seq * seq
        sizes = [hidden] * 3 + [scores * elem_bytes] * 2 + [scores]
        small += count * sum(size for size in sizes if size < MMAP_THRESHOLD)
    return small


def _encoder_activation_bytes(
    arch: ModelInfo,
    seq: int,
    batch: int,
    *,
    elem_bytes: int,
    mask_bytes: int,
    attention_matrix: bool,
    checkpointing: bool,
    hidden_elements: float,
    attention_bytes: int | None,
    padding_free: bool = False,
) -> tuple[int, int]:
    """(stored bytes of one encoder pass, bytes of one layer) for ``batch`` x ``seq`` tokens.

    With checkpointing the stored bytes are the embeddings and each layer's input: the layer
    being recomputed is added by the caller. Padding-free, the embeddings keep a bool dropout
    mask and two int64 index tensors (ids, positions), and a checkpointed layer's input is the
    fp32 output of the LayerNorm before it, under autocast too (measured).
    """
    layer = layer_activation_bytes(
        seq,
        batch,
        arch.hidden,
        arch.heads,
        arch.ffn,
        elem_bytes=elem_bytes,
        mask_bytes=mask_bytes,
        attention_matrix=attention_matrix,
        hidden_elements=hidden_elements,
        attention_bytes=attention_bytes,
    )
    tokens = seq * batch
    embeddings = tokens * arch.hidden * (4 + mask_bytes) + tokens * 8  # LN input, mask, ids
    if padding_free:
        embeddings += tokens * 8  # positions
        small = int(
            CPU_CALIBRATION["small_block_copies"]
            * _small_block_bytes(arch, seq, batch, elem_bytes)
        )
        layer += small
    if checkpointing:
        kept_bytes = 4 if padding_free else elem_bytes
        kept = arch.num_layers * tokens * arch.hidden * kept_bytes
    else:
        kept = arch.num_layers * layer
    return embeddings + kept, layer


def estimate_peak_memory(
    arch: ModelInfo,
    cfg: TrialConfig,
    *,
    device_type: str = "cuda",
    query_len: int | None = None,
    passage_len: int | None = None,
) -> MemoryEstimate:
    """Estimate a trial's peak training memory before loading its model.

    On CUDA: AMP stores 16-bit activations (fp32 without), dropout masks are bytes and
    attention runs in fused SDPA kernels (no stored attention matrix); the overhead is one
    layer's activations (the backward working set), :data:`CUDA_CONTEXT_BYTES` and
    :data:`CUDA_FRAGMENTATION` of the dynamic memory. These are first-principles numbers: the
    comparison with measured GPU peaks (issue 3, target 15%) has not been run yet.

    On CPU the activations are fp32, or bf16 where autocast runs (``uses_autocast``: bf16
    hardware), and attention takes a math path with dropout, which stores the attention
    matrices. With transformers' padded forward (``padding_free`` off, and the fail-fast first
    step) dropout masks have the element size and an attention element costs 12 bytes.
    The total is the trial's resident memory above the worker's baseline, which is
    what ``--memory-limit`` caps. Calibration, measured here (torch 2.13 CPU with AMX bf16,
    transformers 5.24, 1 thread): the stored tensors per layer of tiny BERT / XLM-R layers,
    counted with ``torch.autograd.graph.saved_tensors_hooks``, fit the formula with 9
    ``h``-sized fp32 tensors per token (15 at 2 bytes under bf16 autocast) and 12 bytes per
    attention element. The live heap at the peak (``mallinfo2`` after every aten op, 24 tiny
    configs) is the stored activations within 3% without checkpointing, and the layer inputs
    plus 1.04-1.16 of the largest layer with it (the recomputed layer plus a 0.1 working set).
    What the process holds beyond the live heap was glibc's: with its default dynamic mmap
    threshold, freed activations stayed resident by an amount that depended on the order of
    allocations (one checkpointed tiny config, 32 x 128: 264-375 MiB over identical runs, half
    of it retained heap), so trials now run with a fixed 1 MiB threshold, under which the same
    config measures 148 MiB in every run. Under that rule: tiny replicas at 1.035-1.056
    (e5-small 32 x 128, with and without checkpointing), and the real all-MiniLM-L6-v2 at
    1.000-1.087 (fp32, padded steps: before issue 19) over 27 points of batch 16-64 x max_len
    64-256 x checkpointing x 0-1 hard negatives, 470 MiB to 5 GiB
    (``bench/bench_estimate_real.py``; BENCHMARKS.md, "Memory estimate on real weights"). The
    preflight's error band
    (``search.memory.preflight.ESTIMATE_BAND``) comes from that grid.

    Padding-free (``cfg.padding_free`` where ``runs_padding_free``; issue 19) the constants are
    the ``*_padding_free_*`` entries of :data:`CPU_CALIBRATION`, counted the same way through
    ``search.train.unpadded.packed_forward`` (``bench/count_saved_tensors.py``): 11 ``h``-sized
    fp32 tensors per token and layer (13 at 2 bytes under bf16 autocast), bool dropout masks,
    9 bytes per attention element (5 under bf16), per-block attention tensors below the mmap
    threshold counted twice (heap holes). The fail-fast step runs padding-free with every row at
    ``max_len``, before AdamW's moments exist: inside the worst case estimated. On the real
    all-MiniLM-L6-v2, 16 held-out points of batch 16-48 x max_len 96-256 x checkpointing x 0-1
    hard negatives: 0.980-1.065 in fp32, 0.955-1.076 under bf16 AMP (BENCHMARKS.md, "Memory
    estimate with padding-free steps and AMP").

    Example:
        >>> from search.record.models import MODELS
        >>> cfg = TrialConfig(model="bge-m3-ko", model_path="dragonkue/BGE-m3-ko",
        ...     batch_size=64, max_len=384, lr=2e-5, temperature=0.05, warmup_ratio=0.1,
        ...     weight_decay=0.01, epochs=1, amp=True, gradient_checkpointing=False,
        ...     hard_negatives=0, seed=0, device="cuda", train_path="t", eval_dir="e")
        >>> round(estimate_peak_memory(MODELS["bge-m3-ko"], cfg).total_bytes / 2**30)
        51

    Args:
        arch: Facts of what is actually loaded (for ``--tiny``, ``tiny_info`` of the replica).
        cfg: The trial's effective config.
        device_type: ``cuda`` (also ``xpu``, ``mps``: accelerator rules) or ``cpu``.
        query_len: Tokens per query (default ``cfg.max_len``, the worst case).
        passage_len: Tokens per passage and negative (default ``cfg.max_len``).

    Returns:
        The estimate by part.
    """
    if device_type not in ("cuda", "cpu", "xpu", "mps", "hip"):
        raise ValueError(f"unknown device_type {device_type!r}")
    # Padding-free, the fail-fast step runs every row at max_len (search.train.loop,
    # BiEncoder.worst_case_forward): this worst case, before AdamW has made its moments.
    padding_free = device_type == "cpu" and runs_padding_free(arch, cfg)
    return _estimate(arch, cfg, device_type, query_len, passage_len, padding_free=padding_free)


def runs_padding_free(arch: ModelInfo, cfg: TrialConfig) -> bool:
    """Whether the trial's encoder runs padding-free (``BiEncoder.from_config``'s rule)."""
    attention = cfg.attn_implementation or arch.attn_implementation
    return cfg.padding_free and attention == "sdpa" and arch.architecture in PADDING_FREE_TYPES


def _estimate(
    arch: ModelInfo,
    cfg: TrialConfig,
    device_type: str,
    query_len: int | None,
    passage_len: int | None,
    *,
    padding_free: bool,
) -> MemoryEstimate:
    """The estimate of steps run padded or padding-free (CPU)."""
    cpu = device_type == "cpu"
    # Autocast as search.train.loop runs it: always on accelerators, on CPU only with bf16
    # hardware (AMX / AVX512-BF16) and hidden >= CPU_BF16_MIN_HIDDEN, else the CPU run is fp32.
    amp = uses_autocast(device_type, cfg.amp, hidden=arch.hidden)
    s_q = min(query_len or cfg.max_len, arch.max_tokens)
    s_p = min(passage_len or cfg.max_len, arch.max_tokens)
    b = cfg.batch_size
    n_passages = b * (1 + cfg.hard_negatives)

    p = arch.n_params
    params = 4 * p + (2 * p if amp else 0)
    grads = 4 * p
    optimizer = 8 * p

    elem = 2 if amp else 4

    attention_bytes: int | None = None
    if not cpu:
        hidden_elements = 8.0
    else:
        kind = "_padding_free" if padding_free else ""
        precision = "bf16" if amp else "fp32"
        hidden_elements = CPU_CALIBRATION[f"hidden_elements{kind}_{precision}"]
        key = f"attention_bytes_padding_free_{precision}" if padding_free else "attention_bytes"
        attention_bytes = int(CPU_CALIBRATION[key])
    # Dropout masks: bytes on CUDA and padding-free (bool), of the element size in the eager CPU
    # path (transformers' dropout multiplies by a mask of the input's dtype).
    mask_bytes = 1 if padding_free or not cpu else elem

    def encoder(seq: int, batch: int) -> tuple[int, int]:
        return _encoder_activation_bytes(
            arch,
            seq,
            batch,
            elem_bytes=elem,
            mask_bytes=mask_bytes,
            attention_matrix=cpu,
            checkpointing=cfg.gradient_checkpointing,
            hidden_elements=hidden_elements,
            attention_bytes=attention_bytes,
            padding_free=padding_free,
        )

    rows = cfg.gradient_cache_rows
    cache = 0
    if rows:
        # Gradient cache (CachedInfoNCELoss): one mini-batch's graph at a time, plus the
        # embeddings of the whole batch and their gradients (fp32).
        q_act, q_layer = encoder(s_q, min(rows, b))
        p_act, p_layer = encoder(s_p, min(rows, n_passages))
        activations = max(q_act, p_act)
        cache = 2 * 4 * (b + n_passages) * arch.hidden
        if cpu:
            tokens = b * s_q + n_passages * s_p
            cache += int(CPU_CALIBRATION["cache_hidden_elements"] * 4 * tokens * arch.hidden)
    else:
        q_act, q_layer = encoder(s_q, b)
        p_act, p_layer = encoder(s_p, n_passages)
        activations = q_act + p_act
    if cfg.gradient_checkpointing and cpu and not rows:
        # Two moments of the backward pass, measured on the real all-MiniLM-L6-v2 (10 points,
        # bench/bench_estimate_real.py). Padded or padding-free, queries and passages are two
        # encoder passes (search.train.loop._loss). The passages' graph, built last, is
        # back-propagated first: its layers are recomputed one at a time while both passes'
        # layer inputs are kept and the layers' gradients appear (the embedding tables' come
        # at its end). Then the queries' layers are recomputed, the passages' graph gone and
        # every gradient allocated. The peak is the larger of the two; summing all gradients
        # with the first put checkpointed points with hard negatives 14-16% high.
        embedding_grads = 4 * (arch.vocab + arch.max_positions) * arch.hidden
        layer_grads = max(0, grads - embedding_grads)
        passages_first = q_act + p_act + p_layer
        queries_last = q_act + q_layer
        if passages_first + layer_grads >= queries_last + grads:
            activations, grads = passages_first, layer_grads
        else:
            activations = queries_last
    elif cfg.gradient_checkpointing:
        # The layer being recomputed: on CPU one at a time over both passes (measured), on
        # CUDA each pass's (first-principles, not yet measured).
        activations += max(q_layer, p_layer) if cpu else q_layer + p_layer
    scores = 3 * 4 * b * n_passages  # (b, b*(1+neg)) fp32: scores, softmax, gradient

    working_set = max(q_layer, p_layer)
    if cpu:
        share = "working_set_checkpointing" if cfg.gradient_checkpointing else "working_set"
        working_set = int(CPU_CALIBRATION[share] * working_set)
        if not cfg.gradient_checkpointing:
            # The backward pass frees each layer's stored activations as it makes that layer's
            # gradients: at the peak (its start) they are not both live. Only gradients beyond
            # the activations count (measured on the real all-MiniLM-L6-v2, 87 MiB of gradients:
            # summing both put every point 10-14% high; bench/bench_estimate_real.py).
            grads = max(0, grads - activations)
        scale = CPU_CALIBRATION["scale"]
        dynamic = params + grads + optimizer + activations + scores + cache + working_set
        overhead = int(CPU_CALIBRATION["base_bytes"] + (scale - 1.0) * dynamic) + working_set
    else:
        fragmentation = CUDA_FRAGMENTATION * (activations + scores)
        overhead = int(CUDA_CONTEXT_BYTES + working_set + fragmentation)
    total = params + grads + optimizer + activations + scores + cache + overhead
    return MemoryEstimate(
        total_bytes=int(total),
        params_bytes=int(params),
        grads_bytes=int(grads),
        optimizer_bytes=int(optimizer),
        activations_bytes=int(activations),
        scores_bytes=int(scores),
        overhead_bytes=int(overhead),
        cache_bytes=int(cache),
    )
