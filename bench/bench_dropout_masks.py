"""Dropout's forward and backward with 16-bit vs 32-bit masks (``unpadded.MASK_BITS``), on CPU.

The product's ``search.train.unpadded.dropout`` at each ``MASK_BITS``, and ``F.dropout``
(``bernoulli_``, what transformers' forward runs) as the anchor, on the shapes one padding-free
step of all-MiniLM-L6-v2 drops: hidden states ``(tokens, 384)`` and attention probabilities
``(8 rows, 12 heads, width, width)``. Each round times every variant once per shape, in an order
that rotates between rounds (one torch thread, ``perf_counter``, forward + ``backward`` of a
sum); the headline is the median over rounds of the per-round ratio to 32-bit masks.

Run::

    python bench/bench_dropout_masks.py                      # bf16, p 0.1, 200 rounds
    python bench/bench_dropout_masks.py --dtype fp32 --p 0.3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"hidden (3000, 384)": (3000, 384), "attention (8, 12, 48, 48)": (8, 12, 48, 48)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    if not 0.0 < args.p < 1.0 or args.rounds < 1:
        print(
            f"bench_dropout_masks: --p {args.p} must be in (0, 1) and --rounds >= 1",
            file=sys.stderr,
        )
        sys.exit(2)

    import torch
    import torch.nn.functional as F

    from search.train import unpadded

    torch.set_num_threads(1)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    def product(bits: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            unpadded.MASK_BITS = bits
            return unpadded.dropout(x, args.p, True)

        return run

    variants = {
        "mask16": product(16),
        "mask32": product(32),
        "F.dropout": lambda x: F.dropout(x, args.p, True),
    }
    print(
        f"dtype {args.dtype}, p {args.p}, {args.rounds} rounds, 1 thread; "
        f"torch {torch.__version__}"
    )
    try:
        for label, shape in SHAPES.items():
            base = torch.randn(shape, dtype=dtype)
            seconds: dict[str, list[float]] = {name: [] for name in variants}
            names = list(variants)
            for r in range(args.rounds + 1):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    x = base.clone().requires_grad_()
                    start = time.perf_counter()
                    variants[name](x).sum().backward()
                    if r:  # round 0 warms up
                        seconds[name].append(time.perf_counter() - start)
            line = [f"{label:<26}"]
            for name in names:
                med = statistics.median(seconds[name]) * 1e3
                ratio = statistics.median(
                    a / b for a, b in zip(seconds[name], seconds["mask32"], strict=True)
                )
                line.append(f"{name} {med:6.3f} ms ({ratio:.2f}x of mask32)")
            print("  ".join(line), flush=True)
    finally:
        unpadded.MASK_BITS = 16


if __name__ == "__main__":
    main()
