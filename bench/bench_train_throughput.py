"""Training throughput and peak memory: our objective vs sentence-transformers' trainer, on CPU.

Ours is ``search.train.loop.train``, whose every step is ``train_step`` (the function the
gradient cache and ``bench/bench_gradient_cache.py`` run too).

Both train the same replica (built by ``search.train.tiny``) on the same KLUE-NLI pairs (built by
``search.train.nli_retrieval``: premise -> entailment, contradiction as hard negative) with the
same batch size, max length, optimizer (fused AdamW), schedule, precision and thread count. Each
side runs in a fresh subprocess so that its peak RSS is its own; the sides alternate over
``--repeats`` rounds (at least 5 for a headline) and the headline is the median of the paired
per-round ratios (each round's two runs share the machine's load of that moment).

Anchor: sentence-transformers' ``SentenceTransformerTrainer`` with
``MultipleNegativesRankingLoss`` (needs ``sentence-transformers[train]``: datasets, accelerate).
Both clocks cover the same work, tokenisation included: theirs runs from ``on_train_begin`` to
``on_train_end`` (its collator tokenises each batch inside the steps); ours is the training steps
(``TrainResult.samples_per_s``) plus the one-off tokenisation of the training texts before them
(``_build_dataset``, timed with the same clock). Model loading is outside both. In CPU seconds
of the process by default (``--clock cpu``: with one thread this is the work done, unlike wall
time on a machine shared with other jobs) or wall seconds (``--clock wall``); ``wall`` is each
subprocess' whole run.

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
import statistics
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
    from search.record.models import MODELS
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


def _timed_tokenisation(loop: Any, clock: Any) -> dict[str, float]:
    """Wrap the loop's one-off tokenisation and its batch cutter to time and count them.

    Returns a dict filled during ``train``: ``tokenise_s`` (seconds in ``_build_dataset``) and
    ``trained`` (examples in the training batches), so the training clock can be widened to
    include the tokenisation the anchor's clock includes.
    """
    acc = {"tokenise_s": 0.0, "trained": 0.0}
    build, batches = loop._build_dataset, loop._epoch_batches

    def timed_build(*a: Any, **k: Any) -> Any:
        t0 = clock()
        out = build(*a, **k)
        acc["tokenise_s"] += clock() - t0
        return out

    def counted_batches(*a: Any, **k: Any) -> Any:
        out = batches(*a, **k)
        acc["trained"] += sum(len(rows) for rows in out)
        return out

    loop._build_dataset, loop._epoch_batches = timed_build, counted_batches
    return acc


def run_ours(args: argparse.Namespace) -> dict[str, float]:
    """Train with ``search.train.loop.train``; eval on a few queries (outside the timing)."""
    import torch

    torch.set_num_threads(args.threads)
    from search.record.config import TrialConfig
    from search.record.models import MODELS
    from search.train import loop
    from search.train.data import EvalSet
    from search.train.data import load_eval

    if args.clock == "cpu":  # the loop's timer counts this process' CPU seconds instead
        loop.time = _CpuClock()  # type: ignore[assignment]
    if args.force_precision:  # bypass the CPU rule, to measure both precisions
        forced = torch.bfloat16 if args.force_precision == "bf16" else None

        def forced_dtype(device: torch.device, amp: bool, *, hidden: int) -> torch.dtype | None:
            return forced

        loop.autocast_dtype = forced_dtype  # train() passes it on to train_step
    acc = _timed_tokenisation(
        loop, time.process_time if args.clock == "cpu" else time.perf_counter
    )
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
    steps_s = acc["trained"] / result.samples_per_s  # the loop's clock: training steps only
    return {
        "samples_per_s": acc["trained"] / (steps_s + acc["tokenise_s"]),
        "steps_only_samples_per_s": result.samples_per_s,
        "tokenise_s": acc["tokenise_s"],
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

    from search.record.models import MODELS

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


MIN_ROUNDS = 5  # a headline needs at least this many paired rounds


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _paired(a: list[dict[str, float]], b: list[dict[str, float]], key: str) -> list[float]:
    """Per-round ratios a/b of ``key`` (round i of a against round i of b)."""
    return [x[key] / y[key] for x, y in zip(a, b, strict=True)]


def _headline(label: str, ratios: list[float], target: str) -> str:
    note = "" if len(ratios) >= MIN_ROUNDS else f" (only {len(ratios)} rounds: not a headline)"
    spread = f"min {min(ratios):.2f}x, max {max(ratios):.2f}x"
    return (
        f"{label}: median of {len(ratios)} paired rounds {_median(ratios):.2f}x "
        f"({spread}; target {target}){note}"
    )


def compare_st(args: argparse.Namespace) -> None:
    """Ours vs sentence-transformers, alternating, median of the paired per-round ratios."""
    paths = prepare(Path(args.work), args.model, MID_DIMS if not args.tiny else TINY_DIMS)
    vars(args).update(paths)
    ours: list[dict[str, float]] = []
    theirs: list[dict[str, float]] = []
    for i in range(args.repeats):
        ours.append(_child(args, "ours"))
        print(_line(f"ours (round {i + 1})", ours[-1]), flush=True)
        theirs.append(_child(args, "st"))
        print(_line(f"sentence-transformers ({i + 1})", theirs[-1]), flush=True)
    speed = _paired(ours, theirs, "samples_per_s")
    memory = _paired(ours, theirs, "peak_rss_mb")
    print(
        "clocks: both include tokenisation (ours: its one-off tokenisation + training steps; "
        "st: on_train_begin..on_train_end, its collator tokenising each batch)"
    )
    print("throughput ratio ours/st per round: " + ", ".join(f"{r:.2f}x" for r in speed))
    print(_headline("throughput ratio ours/st", speed, ">= 1.2"))
    print(_headline("peak RSS ratio ours/st", memory, "<= 1.0"))
    steps_only = [
        a["steps_only_samples_per_s"] / b["samples_per_s"]
        for a, b in zip(ours, theirs, strict=True)
    ]
    print(
        f"(ours without its tokenisation, for reference: median {_median(steps_only):.2f}x; "
        f"ours' tokenisation took {_median([r['tokenise_s'] for r in ours]):.2f} s a round)"
    )
    work = theirs[0]["tokens"] / ours[0]["tokens"]
    print(f"padded tokens through the encoder, st/ours: {work:.2f}x (independent of load)")


def compare_precision(args: argparse.Namespace) -> None:
    """Our objective with fp32 vs bf16 autocast on CPU, over hidden sizes (the CPU rule)."""
    from search.record.precision import CPU_BF16_MIN_HIDDEN
    from search.record.precision import cpu_has_native_bf16

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
        for i, (fp32, bf16) in enumerate(zip(runs[False], runs[True], strict=True)):
            print(_line(f"{label} fp32 ({i + 1})", fp32))
            print(_line(f"{label} bf16 autocast ({i + 1})", bf16))
        ratios = _paired(runs[True], runs[False], "samples_per_s")
        print(_headline(f"{label}: bf16/fp32 throughput", ratios, "> 1 to use bf16"), flush=True)


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
    parser.add_argument(
        "--repeats", type=int, default=MIN_ROUNDS, help=f"paired rounds (>= {MIN_ROUNDS})"
    )
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
