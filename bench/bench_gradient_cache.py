"""Throughput cost of the gradient cache against the plain step at equal batch, on CPU.

Both sides run ``search.train.loop.train_step`` (forward, InfoNCE, backward, clip, AdamW) on
the same replica (``search.train.tiny``, default 4 layers x 384 hidden) and the same batch
(``--batch`` Korean-syllable queries, as many positives and one hard negative each, padded to
``--max-len``), in one process, alternating plain and cached steps over ``--rounds`` rounds
(the first round is a warm-up and not counted). The headline is the median of the per-round
ratios cached / plain step seconds (each round's two steps share the machine's load of that
moment), in process CPU seconds (``--clock cpu``, the default: the work done on one thread,
robust to other jobs on the machine) or wall seconds.

Anchor: the expected cost, "one extra forward pass", is measured in the same rounds: the
forward pass of the batch without gradients (what the cache adds), so expected ratio =
1 + forward / plain step. A third side runs the cache with one mini-batch of the whole batch
(``rows`` = every row): the extra forward pass alone, without the mini-batches' different
shapes (on CPU, small mini-batches can run faster per row than one large pass: its attention
matrices leave the caches).

Run::

    python bench/bench_gradient_cache.py                    # batch 64, mini-batch 16
    python bench/bench_gradient_cache.py --batch 128 --rows 32 --rounds 7
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "multilingual-minilm"
MID_DIMS = {"num_layers": 4, "hidden": 384, "heads": 12, "ffn": 1536, "vocab_size": 8000}


def _sentences(n: int, words: int, rng: random.Random) -> list[str]:
    syllables = [chr(0xAC00 + i * 37) for i in range(300)]
    return [
        " ".join(
            "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(words)
        )
        for _ in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rows", type=int, default=16, help="the cache's mini-batch")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6, help="the first is a warm-up")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--tiny", action="store_true", help="2 layers x 64 hidden (quick)")
    args = parser.parse_args()

    import torch

    from search.record.config import TrialConfig
    from search.record.models import MODELS
    from search.train.encoder import BiEncoder
    from search.train.loop import StepBatch
    from search.train.loop import make_optimizer
    from search.train.loop import make_scaler
    from search.train.loop import train_step
    from search.train.tiny import TINY_DIMS
    from search.train.tiny import build_tiny_replica

    torch.set_num_threads(args.threads)
    clock: Callable[[], float] = time.process_time if args.clock == "cpu" else time.perf_counter
    rng = random.Random(0)
    queries = _sentences(args.batch, 12, rng)
    passages = _sentences(2 * args.batch, 60, rng)
    dims = TINY_DIMS if args.tiny else MID_DIMS
    work = Path(tempfile.mkdtemp(prefix="bench-gradcache-"))
    replica = build_tiny_replica(MODELS[MODEL], work, queries + passages, **dims)
    info = MODELS[MODEL]
    cfg = TrialConfig(
        model=MODEL,
        model_path=str(replica),
        batch_size=args.batch,
        max_len=args.max_len,
        lr=1e-5,
        temperature=0.05,
        warmup_ratio=0.0,
        weight_decay=0.01,
        epochs=1,
        amp=False,
        gradient_checkpointing=False,
        hard_negatives=1,
        seed=0,
        device="cpu",
        train_path="unused",
        eval_dir="unused",
        pooling=info.pooling,
        normalize=info.normalize,
    )
    model = BiEncoder.from_config(cfg)
    model.train()
    q = model.tokenize(queries, kind="query", max_len=args.max_len, pad_to_max_length=True)
    p = model.tokenize(passages, kind="passage", max_len=args.max_len, pad_to_max_length=True)
    batch = StepBatch((q["input_ids"], q["attention_mask"]), (p["input_ids"], p["attention_mask"]))
    optimizer = make_optimizer(model, cfg)
    scaler = make_scaler(torch.device("cpu"), None)
    cached_cfg = dataclasses.replace(cfg, gradient_cache=args.rows)
    whole_cfg = dataclasses.replace(cfg, gradient_cache=3 * args.batch)  # one mini-batch

    def timed(fn: Callable[[], object]) -> float:
        start = clock()
        fn()
        return clock() - start

    def forward() -> None:
        with torch.no_grad():
            model(*batch.queries)
            model(*batch.passages)

    print(
        f"replica L{dims['num_layers']} H{dims['hidden']}, batch {args.batch} queries + "
        f"{2 * args.batch} passages x {args.max_len} tokens, cache mini-batch {args.rows}, "
        f"{args.threads} thread(s), {args.clock} clock"
    )
    ratios: list[float] = []
    whole_ratios: list[float] = []
    expected: list[float] = []
    for r in range(args.rounds):
        plain = timed(lambda: train_step(model, batch, cfg, optimizer, scaler))
        cached = timed(lambda: train_step(model, batch, cached_cfg, optimizer, scaler))
        whole = timed(lambda: train_step(model, batch, whole_cfg, optimizer, scaler))
        fwd = timed(forward)
        tag = "warm-up" if r == 0 else f"round {r}"
        print(
            f"{tag}: plain {plain:.2f} s, cached {cached:.2f} s ({cached / plain:.2f}x), "
            f"cached in one mini-batch {whole:.2f} s ({whole / plain:.2f}x), "
            f"no-grad forward {fwd:.2f} s (expected {1 + fwd / plain:.2f}x)"
        )
        if r:
            ratios.append(cached / plain)
            whole_ratios.append(whole / plain)
            expected.append(1 + fwd / plain)

    def median(values: list[float]) -> str:
        return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"

    print(
        f"step time / plain at batch {args.batch} over {len(ratios)} paired rounds, median "
        f"(range): cached in mini-batches of {args.rows} {median(ratios)}; cached in one "
        f"mini-batch {median(whole_ratios)}; anchor, one extra forward pass {median(expected)}"
    )


if __name__ == "__main__":
    main()
