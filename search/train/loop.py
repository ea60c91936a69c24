"""The training objective of one trial: a bi-encoder trained with InfoNCE, evaluated each epoch.

Run one trial by hand (tiny replica, KLUE-NLI, CPU)::

    python -c "
    from search.record.config import TrialConfig
    from search.train.loop import train
    cfg = TrialConfig(model='ko-simcse', model_path='/tmp/replica', batch_size=32, max_len=64,
                      lr=1e-3, temperature=0.05, warmup_ratio=0.1, weight_decay=0.01, epochs=2,
                      amp=True, gradient_checkpointing=False, hard_negatives=1, seed=0,
                      device='auto', train_path='/tmp/klue/train.jsonl',
                      eval_dir='/tmp/klue/eval')
    print(train(cfg))"

The Optuna objective (``search.worker.runner``) calls ``train(cfg, report=..., on_phase=...)`` in
an isolated process: ``report`` decides pruning after each epoch, ``on_phase`` names the phase an
out-of-memory error happened in.
"""

from __future__ import annotations

import math
import random
import resource
import time
from collections.abc import Callable
from collections.abc import Mapping
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

from search.record.attrs import REPORT_EXAMPLES_TOTAL
from search.record.config import TrialConfig
from search.record.precision import CPU_BF16_MIN_HIDDEN  # noqa: F401 - re-exported
from search.record.precision import autocast as precision_autocast
from search.record.precision import autocast_dtype
from search.record.precision import cpu_has_native_bf16  # noqa: F401 - re-exported
from search.record.precision import resolve_device
from search.train import token_cache
from search.train.data import EvalSet
from search.train.data import TrainExample
from search.train.encoder import BiEncoder
from search.train.export import save_trial_model
from search.train.losses import CachedInfoNCELoss
from search.train.losses import InfoNCELoss
from search.train.metrics import evaluate
from search.train.metrics import without_se
from search.train.partial_eval import ExamplesAxis
from search.train.partial_eval import eval_sample
from search.train.phase_clock import PhaseClock

# -----------------------------------------------------------------------------
# Defaults that are not hyperparameters of the study.
GRAD_CLIP = 1.0  # max global gradient norm
ADAM_BETAS = (0.9, 0.999)  # AdamW moments, the transformers defaults
ADAM_EPS = 1e-8
LENGTH_GROUP = 50  # batches per length-sorted chunk: similar lengths share a batch, less padding
EVAL_BATCH_SIZE = 64  # texts encoded at once when evaluating
# -----------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What one training run measured.

    Args:
        metrics: The last evaluated epoch's retrieval metrics, plus ``loss`` (mean train loss)
            and ``examples_seen``; the standard errors (``ndcg@10_se``) go to the reports only.
        history: One dict per epoch: ``epoch`` (1-based), ``loss``, ``examples_seen`` and the
            metrics (without their standard errors).
        peak_memory_mb: CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process' peak RSS.
        seconds: Wall seconds of the whole run (load, tokenisation, training, evaluation).
        samples_per_s: Training examples per second over the training steps only.
        timings: Wall seconds per phase of the run (``load``, ``tokenise``, ``train``,
            ``evaluate``, ``save``; ``search.train.phase_clock``), CUDA synchronised at the end
            of each epoch's steps.
        padding_free: Whether the encoder ran padding-free (``search.train.unpadded``): the
            trial asked for it (``cfg.padding_free``) and its architecture has it.
    """

    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    peak_memory_mb: float = 0.0
    seconds: float = 0.0
    samples_per_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    padding_free: bool = False


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
    encoder: BiEncoder,
    examples: Sequence[TrainExample],
    *,
    max_len: int,
    hard_negatives: int,
    encoder_part: Mapping[str, object] | None = None,
) -> _Dataset:
    """Tokenise each distinct text once and index the examples into the tables.

    The tables are cached across a worker's trials (``search.train.token_cache``), keyed on
    the texts, the tokenizer, ``max_len``, the prefixes and the hard negatives kept.
    ``encoder_part`` is ``token_cache.encoder_key(encoder, max_len)`` when the caller has it.
    """
    k = min(hard_negatives, max((len(e.negatives) for e in examples), default=0))
    part = encoder_part if encoder_part is not None else token_cache.encoder_key(encoder, max_len)
    key = None
    if part is not None:
        examples_digest = token_cache.examples_digest(examples)
        key = {"kind": "train-tokens", "examples": examples_digest, "negatives": k, **part}
    tables = token_cache.cached_tensors(
        key, lambda: _dataset_tables(encoder, examples, max_len=max_len, k=k)
    )
    return _Dataset(
        queries=_Tokens(
            tables["queries.input_ids"],
            tables["queries.attention_mask"],
            tables["queries.lengths"],
        ),
        passages=_Tokens(
            tables["passages.input_ids"],
            tables["passages.attention_mask"],
            tables["passages.lengths"],
        ),
        query=tables["query"],
        positive=tables["positive"],
        negatives=tables["negatives"],
    )


def _dataset_tables(
    encoder: BiEncoder, examples: Sequence[TrainExample], *, max_len: int, k: int
) -> dict[str, Tensor]:
    """The token tables of every distinct text and each example's rows in them (its first
    ``k`` hard negatives; -1 where it has fewer)."""
    query_row: dict[str, int] = {}
    passage_row: dict[str, int] = {}
    query, positive = [], []
    negatives = torch.full((len(examples), k), -1, dtype=torch.long)
    for i, example in enumerate(examples):
        query.append(query_row.setdefault(example.query, len(query_row)))
        positive.append(passage_row.setdefault(example.positive, len(passage_row)))
        for j, text in enumerate(example.negatives[:k]):
            negatives[i, j] = passage_row.setdefault(text, len(passage_row))
    tables = {
        "query": torch.tensor(query, dtype=torch.long),
        "positive": torch.tensor(positive, dtype=torch.long),
        "negatives": negatives,
    }
    for name, tokens in (
        ("queries", _tokenize(encoder, list(query_row), "query", max_len)),
        ("passages", _tokenize(encoder, list(passage_row), "passage", max_len)),
    ):
        tables[f"{name}.input_ids"] = tokens.input_ids
        tables[f"{name}.attention_mask"] = tokens.attention_mask
        tables[f"{name}.lengths"] = tokens.lengths
    return tables


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


def make_optimizer(model: torch.nn.Module, cfg: TrialConfig) -> torch.optim.AdamW:
    """The trial's AdamW: ``cfg.lr``, ``cfg.weight_decay`` on matrices only, fused kernel."""
    return torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=ADAM_BETAS,
        eps=ADAM_EPS,
        fused=True,  # one kernel for all parameters, on CUDA and CPU alike
    )


