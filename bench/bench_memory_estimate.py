"""Measured peak training memory vs ``search.memory.estimate`` (issue 3's GPU item, 15% target).

For each point of a grid (model x size x batch x max_len x memory savers) one child process
runs the worst-case training step of a trial - queries, positives and ``--hard-negatives``
negatives all at ``max_len``, InfoNCE, backward, gradient clipping, AdamW - and reports its
real peak; the parent compares it with ``estimate_peak_memory`` and prints one line per point
and a summary against the target (estimate within 15% of the measured peak).

* **sizes**: ``tiny`` is the model's offline replica (``search.train.tiny``, default dims),
  loaded by ``BiEncoder.from_config`` exactly as a ``--tiny`` trial loads it; ``full`` is the
  real architecture (the dims of ``search.record.models.MODELS``) built with random weights from a
  ``RobertaConfig`` / ``XLMRobertaConfig`` / ``BertConfig`` on the device - no download. Inputs
  are synthetic token ids over the model's vocabulary (only shapes matter); the tokenizer is
  the replica's, for ``BiEncoder``'s checks.
* **the step**: the objective's pieces (``BiEncoder``, ``autocast_dtype``, ``InfoNCELoss``,
  fused AdamW, the gradient scaler for fp16, clipping). It runs twice: the first step is the
  trial's fail-fast step (``step1`` column), the second holds AdamW's moments during its
  forward and backward passes - the steady state that the estimate sums.
* **isolation**: each point runs in a fresh child through ``search.worker.isolation.run_isolated``
  (children of a forkserver that imported torch once and never touched CUDA), so peaks never
  mix, a CUDA OOM is recorded as ``OOM`` and the grid goes on, and ``--timeout`` kills a hung
  point.
* **measured**: CUDA: ``torch.cuda.max_memory_allocated`` (peak from a
  ``reset_peak_memory_stats`` before the model is built) plus the CUDA context and library
  workspaces outside the allocator (``total - free`` of ``mem_get_info`` minus
  ``memory_reserved``, after the steps; run on an otherwise idle GPU); the estimate counts the
  context too. CPU: the child's peak resident memory (``VmHWM``) above its resident memory after
  imports, as ``search.worker.isolation`` records it - what the CPU estimate models.

Run::

    # the GPU session (one H100: 64 points, about 5 minutes):
    python bench/bench_memory_estimate.py --json memory_estimate_gpu.json
    # the CPU check (one model, tiny only), and one full-size CPU point:
    python bench/bench_memory_estimate.py --device cpu --quick
    python bench/bench_memory_estimate.py --device cpu --models ko-simcse --sizes full \\
        --batches 4 --lens 64

Prints per point: model, size, batch, max_len, amp, ckpt, autocast dtype, measured MiB (CUDA:
with its allocator peak, reserved peak and context), estimate MiB, ratio estimate / measured;
then the share of points within 15%, the min and max ratio, and the verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    import torch

    from search.record.config import TrialConfig
    from search.record.models import ModelInfo
    from search.train.encoder import BiEncoder

MIB = 1024**2
TARGET = 0.15  # the estimate within 15% of the measured peak (issue 3)
STEPS = 2  # worst-case steps per point: the fail-fast step, then one with AdamW's moments
DTYPES = ("fp32", "bf16", "fp16")  # autocast dtype of a point, sent back by index
OBJECTIVES = {"tiny": "bench_memory_estimate:step_tiny", "full": "bench_memory_estimate:step_full"}
# Memory savers by name: (amp, gradient_checkpointing).
SAVERS: dict[str, tuple[bool, bool]] = {
    "fp32": (False, False),
    "ckpt": (False, True),
    "amp": (True, False),
    "amp+ckpt": (True, True),
}
KO_DEMO_TRAIN = ROOT / "search" / "studies" / "data" / "ko-demo" / "train.jsonl"


@dataclass
class Point:
    """One measured (or failed) grid point and its estimate; sizes in MiB.

    Args:
        model: Short model name.
        size: ``tiny`` or ``full``.
        batch: Queries per batch.
        max_len: Tokens of every query, positive and negative.
        amp: The trial's ``amp`` setting.
        ckpt: Gradient checkpointing.
        status: ``ok``, ``OOM``, ``timeout``, ``killed`` or ``failed``.
        estimate_mb: ``estimate_peak_memory(...).total_mb``.
        measured_mb: The peak to compare (see the module docstring); None unless ``ok``.
        dtype: Autocast dtype the step ran with (``fp32`` when autocast is off).
        step1_mb: Peak after the first (fail-fast) step, on the same scale as ``measured_mb``.
        allocated_mb: CUDA: peak of ``max_memory_allocated``.
        reserved_mb: CUDA: peak of ``max_memory_reserved``.
        context_mb: CUDA: device memory outside the allocator (context, library workspaces).
        device_total_mb: CUDA: the device's memory.
        baseline_mb: CPU: the child's resident memory after imports (subtracted from its peak).
        seconds: Wall seconds of the child, start to exit.
        error: One line on what went wrong, unless ``ok``.
        estimate_parts_mb: The estimate by part.
    """

    model: str
    size: str
    batch: int
    max_len: int
    amp: bool
    ckpt: bool
    status: str
    estimate_mb: float
    measured_mb: float | None = None
    dtype: str = ""
    step1_mb: float | None = None
    allocated_mb: float | None = None
    reserved_mb: float | None = None
    context_mb: float | None = None
    device_total_mb: float | None = None
    baseline_mb: float | None = None
    seconds: float = 0.0
    error: str | None = None
    estimate_parts_mb: dict[str, float] | None = None

    @property
    def ratio(self) -> float | None:
        """Estimate / measured (above 1: the estimate is high)."""
        if self.measured_mb is None or self.measured_mb <= 0:
            return None
        return self.estimate_mb / self.measured_mb


# ------------------------------------------------------------------------ the child side


def step_tiny(cfg: TrialConfig, **kwargs: Any) -> dict[str, Any]:
    """Objective of a tiny point: the replica at ``cfg.model_path``, loaded as a trial does."""
    from search.train.encoder import BiEncoder

    return _measure(cfg, BiEncoder.from_config, **kwargs)


def step_full(cfg: TrialConfig, **kwargs: Any) -> dict[str, Any]:
    """Objective of a full-size point: the real architecture with random weights."""
    return _measure(cfg, _full_size_encoder, **kwargs)


def _full_size_encoder(cfg: TrialConfig) -> BiEncoder:
    """``MODELS[cfg.model]``'s architecture, randomly initialised on ``cfg.device``, no download.

    The tokenizer at ``cfg.model_path`` (a replica's) only serves ``BiEncoder``'s checks: the
    inputs are synthetic ids over the full vocabulary.
    """
    import torch
    from transformers import AutoTokenizer
    from transformers import BertConfig
    from transformers import BertModel
    from transformers import RobertaConfig
    from transformers import RobertaModel
    from transformers import XLMRobertaConfig
    from transformers import XLMRobertaModel

    from search.record.models import MODELS
    from search.train.encoder import BiEncoder
    from search.train.encoder import _enable_checkpointing
    from search.train.loop import resolve_device

    info = MODELS[cfg.model]
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
    common: dict[str, Any] = {
        "vocab_size": info.vocab,
        "hidden_size": info.hidden,
        "num_hidden_layers": info.num_layers,
        "num_attention_heads": info.heads,
        "intermediate_size": info.ffn,
        "max_position_embeddings": info.max_positions,
        "pad_token_id": tokenizer.pad_token_id,
        "attn_implementation": "sdpa",  # as BiEncoder.from_config loads real weights
    }
    model: torch.nn.Module
    with torch.device(resolve_device(cfg.device)):  # initialised on the device: fast on a GPU
        if info.architecture == "roberta":
            model = RobertaModel(RobertaConfig(**common, type_vocab_size=1, layer_norm_eps=1e-5))
        elif info.architecture == "xlm-roberta":
            xlmr = XLMRobertaConfig(**common, type_vocab_size=1, layer_norm_eps=1e-5)
            model = XLMRobertaModel(xlmr)
        else:
            model = BertModel(BertConfig(**common, type_vocab_size=2, layer_norm_eps=1e-12))
    if cfg.gradient_checkpointing:
        _enable_checkpointing(model)  # the objective's own switch (non-reentrant checkpoints)
    return BiEncoder(
        model,
        tokenizer,
        pooling=cfg.pooling,
        normalize=cfg.normalize,
        query_prefix=cfg.query_prefix,
        passage_prefix=cfg.passage_prefix,
    )


def _synthetic_ids(
    encoder: BiEncoder, rows: int, seq: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, seq)`` random ids over the vocabulary, never the padding id, and a full mask."""
    import torch

    config = encoder.model.config
    pad = int(config.pad_token_id)
    ids = torch.randint(0, int(config.vocab_size) - 1, (rows, seq))  # (rows, seq)
    ids[ids >= pad] += 1  # skip the padding id: RoBERTa positions count non-padding tokens
    mask = torch.ones_like(ids)  # (rows, seq): every row at max_len, the worst case
    return ids.to(device), mask.to(device)


def _vm_hwm_mb() -> float:
    """The process' peak resident memory (``VmHWM``), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _measure(
    cfg: TrialConfig,
    build: Callable[[TrialConfig], BiEncoder],
    *,
    on_phase: Callable[[str], None] | None = None,
    **_: Any,
) -> dict[str, Any]:
    """Run ``STEPS`` worst-case training steps of ``cfg`` and return the peaks (the child)."""
    import torch

    from search.train.loop import ADAM_BETAS
    from search.train.loop import ADAM_EPS
    from search.train.loop import GRAD_CLIP
    from search.train.loop import autocast_dtype
    from search.train.loop import resolve_device
    from search.train.loop import seed_everything
    from search.train.losses import InfoNCELoss

    def enter(name: str) -> None:
        if on_phase is not None:
            on_phase(name)

    device = resolve_device(cfg.device)
    cuda = device.type == "cuda"
    seed_everything(cfg.seed)
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)

    # Model, inputs, loss, optimizer: what the objective's first step holds.
    enter("load")
    encoder = build(cfg).to(device)
    encoder.train()
    amp_dtype = autocast_dtype(device, cfg.amp, hidden=encoder.embedding_dim)
    n_passages = cfg.batch_size * (1 + cfg.hard_negatives)
    q_ids, q_mask = _synthetic_ids(encoder, cfg.batch_size, cfg.max_len, device)
    p_ids, p_mask = _synthetic_ids(encoder, n_passages, cfg.max_len, device)
    loss_fn = InfoNCELoss(cfg.temperature)
    optimizer = torch.optim.AdamW(
        encoder.parameters(),
        lr=cfg.lr,
        betas=ADAM_BETAS,
        eps=ADAM_EPS,
        weight_decay=cfg.weight_decay,
        fused=True,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    peaks: list[float] = []
    for _step in range(STEPS):
        # Forward: queries, then positives and hard negatives in one pass.
        enter("forward")
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            q_emb = encoder(q_ids, q_mask)  # (batch, hidden)
            p_emb = encoder(p_ids, p_mask)  # (batch * (1 + negatives), hidden)
            n = q_emb.shape[0]
            loss = loss_fn(q_emb, p_emb[:n], p_emb[n:])
        # Backward.
        enter("backward")
        scaler.scale(loss).backward()
        # Optimizer: unscale, clip, step.
        enter("optimizer")
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), GRAD_CLIP)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        del q_emb, p_emb, loss
        if cuda:
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) / MIB)
        else:
            peaks.append(_vm_hwm_mb())

    dtype = DTYPES.index({None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype])
    metrics: dict[str, float] = {"dtype": float(dtype), "step1_mb": peaks[0]}
    if not cuda:
        return {"metrics": metrics, "peak_memory_mb": None}  # the parent reads VmHWM
    free, total = torch.cuda.mem_get_info(device)
    reserved_now = torch.cuda.memory_reserved(device)
    metrics.update(
        allocated_mb=peaks[-1],
        reserved_mb=torch.cuda.max_memory_reserved(device) / MIB,
        context_mb=(total - free - reserved_now) / MIB,
        device_total_mb=total / MIB,
    )
    return {"metrics": metrics, "peak_memory_mb": peaks[-1]}


# ----------------------------------------------------------------------- the parent side


def _trial_config(
    model: str, model_path: str, batch: int, max_len: int, savers: tuple[bool, bool], args: Any
) -> TrialConfig:
    """The effective config of one point (the study's training defaults otherwise)."""
    from search.record.config import TrialConfig
    from search.record.models import MODELS

    info = MODELS[model]
    amp, ckpt = savers
    return TrialConfig(
        model=model,
        model_path=model_path,
        batch_size=batch,
        max_len=max_len,
        lr=2e-5,
        temperature=0.05,
        warmup_ratio=0.0,
        weight_decay=0.01,
        epochs=1,
        amp=amp,
        gradient_checkpointing=ckpt,
        hard_negatives=args.hard_negatives,
        seed=0,
        device=args.device,
        train_path=str(KO_DEMO_TRAIN),
        eval_dir=str(KO_DEMO_TRAIN.parent),
        pooling=info.pooling,
        normalize=info.normalize,
        query_prefix=info.query_prefix,
        passage_prefix=info.passage_prefix,
    )


def measure_point(
    cfg: TrialConfig, size: str, arch: ModelInfo, *, device_type: str, timeout: float
) -> Point:
    """Run one point in a fresh child and compare its peak with the estimate.

    Args:
        cfg: The point's config (``model_path``: the replica, also the tokenizer of ``full``).
        size: ``tiny`` or ``full``.
        arch: The facts the estimate reads (``tiny_info`` of the replica, or the real model).
        device_type: ``cuda`` or ``cpu``.
        timeout: Seconds before the child is killed.

    Returns:
        The point; ``measured_mb`` is set when the child finished its steps.
    """
    from search.memory.estimate import estimate_peak_memory
    from search.worker.isolation import run_isolated

    estimate = estimate_peak_memory(arch, cfg, device_type=device_type)
    point = Point(
        model=cfg.model,
        size=size,
        batch=cfg.batch_size,
        max_len=cfg.max_len,
        amp=cfg.amp,
        ckpt=cfg.gradient_checkpointing,
        status="failed",
        estimate_mb=estimate.total_mb,
        estimate_parts_mb={k: v / MIB for k, v in estimate.as_dict().items()},
    )
    outcome = run_isolated(cfg, objective=OBJECTIVES[size], timeout=timeout)
    point.seconds = outcome.seconds
    point.error = outcome.error
    if outcome.status == "oom":
        point.status = "OOM"
        return point
    if outcome.status == "killed":
        timed_out = (outcome.error or "").startswith("timeout")
        point.status = "timeout" if timed_out else "killed"
        return point
    if outcome.status != "complete":
        return point
    m = outcome.metrics
    point.status = "ok"
    point.dtype = DTYPES[int(m["dtype"])]
    if device_type == "cuda":
        point.allocated_mb = m["allocated_mb"]
        point.reserved_mb = m["reserved_mb"]
        point.context_mb = m["context_mb"]
        point.device_total_mb = m["device_total_mb"]
        point.measured_mb = m["allocated_mb"] + m["context_mb"]
        point.step1_mb = m["step1_mb"] + m["context_mb"]
    else:
        baseline = outcome.baseline_memory_mb or 0.0
        point.baseline_mb = baseline
        point.measured_mb = (outcome.peak_memory_mb or 0.0) - baseline
        point.step1_mb = m["step1_mb"] - baseline
    return point


HEADER = (
    f"{'model':<22} {'size':<4} {'batch':>5} {'len':>4} {'amp':<3} {'ckpt':<4} {'dtype':<5} "
    f"{'measured':>9} {'step1':>9} {'alloc':>9} {'reserved':>9} {'context':>7} "
    f"{'estimate':>9} {'ratio':>6}"
)


def _mb(value: float | None, width: int) -> str:
    return f"{value:>{width}.0f}" if value is not None else f"{'-':>{width}}"


def format_point(p: Point) -> str:
    """One line of the table (MiB; ratio = estimate / measured)."""
    head = (
        f"{p.model:<22} {p.size:<4} {p.batch:>5} {p.max_len:>4} {'on' if p.amp else 'off':<3} "
        f"{'on' if p.ckpt else 'off':<4} {p.dtype or '-':<5} "
    )
    if p.status != "ok":
        why = f"  ({p.error})" if p.error and p.status not in ("OOM",) else ""
        return head + f"{p.status:>9} {'':>9} {'':>9} {'':>9} {'':>7} {p.estimate_mb:>9.0f}" + why
    ratio = p.ratio
    return head + (
        f"{_mb(p.measured_mb, 9)} {_mb(p.step1_mb, 9)} {_mb(p.allocated_mb, 9)} "
        f"{_mb(p.reserved_mb, 9)} {_mb(p.context_mb, 7)} {p.estimate_mb:>9.0f} "
        f"{ratio:>6.3f}"
        if ratio is not None
        else f"{_mb(p.measured_mb, 9)}"
    )


def summarize(points: list[Point]) -> list[str]:
    """The summary lines: share within the target, ratio range, OOMs, verdict."""
    ratios = [r for p in points if (r := p.ratio) is not None]
    lines = []
    if ratios:
        within = sum(abs(r - 1.0) <= TARGET for r in ratios)
        lines.append(
            f"within {TARGET:.0%}: {within}/{len(ratios)} measured points "
            f"({within / len(ratios):.0%}); ratio estimate/measured min {min(ratios):.3f}, "
            f"max {max(ratios):.3f}"
        )
    ooms = [p for p in points if p.status == "OOM"]
    if ooms:
        totals = [p.device_total_mb for p in points if p.device_total_mb]
        device = max(totals) if totals else None
        if device is not None:
            over = sum(p.estimate_mb > device for p in ooms)
            lines.append(f"OOM: {len(ooms)} points, estimate above device memory at {over}")
        else:
            lines.append(f"OOM: {len(ooms)} points")
    other = [p for p in points if p.status not in ("ok", "OOM")]
    if other:
        lines.append(f"not measured: {len(other)} points ({', '.join(p.status for p in other)})")
    if not ratios:
        lines.append("verdict: no point measured")
    elif all(abs(r - 1.0) <= TARGET for r in ratios):
        lines.append(f"verdict: PASS - every measured point within {TARGET:.0%} of the estimate")
    else:
        lines.append(f"verdict: FAIL - some measured points are off by more than {TARGET:.0%}")
    return lines


def _csv(text: str, cast: Callable[[str], Any] = str) -> list[Any]:
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    from search.record.models import MODELS

    def default_device() -> str:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"  # no CUDA context is created

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names")
    parser.add_argument("--sizes", default="tiny,full", help="tiny, full or both")
    parser.add_argument("--batches", default="8,32", help="queries per batch")
    parser.add_argument("--lens", default="128,256", help="max_len values")
    parser.add_argument(
        "--savers",
        default="amp+ckpt,amp",
        help=f"memory savers per point, comma-separated: {', '.join(SAVERS)}",
    )
    parser.add_argument("--hard-negatives", type=int, default=1, help="per query (the study's)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per point")
    parser.add_argument("--quick", action="store_true", help="one model (the first), tiny only")
    parser.add_argument("--cache-dir", type=Path, default=None, help="tiny replicas (reused)")
    parser.add_argument("--json", type=Path, default=None, help="write every point here")
    args = parser.parse_args(argv)
    args.device = args.device or default_device()
    args.models = _csv(args.models)
    args.sizes = _csv(args.sizes)
    args.batches = _csv(args.batches, int)
    args.lens = _csv(args.lens, int)
    args.savers = _csv(args.savers)
    for name in args.models:
        if name not in MODELS:
            parser.error(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    for size in args.sizes:
        if size not in OBJECTIVES:
            parser.error(f"unknown size {size!r}; use tiny, full")
    for saver in args.savers:
        if saver not in SAVERS:
            parser.error(f"unknown saver {saver!r}; use {', '.join(SAVERS)}")
    if args.quick:
        args.models, args.sizes = args.models[:1], ["tiny"]
    return args


def main(argv: list[str] | None = None) -> None:
    """Measure the grid and print the table and the summary."""
    args = parse_args(argv)
    started = time.perf_counter()
    import transformers

    from search.record.models import MODELS
    from search.train.data import load_train
    from search.train.tiny import build_tiny_replica
    from search.train.tiny import tiny_info
    from search.worker.isolation import warm_up

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        cache = args.cache_dir or Path(tmp)
        texts = [t for e in load_train(KO_DEMO_TRAIN) for t in (e.query, e.positive, *e.negatives)]
        replicas = {m: str(build_tiny_replica(MODELS[m], cache, texts)) for m in args.models}
        warm_up(OBJECTIVES["tiny"])
        print(
            f"device {args.device}; {STEPS} worst-case steps per point, {args.hard_negatives} "
            f"hard negative(s); sizes in MiB; ratio = estimate / measured; target within "
            f"{TARGET:.0%}"
        )
        print(HEADER, flush=True)
        points: list[Point] = []
        for model in args.models:
            for size in args.sizes:
                arch = tiny_info(MODELS[model]) if size == "tiny" else MODELS[model]
                for batch in args.batches:
                    for max_len in args.lens:
                        for saver in args.savers:
                            cfg = _trial_config(
                                model, replicas[model], batch, max_len, SAVERS[saver], args
                            )
                            point = measure_point(
                                cfg, size, arch, device_type=args.device, timeout=args.timeout
                            )
                            points.append(point)
                            print(format_point(point), flush=True)
    for line in summarize(points):
        print(line)
    total = time.perf_counter() - started
    print(f"total runtime {total:.1f} s ({len(points)} points)")
    if args.json is not None:
        rows = [asdict(p) | {"ratio": p.ratio} for p in points]
        payload = {"device": args.device, "steps": STEPS, "seconds": total, "points": rows}
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
