"""Training throughput and peak memory: our objective vs sentence-transformers' trainer, on CPU.

Both train the same replica (built by ``search.train.tiny``) on the same KLUE-NLI pairs (built by
``search.train.nli_retrieval``: premise -> entailment, contradiction as hard negative) with the
same batch size, max length, optimizer (fused AdamW), schedule, precision and thread count. Each
side runs in a fresh subprocess so that its peak RSS is its own; the sides alternate over
``--repeats`` rounds and the best round of each is compared (the machine is shared).

Anchor: sentence-transformers' ``SentenceTransformerTrainer`` with
``MultipleNegativesRankingLoss`` (needs ``sentence-transformers[train]``: datasets, accelerate).
Throughput counts the training steps only (ours: ``TrainResult.samples_per_s``; theirs: from
``on_train_begin`` to ``on_train_end``), in CPU seconds of the process by default
(``--clock cpu``: with one thread this is the work done, unlike wall time on a machine shared
with other jobs) or wall seconds (``--clock wall``); ``wall`` is each subprocess' whole run.

Run::

    python bench/bench_train_throughput.py                 # objective vs sentence-transformers
    python bench/bench_train_throughput.py --precision     # our objective, fp32 vs bf16 autocast

Prints one line per run and the ratios ours / theirs (throughput: higher is better; peak
memory: lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
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
MID_DIMS = {"num_layers": 4, "hidden": 384, "heads": 12, "ffn": 1536, "vocab_size": 8000}
TINY_DIMS = {"num_layers": 2, "hidden": 64, "heads": 4, "ffn": 128, "vocab_size": 4000}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _CpuClock:
    """Stands in for the ``time`` module in the loop: ``perf_counter`` reads CPU time."""

    perf_counter = staticmethod(time.process_time)


def _count_training_tokens() -> list[int]:
    """Count the (padded) tokens fed to the word embeddings in training mode, whoever trains.

    A global forward pre-hook on ``nn.Embedding``: the same count for both sides, independent
    of the machine's load. Position and token-type tables (512 rows or fewer) are skipped.
    """
    import torch

    tokens = [0]

    def count(module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
        if isinstance(module, torch.nn.Embedding) and module.training:
            if module.num_embeddings > 1024 and inputs and isinstance(inputs[0], torch.Tensor):
                tokens[0] += inputs[0].numel()

    torch.nn.modules.module.register_module_forward_pre_hook(count)
    return tokens


def prepare(work: Path, model: str, dims: dict[str, int]) -> dict[str, str]:
    """KLUE retrieval files and the replica (built once, reused)."""
    from search.models import MODELS
    from search.train.data import load_train
    from search.train.nli_retrieval import klue_nli_to_retrieval
    from search.train.tiny import build_tiny_replica

    train_path, eval_dir = klue_nli_to_retrieval(KLUE_JSON, work / "klue")
    texts = [t for e in load_train(train_path) for t in (e.query, e.positive, *e.negatives)]
    replica = build_tiny_replica(MODELS[model], work / "replicas", texts, **dims)
    return {"train_path": str(train_path), "eval_dir": str(eval_dir), "model_path": str(replica)}


def _examples(args: argparse.Namespace) -> list[Any]:
    """The benchmark's training examples: those with a hard negative, first ``--samples``."""
    from search.train.data import load_train

    examples = [e for e in load_train(args.train_path) if e.negatives]
    return examples[: args.samples]


