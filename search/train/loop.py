"""The training objective of one trial: a bi-encoder trained with InfoNCE, evaluated each epoch.

Run one trial by hand (tiny replica, KLUE-NLI, CPU)::

    python -c "
    from search.config import TrialConfig
    from search.train.loop import train
    cfg = TrialConfig(model='ko-simcse', model_path='/tmp/replica', batch_size=32, max_len=64,
                      lr=1e-3, temperature=0.05, warmup_ratio=0.1, weight_decay=0.01, epochs=2,
                      amp=True, gradient_checkpointing=False, hard_negatives=1, seed=0,
                      device='auto', train_path='/tmp/klue/train.jsonl',
                      eval_dir='/tmp/klue/eval')
    print(train(cfg))"

The Optuna objective (``search.runner``) calls ``train(cfg, report=..., on_phase=...)`` in an
isolated process: ``report`` decides pruning after each epoch, ``on_phase`` names the phase an
out-of-memory error happened in.
"""

from __future__ import annotations

import math
import random
import resource
import time
from collections.abc import Callable
from collections.abc import Sequence
from contextlib import AbstractContextManager
from contextlib import nullcontext
from dataclasses import dataclass
from dataclasses import field
from typing import Literal

import numpy as np
import optuna
import torch
from torch import Tensor
from transformers import get_linear_schedule_with_warmup

from search.config import TrialConfig
from search.train.data import EvalSet
from search.train.data import TrainExample
from search.train.data import load_eval
from search.train.data import load_train
from search.train.encoder import BiEncoder
from search.train.losses import InfoNCELoss
from search.train.metrics import evaluate

# -----------------------------------------------------------------------------
# Defaults that are not hyperparameters of the study.
GRAD_CLIP = 1.0  # max global gradient norm
ADAM_BETAS = (0.9, 0.999)  # AdamW moments, the transformers defaults
ADAM_EPS = 1e-8
LENGTH_GROUP = 50  # batches per length-sorted chunk: similar lengths share a batch, less padding
EVAL_BATCH_SIZE = 64  # texts encoded at once when evaluating
CPU_BF16_MIN_HIDDEN = 256  # measured on AMX: bf16/fp32 0.89x at H64, 1.09x H128, 1.53x H256
# -----------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What one training run measured.

    Args:
        metrics: The last evaluated epoch's retrieval metrics, plus ``loss`` (mean train loss).
        history: One dict per epoch: ``epoch`` (1-based), ``loss`` and the metrics.
        peak_memory_mb: CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process' peak RSS.
        seconds: Wall seconds of the whole run (load, tokenisation, training, evaluation).
        samples_per_s: Training examples per second over the training steps only.
    """

    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    peak_memory_mb: float = 0.0
    seconds: float = 0.0
    samples_per_s: float = 0.0


@dataclass(frozen=True)
class _Tokens:
    """Texts tokenised once: right-padded ids and mask, cut per batch to its longest row."""

    input_ids: Tensor  # (n_texts, width)
    attention_mask: Tensor  # (n_texts, width)
    lengths: Tensor  # (n_texts,) tokens per text

    def batch(self, rows: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
        """The rows' ids and mask, as wide as their longest row, on ``device``."""
        width = int(self.lengths[rows].max())
        ids = self.input_ids[rows, :width]  # (len(rows), width): one gather, one copy
        mask = self.attention_mask[rows, :width]
        return ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)


