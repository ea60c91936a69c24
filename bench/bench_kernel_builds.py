"""oneDNN kernel builds in one real trial's training, with token counts bucketed and exact.

On a CPU, bf16 matmuls run through oneDNN, which builds (and JIT-compiles) a kernel for each new
shape. The padding-free step's matmuls have as many rows as the batch has real tokens, a count
new at nearly every step; ``search.train.unpadded`` rounds it up to one of
``BUCKETS_PER_OCTAVE`` sizes per octave. Each side runs the product's ``search.train.loop.train``
once, in a fresh process under ``ONEDNN_VERBOSE=profile_create`` (oneDNN prints each build and
its milliseconds), on the real all-MiniLM-L6-v2 and KLUE-NLI, batch 32, one hard negative, bf16
where ``search.record.precision`` says so, one thread; ``exact`` sets ``BUCKETS_PER_OCTAVE = 0``.
Printed per side: builds (cache misses) and their milliseconds, split into 2-d matmuls (the
token-wise layers), 3-d matmuls (attention blocks) and other primitives, and the trial's
``train`` and ``evaluate`` seconds (wall; these move with the machine, the build counts do not).
The sides alternate over ``--rounds``.

Run::

    python bench/bench_kernel_builds.py                         # max_len 64, 256 examples
    python bench/bench_kernel_builds.py --max-len 128 --samples 768 --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KLUE_JSON = ROOT.parent / "shared" / "data" / "klue-nli" / "klue-nli-v1.1_dev.json"
SIDES = ("bucketed", "exact")


def child(args: argparse.Namespace) -> None:
    """One trial's training, its timings as JSON on the last line of stdout."""
    sys.path.insert(0, str(ROOT))
    import torch
    from _minilm import minilm_config

    torch.set_num_threads(1)
    from search.train import unpadded
    from search.train.loop import train
    from search.train.nli_retrieval import klue_nli_to_retrieval

    if args.child == "exact":
        unpadded.BUCKETS_PER_OCTAVE = 0
    train_path, eval_dir = klue_nli_to_retrieval(
        KLUE_JSON, Path(args.work) / "klue", seed=args.seed
    )
    cfg = minilm_config(
        max_len=args.max_len,
        seed=args.seed,
        train_path=str(train_path),
        eval_dir=str(eval_dir),
        max_train_samples=args.samples,
    )
    result = train(cfg)
    print(json.dumps({"timings": result.timings, "ndcg": result.metrics["ndcg@10"]}), flush=True)


def run_side(side: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one side in a fresh process; parse oneDNN's build lines and the trial's timings."""
    env = os.environ | {
        "ONEDNN_VERBOSE": "profile_create",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [sys.executable, __file__, "--child", side, "--work", args.work]
    cmd += ["--max-len", str(args.max_len), "--samples", str(args.samples)]
    cmd += ["--seed", str(args.seed)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"bench_kernel_builds: the {side} trial failed:\n{proc.stderr[-2000:]}")
    builds = {"matmul 2-d": [0, 0.0], "matmul 3-d": [0, 0.0], "other": [0, 0.0]}
    for line in proc.stdout.splitlines():
        fields = line.split(",")
        if not line.startswith("onednn_verbose") or "create:cache_miss" not in fields:
            continue
        shapes = fields[-2].split(":")[0]
        kind = "other" if fields[5] != "matmul" else f"matmul {shapes.count('x') + 1}-d"
        builds[kind][0] += 1
        builds[kind][1] += float(fields[-1])
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"builds": builds, **last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--samples", type=int, default=256, help="training examples (batch 32)")
    parser.add_argument("--seed", type=int, default=0, help="KLUE split and training seed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work", default="/tmp/bench_kernel_builds")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.max_len < 1 or args.samples < 32 or args.rounds < 1:
        print(
            f"bench_kernel_builds: --max-len {args.max_len}, --samples {args.samples} and "
            f"--rounds {args.rounds} must be at least 1, 32 and 1",
            file=sys.stderr,
        )
        sys.exit(2)
    if args.child:
        child(args)
        return
    print(
        f"max_len {args.max_len}, {args.samples} examples, seed {args.seed}, batch 32, 1 thread, "
        f"{args.rounds} round(s), sides alternating",
        flush=True,
    )
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    for r in range(args.rounds):
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            out = run_side(side, args)
            results[side].append(out)
            parts = [f"{k} {n} builds {ms:.0f} ms" for k, (n, ms) in out["builds"].items()]
            t = out["timings"]
            print(
                f"  {side:<8} ({r + 1}) " + ", ".join(parts) + f"; train {t['train']:.2f} s, "
                f"evaluate {t['evaluate']:.2f} s, nDCG@10 {out['ndcg']:.4f}",
                flush=True,
            )
    totals = {s: [sum(ms for _, ms in o["builds"].values()) for o in results[s]] for s in SIDES}
    bucketed, exact = (statistics.median(totals[s]) for s in SIDES)
    print(
        f"build ms per trial, median: bucketed {bucketed:.0f}, exact {exact:.0f} "
        f"(bucketed/exact {bucketed / exact:.2f}x)"
    )


if __name__ == "__main__":
    main()