def make_scaler(device: torch.device, amp_dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none (disabled)."""
    return torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)


@dataclass(frozen=True)
class StepBatch:
    """One contrastive batch, tokenised and on the device.

    Args:
        queries: ``(input_ids, attention_mask)``, ``(batch, seq_q)`` each.
        passages: The same for the ``batch`` positives followed by the hard negatives.
        padded: The fail-fast step: a batch padded to ``max_len`` whose padding counts
            (``BiEncoder.worst_case_forward``: padding-free, every row at full width).
    """

    queries: tuple[Tensor, Tensor]
    passages: tuple[Tensor, Tensor]
    padded: bool = False

    @property
    def size(self) -> int:
        """Queries in the batch."""
        return int(self.queries[0].shape[0])


def _loss(
    model: BiEncoder,
    batch: StepBatch,
    cfg: TrialConfig,
    rows: int,
    autocast: Callable[[], AbstractContextManager[object]],
) -> Tensor:
    """The batch's InfoNCE loss, through the gradient cache when ``rows`` (mini-batch rows)."""
    if rows:
        cached = CachedInfoNCELoss(model, cfg.temperature, mini_batch_size=rows, autocast=autocast)
        return cached(batch.queries, batch.passages)
    with autocast():
        q_emb = model(*batch.queries)  # (batch, hidden)
        p_emb = model(*batch.passages)  # (batch * (1 + k), hidden)
        n = q_emb.shape[0]
        return InfoNCELoss(cfg.temperature)(q_emb, p_emb[:n], p_emb[n:])


def train_step(
    model: BiEncoder,
    batch: StepBatch,
    cfg: TrialConfig,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    amp_dtype: torch.dtype | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> Tensor:
    """One optimizer step of the trial's objective: forward, loss, backward, clip, AdamW.

    The loss is InfoNCE over the batch (``cfg.temperature``); with ``cfg.gradient_cache`` the
    batch is embedded in mini-batches of that many rows (``CachedInfoNCELoss``), the same loss
    and gradients in the memory of a mini-batch, for one more forward pass. The loop, the
    gradient cache's tests and the benches all run this function, so what is measured is what
    trains.

    Args:
        model: The bi-encoder, in train mode.
        batch: The step's queries and passages, on the model's device.
        cfg: The trial's configuration (``temperature``, ``gradient_cache``).
        optimizer: From :func:`make_optimizer`.
        scaler: From :func:`make_scaler` (enabled for fp16 only).
        amp_dtype: Autocast dtype (``search.record.precision.autocast_dtype``), None for fp32.
        scheduler: Stepped after the optimizer, when given.
        on_phase: Called with ``forward``, ``backward`` and ``optimizer`` as the step enters
            them (the second pass of the gradient cache runs in ``backward``).

    Returns:
        The batch's loss, detached (reading it waits for the device).
    """
    enter = on_phase or (lambda name: None)
    device = batch.queries[0].device

    def autocast() -> AbstractContextManager[object]:
        return precision_autocast(device, amp_dtype)

    rows = cfg.gradient_cache_rows
    enter("forward")

    def padded() -> AbstractContextManager[object]:  # the fail-fast step: the padded shape
        return model.worst_case_forward() if batch.padded else nullcontext()

    with padded():
        loss = _loss(model, batch, cfg, rows, autocast)

    enter("backward")
    with padded():  # the gradient cache's second pass
        scaler.scale(loss).backward()

    # Optimizer: unscale, clip, step, schedule.
    enter("optimizer")
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    scaler.step(optimizer)
    scaler.update()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


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
    report_partial: Callable[[int, dict[str, float]], bool] | None = None,
    clock: PhaseClock | None = None,
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
        report_partial: With ``cfg.eval_every_steps``, called as ``report_partial(examples,
            metrics)`` on a fixed sample of the eval set every that many training examples
            (``search.train.partial_eval``); returning True stops the run with
            ``optuna.TrialPruned``. Epoch reports carry ``metrics["examples_seen"]``, the
            same axis (``epoch x`` training examples).
        clock: Timed as the run goes (``load``, ``tokenise``, ``train``, ``evaluate``,
            ``save``): a caller that lends it keeps what was measured when the run raises
            (the trial's child process does). Default: a clock of its own.

    Both kinds of report also carry each metric's standard error over the evaluated queries
    (``ndcg@10_se``, ``search.train.metrics``) and ``metrics["examples_total"]``, the run's
    nominal total on the examples axis (``epochs x`` training examples): the pruner's noise
    and warm-up (``search.sampling.peer_pruner``).

    Returns:
        The last epoch's metrics, the per-epoch history, peak memory, time and throughput.

    Raises:
        optuna.TrialPruned: ``report`` asked to stop.
    """
    started = time.perf_counter()
    clock = clock if clock is not None else PhaseClock()
    _check_config(cfg)
    phase = ""

    def enter(name: str) -> None:
        nonlocal phase
        if name != phase:
            phase = name
            if on_phase is not None:
                on_phase(name)

    # Data, seeds and device.
    clock.enter("tokenise")
    # Parsed and checked once per content of the files (search.train.token_cache).
    if train_examples is None:
        train_examples = token_cache.load_train_cached(
            cfg.train_path, max_samples=cfg.max_train_samples
        )
    if eval_set is None:
        eval_set = token_cache.load_eval_cached(cfg.eval_dir, cfg.eval_split)
    if not train_examples:
        raise ValueError("no training examples.")
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # Model, tokenised data, loss (the encoder enables gradient checkpointing from cfg).
    enter("load")
    clock.enter("load")
    model = BiEncoder.from_config(cfg).to(device)
    model.train()
    amp_dtype = autocast_dtype(device, cfg.amp, hidden=model.embedding_dim)

    def autocast() -> AbstractContextManager[object]:
        return precision_autocast(device, amp_dtype)

    clock.enter("tokenise")
    # Token ids: once per worker (search.train.token_cache), keyed on the tokenizer's state.
    encoder_part = token_cache.encoder_key(model, cfg.max_len)
    data = _build_dataset(
        model,
        train_examples,
        max_len=cfg.max_len,
        hard_negatives=cfg.hard_negatives,
        encoder_part=encoder_part,
    )
    clock.enter("train")

    # Optimizer and schedule: AdamW, linear warmup then linear decay to 0.
    generator = torch.Generator().manual_seed(cfg.seed)  # data order of every epoch
    steps_per_epoch = max(len(data) // cfg.batch_size, 1)  # as _epoch_batches cuts them
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = make_optimizer(model, cfg)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, math.ceil(cfg.warmup_ratio * total_steps), total_steps
    )
    scaler = make_scaler(device, amp_dtype)

    history: list[dict[str, float]] = []
    train_seconds = 0.0
    trained = 0
    # Prune sooner: one step axis for every trial, training examples seen (partial_eval).
    axis = ExamplesAxis(len(data), cfg.eval_every_steps if report_partial else None)
    total = {REPORT_EXAMPLES_TOTAL: float(cfg.epochs * len(data))}  # in every report
    sample = eval_sample(eval_set, cfg.eval_sample_queries) if axis.every else None
    # The eval set's (and sample's) token ids: once per worker, the encoding every evaluation.
    clock.enter("tokenise")
    full_tokens = token_cache.cached_eval_tokens(
        model, eval_set, max_len=cfg.max_len, encoder_part=encoder_part
    )
    sample_tokens = (
        token_cache.cached_eval_tokens(
            model, sample, max_len=cfg.max_len, encoder_part=encoder_part
        )
        if sample is not None
        else None
    )
    for epoch in range(1, cfg.epochs + 1):
        clock.enter("train")
        batches = _epoch_batches(data, cfg.batch_size, generator)
        loss_sum = torch.zeros((), device=device)  # summed on device: no sync per step
        epoch_start = time.perf_counter()
        seen_in_epoch = 0
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
            worst_case = epoch == 1 and step == 0 and cfg.fail_fast
            batch = StepBatch((q_ids, q_mask), (p_ids, p_mask), padded=worst_case)

            # Forward (queries, then positives and hard negatives), backward, AdamW, schedule.
            lr = float(optimizer.param_groups[0]["lr"])  # this step's, before the schedule moves
            loss = train_step(
                model,
                batch,
                cfg,
                optimizer,
                scaler,
                amp_dtype=amp_dtype,
                scheduler=scheduler,
                on_phase=enter,
            )
            n = batch.size
            loss_sum += loss
            trained += n
            if on_step is not None:  # experiment tracking (W&B): one row per step
                row = {"loss": loss.item(), "lr": lr, "memory_mb": peak_memory_mb(device)}
                on_step((epoch - 1) * steps_per_epoch + step + 1, row)
            seen_in_epoch += n
            point = axis.due(epoch, seen_in_epoch)
            if point is not None and sample is not None and report_partial is not None:
                clock.enter("evaluate")
                eval_start = time.perf_counter()
                enter("eval")  # score the fixed eval sample; the pruner may stop the run
                with autocast():
                    sooner = evaluate(
                        model,
                        sample,
                        max_len=cfg.max_len,
                        batch_size=EVAL_BATCH_SIZE,
                        tokens=sample_tokens,
                    )
                model.train()
                if report_partial(point, {**sooner, **total}):
                    raise optuna.TrialPruned(f"pruned at {point} training examples")
                epoch_start += time.perf_counter() - eval_start  # samples/s: steps only
                clock.enter("train")
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # count the queued kernels in this epoch's time
        train_seconds += time.perf_counter() - epoch_start

        # Evaluate, record, let the pruner decide.
        clock.enter("evaluate")
        enter("eval")
        with autocast():
            metrics = evaluate(
                model,
                eval_set,
                max_len=cfg.max_len,
                batch_size=EVAL_BATCH_SIZE,
                tokens=full_tokens,
            )
        model.train()
        metrics["loss"] = loss_sum.item() / len(batches)
        metrics["examples_seen"] = float(axis.epoch_end(epoch))  # the pruner's step axis
        reported = {**metrics, **total}
        metrics = without_se(metrics)
        history.append({"epoch": float(epoch), **metrics})
        if report is not None and report(epoch, reported):
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")

    # The worker keeps the top-K models: save it, in the trial's time, unless K kept models
    # already beat it (it could never be kept).
    if cfg.save_dir and (cfg.save_bar is None or cfg.save_bar.passes(metrics)):
        clock.enter("save")
        save_trial_model(model, cfg, history)
    return TrainResult(
        metrics=metrics,
        history=history,
        peak_memory_mb=peak_memory_mb(device),
        seconds=time.perf_counter() - started,
        samples_per_s=trained / train_seconds if train_seconds > 0 else 0.0,
        timings=clock.stop(),
        padding_free=model.padding_free,
    )