@dataclass(frozen=True)
class _Dataset:
    """Training examples as indices into the query and passage token tables."""

    queries: _Tokens  # every distinct query text
    passages: _Tokens  # every distinct positive and negative text
    query: Tensor  # (n,) row of each example's query in ``queries``
    positive: Tensor  # (n,) row of each example's positive in ``passages``
    negatives: Tensor  # (n, k) rows of the hard negatives; -1 where an example has fewer

    def __len__(self) -> int:
        return len(self.query)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else as ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but CUDA is not available.")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AMX tiles or AVX512-BF16 instructions).

    Without them torch emulates bf16 matmuls on CPU, slower than fp32; with them bf16 autocast
    trains about 1.5x faster than fp32 from hidden size 256 up (BENCHMARKS.md, "CPU precision").
    """
    cpu = torch.cpu
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def autocast_dtype(device: torch.device, amp: bool, *, hidden: int) -> torch.dtype | None:
    """The autocast dtype of a run, or None for full fp32.

    The rule: ``amp=False`` is always fp32. With ``amp=True``, CUDA uses bf16 where the GPU
    supports it, else fp16 (with a gradient scaler). CPU uses bf16 only when the hardware has
    native bf16 (``cpu_has_native_bf16``) and the model's hidden size is at least
    ``CPU_BF16_MIN_HIDDEN``; otherwise fp32: emulated bf16 is slower than fp32, and so is native
    bf16 on matrices too small to pay for the casts (BENCHMARKS.md, "CPU precision").

    Args:
        device: Where the run trains.
        amp: The trial's ``amp`` setting.
        hidden: The encoder's hidden size.
    """
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and hidden >= CPU_BF16_MIN_HIDDEN and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: the CUDA allocator's on CUDA, else the process' peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _tokenize(
    encoder: BiEncoder, texts: list[str], kind: Literal["query", "passage"], max_len: int
) -> _Tokens:
    """Tokenise texts once, right-padded to the longest of them."""
    tokens = encoder.tokenize(texts, kind=kind, max_len=max_len)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]  # (n_texts, width)
    if not bool((mask[:, 1:] <= mask[:, :-1]).all()):
        raise ValueError("the tokenizer must pad on the right for batches to be cut to length.")
    return _Tokens(ids, mask, mask.sum(dim=1))


def _build_dataset(
    encoder: BiEncoder, examples: Sequence[TrainExample], *, max_len: int, hard_negatives: int
) -> _Dataset:
    """Tokenise each distinct text once and index the examples into the tables."""
    query_row: dict[str, int] = {}
    passage_row: dict[str, int] = {}
    k = min(hard_negatives, max((len(e.negatives) for e in examples), default=0))
    query, positive = [], []
    negatives = torch.full((len(examples), k), -1, dtype=torch.long)
    for i, example in enumerate(examples):
        query.append(query_row.setdefault(example.query, len(query_row)))
        positive.append(passage_row.setdefault(example.positive, len(passage_row)))
        for j, text in enumerate(example.negatives[:k]):
            negatives[i, j] = passage_row.setdefault(text, len(passage_row))
    return _Dataset(
        queries=_tokenize(encoder, list(query_row), "query", max_len),
        passages=_tokenize(encoder, list(passage_row), "passage", max_len),
        query=torch.tensor(query, dtype=torch.long),
        positive=torch.tensor(positive, dtype=torch.long),
        negatives=negatives,
    )


def _epoch_batches(data: _Dataset, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """Example indices of each batch of one epoch, length-grouped and in a seeded order.

    The epoch's permutation is cut into chunks of ``LENGTH_GROUP`` batches; each chunk is
    sorted by length so that a batch holds texts of similar length (less padding), then the
    batches are shuffled. The last incomplete batch is dropped (in-batch negatives want full
    batches) unless the data is smaller than one batch, which is then used whole.
    """
    n = len(data)
    if n <= batch_size:
        return [torch.randperm(n, generator=generator)]
    order = torch.randperm(n, generator=generator)
    key = data.queries.lengths[data.query] + data.passages.lengths[data.positive]  # (n,)
    chunk = batch_size * LENGTH_GROUP
    batches: list[Tensor] = []
    for start in range(0, n, chunk):
        part = order[start : start + chunk]
        part = part[torch.sort(key[part], descending=True, stable=True).indices]
        batches.extend(part[i : i + batch_size] for i in range(0, len(part), batch_size))
    if len(batches[-1]) < batch_size:
        batches.pop()
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def _worst_case_batch(
    encoder: BiEncoder,
    examples: Sequence[TrainExample],
    rows: Tensor,
    data: _Dataset,
    *,
    max_len: int,
    device: torch.device,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """A batch's texts padded to ``max_len``, with every query given its full share of negatives.

    A query with fewer hard negatives than the run uses gets copies of the batch's (or the
    data's) other negatives instead, so the shape is the largest any step can have; a repeated
    negative only adds its logit twice.
    """
    k = data.negatives.shape[1]
    picked = [examples[i] for i in rows.tolist()]
    negatives = [t for e in picked for t in e.negatives[:k]]
    if k and not negatives:
        negatives = [t for e in examples for t in e.negatives[:k]][: len(picked) * k]
    if negatives:
        negatives = [negatives[i % len(negatives)] for i in range(len(picked) * k)]
    passages = [e.positive for e in picked] + negatives
    q = encoder.tokenize(
        [e.query for e in picked], kind="query", max_len=max_len, pad_to_max_length=True
    )
    p = encoder.tokenize(passages, kind="passage", max_len=max_len, pad_to_max_length=True)
    return (
        (q["input_ids"].to(device), q["attention_mask"].to(device)),
        (p["input_ids"].to(device), p["attention_mask"].to(device)),
    )


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, object]]:
    """Decay matrices only: biases and LayerNorm weights (the 1-d parameters) are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _check_config(cfg: TrialConfig) -> None:
    """Raise ``ValueError`` on settings no run can use."""
    for name in ("batch_size", "max_len", "epochs"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be positive, but got {name}={getattr(cfg, name)}.")
    if cfg.hard_negatives < 0:
        raise ValueError(f"hard_negatives must be >= 0, but got {cfg.hard_negatives=}.")
    if not 0.0 <= cfg.warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], but got {cfg.warmup_ratio=}.")