def run_ours(args: argparse.Namespace) -> dict[str, float]:
    """Train with ``search.train.loop.train``; eval on a few queries (outside the timing)."""
    import torch

    torch.set_num_threads(args.threads)
    from search.config import TrialConfig
    from search.models import MODELS
    from search.train import loop
    from search.train.data import EvalSet
    from search.train.data import load_eval

    if args.clock == "cpu":  # the loop's timer counts this process' CPU seconds instead
        loop.time = _CpuClock()  # type: ignore[assignment]
    if args.force_precision:  # bypass the CPU rule, to measure both precisions
        forced = torch.bfloat16 if args.force_precision == "bf16" else None

        def forced_dtype(device: torch.device, amp: bool, *, hidden: int) -> torch.dtype | None:
            return forced

        loop.autocast_dtype = forced_dtype
    tokens = _count_training_tokens()
    start = time.perf_counter()
    info = MODELS[args.model]
    full = load_eval(args.eval_dir, "test")
    qids = list(full.queries)[:8]
    qrels = {q: full.qrels[q] for q in qids}
    docs = {d for q in qids for d in qrels[q]} | set(list(full.corpus)[:32])
    eval_set = EvalSet(
        {d: full.corpus[d] for d in docs}, {q: full.queries[q] for q in qids}, qrels
    )
    cfg = TrialConfig(
        model=args.model,
        model_path=args.model_path,
        batch_size=args.batch_size,
        max_len=args.max_len,
        lr=args.lr,
        temperature=0.05,
        warmup_ratio=0.1,
        weight_decay=0.01,
        epochs=args.epochs,
        amp=args.amp,
        gradient_checkpointing=False,
        hard_negatives=1,
        seed=0,
        device="cpu",
        train_path=args.train_path,
        eval_dir=args.eval_dir,
        pooling=info.pooling,
        normalize=info.normalize,
        query_prefix=info.query_prefix,
        passage_prefix=info.passage_prefix,
        fail_fast=args.fail_fast,
    )
    result = loop.train(cfg, train_examples=_examples(args), eval_set=eval_set)
    return {
        "samples_per_s": result.samples_per_s,
        "peak_rss_mb": _peak_rss_mb(),
        "wall_s": time.perf_counter() - start,
        "loss": result.metrics["loss"],
        "tokens": tokens[0],
    }


def run_st(args: argparse.Namespace) -> dict[str, float]:
    """Train with SentenceTransformerTrainer + MultipleNegativesRankingLoss."""
    import torch

    torch.set_num_threads(args.threads)
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.modules import Normalize
    from sentence_transformers.sentence_transformer.modules import Pooling
    from sentence_transformers.sentence_transformer.modules import Transformer
    from transformers import TrainerCallback

    from search.models import MODELS

    tokens = _count_training_tokens()
    start = time.perf_counter()
    info = MODELS[args.model]
    transformer = Transformer(args.model_path, max_seq_length=args.max_len)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), info.pooling)]
    if info.normalize:
        modules.append(Normalize())
    model = SentenceTransformer(modules=modules, device="cpu")
    examples = _examples(args)
    dataset = Dataset.from_dict(
        {
            "anchor": [info.query_prefix + e.query for e in examples],
            "positive": [info.passage_prefix + e.positive for e in examples],
            "negative": [info.passage_prefix + e.negatives[0] for e in examples],
        }
    )
    loss = MultipleNegativesRankingLoss(model, scale=1 / 0.05)
    times: dict[str, float] = {}

    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            times["begin"] = clock()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            times["end"] = clock()

    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(Path(args.work) / "st-out"),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        warmup_steps=0.1,  # a float is a ratio in transformers v5
        weight_decay=0.01,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        bf16=args.amp,
        use_cpu=True,
        dataloader_drop_last=True,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=dataset, loss=loss, callbacks=[Clock()]
    )
    out = trainer.train()
    steps = trainer.state.global_step
    return {
        "samples_per_s": steps * args.batch_size / (times["end"] - times["begin"]),
        "peak_rss_mb": _peak_rss_mb(),
        "wall_s": time.perf_counter() - start,
        "loss": float(out.training_loss),
        "tokens": tokens[0],
    }


def _child(args: argparse.Namespace, side: str, **overrides: Any) -> dict[str, float]:
    """Run one side in a fresh interpreter and read back its JSON line."""
    opts = vars(args) | overrides
    cmd = [sys.executable, __file__, "--side", side]
    for key in ("model", "model_path", "train_path", "eval_dir", "work"):
        cmd += [f"--{key.replace('_', '-')}", str(opts[key])]
    for key in ("batch_size", "max_len", "samples", "epochs", "threads", "lr"):
        cmd += [f"--{key.replace('_', '-')}", str(opts[key])]
    cmd += ["--clock", opts["clock"], "--amp" if opts["amp"] else "--no-amp"]
    cmd += ["--fail-fast" if opts["fail_fast"] else "--no-fail-fast"]
    if opts.get("force_precision"):
        cmd += ["--force-precision", opts["force_precision"]]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _line(name: str, r: dict[str, float]) -> str:
    return (
        f"{name:<28} {r['samples_per_s']:8.1f} samples/s  peak RSS {r['peak_rss_mb']:7.0f} MB"
        f"  wall {r['wall_s']:6.1f} s  loss {r['loss']:.3f}  tokens {r['tokens']:.0f}"
    )


def _best(runs: list[dict[str, float]]) -> dict[str, float]:
    """The round with the highest throughput (least disturbed by other load)."""
    return max(runs, key=lambda r: r["samples_per_s"])