def train(
    cfg: TrialConfig,
    *,
    train_examples: Sequence[TrainExample] | None = None,
    eval_set: EvalSet | None = None,
    report: Callable[[int, dict[str, float]], bool] | None = None,
    on_phase: Callable[[str], None] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train the bi-encoder of ``cfg`` and evaluate it after each epoch.

    Args:
        cfg: The trial's effective configuration.
        train_examples: Training data (default: ``load_train(cfg.train_path, max_samples=...)``).
        eval_set: Evaluation data (default: ``load_eval(cfg.eval_dir, cfg.eval_split)``).
        report: Called as ``report(epoch, metrics)`` after each evaluation (``epoch`` 1-based);
            returning True stops the run with ``optuna.TrialPruned``.
        on_phase: Called with ``load``, ``forward``, ``backward``, ``optimizer`` or ``eval``
            each time the run enters another phase (for attributing an out-of-memory error).
        on_step: Called as ``on_step(step, {"loss", "lr", "memory_mb"})`` after each optimizer
            step (``step`` 1-based over the run; ``memory_mb`` the peak so far). It reads the
            loss, which waits for the device: leave it None when nothing tracks the run.

    Returns:
        The last epoch's metrics, the per-epoch history, peak memory, time and throughput.

    Raises:
        optuna.TrialPruned: ``report`` asked to stop.
    """
    started = time.perf_counter()
    _check_config(cfg)
    phase = ""

    def enter(name: str) -> None:
        nonlocal phase
        if name != phase:
            phase = name
            if on_phase is not None:
                on_phase(name)

    # Data, seeds and device.
    if train_examples is None:
        train_examples = load_train(cfg.train_path, max_samples=cfg.max_train_samples)
    if eval_set is None:
        eval_set = load_eval(cfg.eval_dir, cfg.eval_split)
    if not train_examples:
        raise ValueError("no training examples.")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # Model, tokenised data, loss (the encoder enables gradient checkpointing from cfg).
    enter("load")
    model = BiEncoder.from_config(cfg).to(device)
    model.train()
    amp_dtype = autocast_dtype(device, cfg.amp, hidden=model.embedding_dim)

    def autocast() -> AbstractContextManager[object]:
        if amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    data = _build_dataset(
        model, train_examples, max_len=cfg.max_len, hard_negatives=cfg.hard_negatives
    )
    loss_fn = InfoNCELoss(cfg.temperature)

    # Optimizer and schedule: AdamW, linear warmup then linear decay to 0.
    generator = torch.Generator().manual_seed(cfg.seed)  # data order of every epoch
    steps_per_epoch = max(len(data) // cfg.batch_size, 1)  # as _epoch_batches cuts them
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=ADAM_BETAS,
        eps=ADAM_EPS,
        fused=True,  # one kernel for all parameters, on CUDA and CPU alike
    )
    scheduler = get_linear_schedule_with_warmup(
        optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps
    )
    # fp16 gradients underflow without loss scaling; bf16 and fp32 need none.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    history: list[dict[str, float]] = []
    train_seconds = 0.0
    trained = 0
    for epoch in range(1, cfg.epochs + 1):
        batches = _epoch_batches(data, cfg.batch_size, generator)
        loss_sum = torch.zeros((), device=device)  # summed on device: no sync per step
        epoch_start = time.perf_counter()
        for step, rows in enumerate(batches):
            # Batch: the very first step runs the worst-case shape (fail fast on memory).
            if epoch == 1 and step == 0 and cfg.fail_fast:
                (q_ids, q_mask), (p_ids, p_mask) = _worst_case_batch(
                    model, train_examples, rows, data, max_len=cfg.max_len, device=device
                )
            else:
                neg = data.negatives[rows].flatten()  # (batch * k,)
                passages = torch.cat([data.positive[rows], neg[neg >= 0]])
                q_ids, q_mask = data.queries.batch(data.query[rows], device)
                p_ids, p_mask = data.passages.batch(passages, device)

            # Forward: queries, then positives and hard negatives in one pass.
            enter("forward")
            with autocast():
                q_emb = model(q_ids, q_mask)  # (batch, hidden)
                p_emb = model(p_ids, p_mask)  # (batch * (1 + k), hidden)
                n = q_emb.shape[0]
                loss = loss_fn(q_emb, p_emb[:n], p_emb[n:])

            # Backward.
            enter("backward")
            scaler.scale(loss).backward()

            # Optimizer: unscale, clip, step, schedule.
            enter("optimizer")
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
            scaler.step(optimizer)
            scaler.update()
            lr = float(optimizer.param_groups[0]["lr"])  # this step's, before the schedule moves
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            trained += n
            if on_step is not None:  # experiment tracking (W&B): one row per step
                row = {"loss": loss.item(), "lr": lr, "memory_mb": peak_memory_mb(device)}
                on_step((epoch - 1) * steps_per_epoch + step + 1, row)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # count the queued kernels in this epoch's time
        train_seconds += time.perf_counter() - epoch_start

        # Evaluate, record, let the pruner decide.
        enter("eval")
        with autocast():
            metrics = evaluate(model, eval_set, max_len=cfg.max_len, batch_size=EVAL_BATCH_SIZE)
        model.train()
        metrics["loss"] = loss_sum.item() / len(batches)
        history.append({"epoch": float(epoch), **metrics})
        if report is not None and report(epoch, dict(metrics)):
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")

    return TrainResult(
        metrics=metrics,
        history=history,
        peak_memory_mb=peak_memory_mb(device),
        seconds=time.perf_counter() - started,
        samples_per_s=trained / train_seconds if train_seconds > 0 else 0.0,
    )