def compare_st(args: argparse.Namespace) -> None:
    """Ours vs sentence-transformers, alternating, best of ``--repeats`` each."""
    paths = prepare(Path(args.work), args.model, MID_DIMS if not args.tiny else TINY_DIMS)
    vars(args).update(paths)
    ours: list[dict[str, float]] = []
    theirs: list[dict[str, float]] = []
    for i in range(args.repeats):
        ours.append(_child(args, "ours"))
        print(_line(f"ours (round {i + 1})", ours[-1]), flush=True)
        theirs.append(_child(args, "st"))
        print(_line(f"sentence-transformers ({i + 1})", theirs[-1]), flush=True)
    o, t = _best(ours), _best(theirs)
    print(_line("ours (best)", o))
    print(_line("sentence-transformers (best)", t))
    speed = o["samples_per_s"] / t["samples_per_s"]
    memory = o["peak_rss_mb"] / t["peak_rss_mb"]
    print(f"throughput ratio ours/st: {speed:.2f}x (target >= 1.2)")
    print(f"peak RSS ratio ours/st:   {memory:.2f}x (target <= 1.0)")
    rounds = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(ours, theirs, strict=True)]
    print("throughput ratio per round: " + ", ".join(f"{r:.2f}x" for r in rounds))
    work = t["tokens"] / o["tokens"]
    print(f"padded tokens through the encoder, st/ours: {work:.2f}x (independent of load)")


def compare_precision(args: argparse.Namespace) -> None:
    """Our objective with fp32 vs bf16 autocast on CPU, over hidden sizes (the CPU rule)."""
    from search.train.loop import CPU_BF16_MIN_HIDDEN
    from search.train.loop import cpu_has_native_bf16

    print(f"CPU native bf16 (AMX / AVX512-BF16): {cpu_has_native_bf16()}")
    print(f"rule: bf16 autocast on CPU when native and hidden >= {CPU_BF16_MIN_HIDDEN}")
    sweep = [
        ("tiny L2 H64", TINY_DIMS),
        ("L2 H128", TINY_DIMS | {"hidden": 128, "ffn": 512}),
        ("L2 H256", TINY_DIMS | {"hidden": 256, "ffn": 1024}),
        ("mid L4 H384", MID_DIMS),
    ]
    for label, dims in sweep:
        vars(args).update(prepare(Path(args.work), args.model, dims))
        runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for _ in range(args.repeats):
            for amp in (False, True):
                precision = "bf16" if amp else "fp32"
                runs[amp].append(_child(args, "ours", amp=amp, force_precision=precision))
        fp32, bf16 = _best(runs[False]), _best(runs[True])
        print(_line(f"{label} fp32", fp32))
        print(_line(f"{label} bf16 autocast", bf16))
        ratio = bf16["samples_per_s"] / fp32["samples_per_s"]
        print(f"{label}: bf16/fp32 throughput {ratio:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", choices=["ours", "st"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", action="store_true", help="fp32 vs bf16, ours only")
    parser.add_argument("--tiny", action="store_true", help="tiny replica instead of mid-size")
    parser.add_argument("--model", default="multilingual-minilm")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--samples", type=int, default=512, help="training examples")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument(
        "--fail-fast",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="ours: first step at the worst-case shape (batch padded to --max-len)",
    )
    parser.add_argument(
        "--clock",
        choices=["cpu", "wall"],
        default="cpu",
        help="time the training steps in process CPU seconds (robust on a shared machine, "
        "with one thread) or wall seconds",
    )
    parser.add_argument("--force-precision", choices=["fp32", "bf16"], help=argparse.SUPPRESS)
    parser.add_argument("--work", default="/tmp/bench_train_throughput")
    parser.add_argument("--model-path", default="")
    parser.add_argument("--train-path", default="")
    parser.add_argument("--eval-dir", default="")
    args = parser.parse_args()
    import torch

    if args.side:
        result = run_ours(args) if args.side == "ours" else run_st(args)
        print(json.dumps(result))
        return
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"threads {args.threads}; model {args.model} "
        f"{'sweep of' if args.precision else 'tiny' if args.tiny else 'mid'} replica(s); "
        f"batch {args.batch_size}, max_len {args.max_len}, {args.samples} examples, "
        f"{args.epochs} epoch(s), amp {args.amp}, fail_fast {args.fail_fast}, "
        f"clock {args.clock}; "
        f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}",
        flush=True,
    )
    if args.precision:
        compare_precision(args)
    else:
        compare_st(args)


if __name__ == "__main__":
    main()
