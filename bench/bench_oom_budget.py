"""Worker-seconds lost to out-of-memory: the naive sweep vs the service, same budget and limit.

Both sides run the same number of trials of the ko-retrieval study on CPU, with tiny replicas of
the four models, under the same ``--memory-limit`` (the trial process's address-space cap), each
in its own SQLite study, through ``search.worker.runner.run_study``:

* **naive** - what the old sweeps did: one flat space for every model (no per-model
  conditions, no per-model checkpointing), no memory estimate, no frontier, no fail-fast (the
  objective is ``train`` with ``fail_fast=False``: an OOM is found wherever the longest batch
  turns up). Trials still run in a child process, so the sweep survives its OOMs.
* **service** - the shipped spec and the default run: per-model conditions, the preflight
  estimate, the OOM frontier and the worst-case first step.
* **border** - the service with ``sampler.border_probability`` set to ``--border-probability``
  (default 0.1): that share of trials draws among a model's border configs (estimated above the
  limit, run only thanks to the estimate's band) instead of its sure ones. ``--sides
  service,border`` compares drawing border configs with a small probability against never.

Data: KLUE-NLI turned into retrieval pairs (``search.train.nli_retrieval``), with each passage
lengthened by a random number of other premises (a long-tailed count), so that passage lengths
spread up to and beyond 512 tokens as in a real corpus and the longest batch can come at any step.

Worker-seconds are the trials' ``seconds`` attribute (claim to tell); the seconds of a trial
that ended in OOM (real, host, predicted or frontier) are lost to OOM. The anchor is the naive
side's share, measured in the same run.

Run::

    python bench/bench_oom_budget.py                       # 16 trials each, 1GiB limit
    python bench/bench_oom_budget.py --trials 40 --memory-limit 1.5GiB
    python bench/bench_oom_budget.py --seeds 1-5            # paired, one study pair per seed
    python bench/bench_oom_budget.py --calibrate ko-simcse,bge-m3-ko   # CPU estimate vs peaks
    python bench/bench_oom_budget.py --sides service,border --border-probability 0.1 --seeds 1,2

Prints per side: trials by outcome, trained trials (what spends the budget: preflight skips
are recorded but free, ``search.worker.budget``), worker-seconds, seconds lost to OOM and their
share, the best nDCG@10, and ``above``: the trials estimated above the limit (border configs,
which only the band lets run) with their best nDCG@10 (``best_above``: what the border region
scores here); then the ratio service share / naive share (targets: service < 2 %, ratio < 0.1).
Over several seeds it ends with one line per seed and the verdict: in how many seeds the
service's best nDCG@10 is at least the naive sweep's (target: all), and its worst OOM share;
with the border side, per seed its best and OOM share against the service's, and the verdict:
in how many seeds drawing border configs found a better best, and what it cost in OOM share.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

KLUE_JSON = ROOT.parent / "shared" / "data" / "klue-nli" / "klue-nli-v1.1_dev.json"
NAIVE_OBJECTIVE = "bench_oom_budget:train_without_fail_fast"


def train_without_fail_fast(cfg: Any, **kwargs: Any) -> Any:
    """The naive objective: ``train`` with the worst-case first step turned off."""
    from search.train.loop import train

    return train(dataclasses.replace(cfg, fail_fast=False), **kwargs)


def _lengthen(text: str, pool: list[str], rng: random.Random) -> str:
    """``text`` followed by a long-tailed number of other sentences (median ~3, tail ~40)."""
    extra = min(int(rng.paretovariate(0.9)) - 1, 60)
    return " ".join([text, *rng.sample(pool, extra)]) if extra > 0 else text


def prepare_data(
    work: Path, *, seed: int, eval_queries: int = 50, eval_docs: int = 200
) -> tuple[Path, Path]:
    """KLUE-NLI retrieval files with lengthened passages (train and eval corpus)."""
    from search.train.nli_retrieval import klue_nli_to_retrieval

    train_path, eval_dir = klue_nli_to_retrieval(KLUE_JSON, work / "klue")
    rng = random.Random(seed)
    rows = [json.loads(line) for line in train_path.read_text(encoding="utf-8").splitlines()]
    pool = sorted({r["positive"] for r in rows} | {n for r in rows for n in r["negatives"]})
    out = work / "long"
    (out / "eval" / "qrels").mkdir(parents=True, exist_ok=True)
    with open(out / "train.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            r["positive"] = _lengthen(r["positive"], pool, rng)
            r["negatives"] = [_lengthen(n, pool, rng) for n in r["negatives"]]
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    # Evaluation: the first ``eval_queries`` queries, their relevant docs and other docs up to
    # ``eval_docs`` (enough to rank; small enough that evaluation does not dominate a trial).
    queries = (eval_dir / "queries.jsonl").read_text(encoding="utf-8").splitlines()[:eval_queries]
    keep_q = {json.loads(line)["_id"] for line in queries}
    qrels = (eval_dir / "qrels" / "test.tsv").read_text(encoding="utf-8").splitlines()
    kept = [row for row in qrels[1:] if row.split("\t")[0] in keep_q]
    relevant = {row.split("\t")[1] for row in kept}
    docs = [json.loads(line) for line in (eval_dir / "corpus.jsonl").read_text().splitlines()]
    others = [d for d in docs if d["_id"] not in relevant][: max(eval_docs - len(relevant), 0)]
    with open(out / "eval" / "corpus.jsonl", "w", encoding="utf-8") as f:
        for doc in [d for d in docs if d["_id"] in relevant] + others:
            doc["text"] = _lengthen(doc["text"], pool, rng)
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    (out / "eval" / "queries.jsonl").write_text("\n".join(queries) + "\n", encoding="utf-8")
    qrels_text = "\n".join([qrels[0], *kept]) + "\n"
    (out / "eval" / "qrels" / "test.tsv").write_text(qrels_text, encoding="utf-8")
    return out / "train.jsonl", out / "eval"


def bench_spec(mode: str, train_path: Path, eval_dir: Path, args: argparse.Namespace) -> Any:
    """The shipped ko-retrieval spec on the bench data; flattened for the naive side."""
    from search.spec.load import resolve_spec
    from search.spec.study_spec import ModelEntry

    spec = resolve_spec("ko-retrieval", None)
    training = spec.training.model_copy(
        update={"epochs": args.epochs, "max_train_samples": args.max_train_samples}
    )
    data = spec.data.model_copy(update={"train": str(train_path), "eval": str(eval_dir)})
    # One stage on both sides, as in the figures before issue 9: this bench measures memory
    # handling and free skips, not the staged playbook (bench_search_efficiency does).
    update: dict[str, Any] = {"training": training, "data": data, "stages": []}
    if mode == "naive":
        update["space"] = spec.space.model_copy(update={"conditions": {}})
        update["models"] = {name: ModelEntry() for name in spec.models}
    if mode == "border":
        p = {"border_probability": args.border_probability}
        update["sampler"] = spec.sampler.model_copy(update=p)
    return spec.model_copy(update=update)


def run_side(mode: str, spec: Any, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one side's budget and sum its worker-seconds by outcome."""
    from search.memory.device import parse_size
    from search.record import attrs
    from search.record.counts import is_skip
    from search.worker.runner import RunOptions
    from search.worker.runner import run_study

    naive = mode == "naive"
    opts = RunOptions(
        storage_url=f"sqlite:///{work / f'{mode}.db'}",
        n_trials=args.trials,
        seed=args.seed,
        tiny=True,
        device="cpu",
        memory_limit=parse_size(args.memory_limit),
        use_estimate=not naive,
        use_frontier=not naive,
        objective=NAIVE_OBJECTIVE if naive else "search.train.loop:train",
        cache_dir=work / "cache",
        study_name=f"oom-budget-{mode}",
    )
    started = time.monotonic()
    summary = run_study(spec, opts)
    wall = time.monotonic() - started
    trials = summary.study.get_trials(deepcopy=False)
    seconds = {"total": 0.0, "oom": 0.0}
    counts: dict[str, int] = {}
    for t in trials:
        ua = t.user_attrs
        sec = float(ua.get(attrs.SECONDS, 0.0))
        seconds["total"] += sec
        key = t.state.name.lower()
        if ua.get(attrs.OOM):
            key = f"oom-{ua.get(attrs.OOM_KIND)}"
            seconds["oom"] += sec
        counts[key] = counts.get(key, 0) + 1
    best = max((t.value for t in trials if t.value is not None), default=None)
    share = seconds["oom"] / seconds["total"] if seconds["total"] else 0.0
    # Border configs: estimated above the memory the trial was allowed (the band let them run).
    above = [
        t
        for t in trials
        if not is_skip(t)
        and float(t.user_attrs.get(attrs.MEMORY_ESTIMATE_MB, 0.0))
        > float(t.user_attrs.get(attrs.DEVICE_MEMORY_MB, float("inf")))
    ]
    return {
        "mode": mode,
        "trials": len(trials),
        "trained": sum(not is_skip(t) for t in trials),
        "outcomes": dict(sorted(counts.items())),
        "worker_s": round(seconds["total"], 1),
        "oom_s": round(seconds["oom"], 2),
        "oom_share": share,
        "best_ndcg@10": best,
        "above": len(above),
        "above_oom": sum(bool(t.user_attrs.get(attrs.OOM)) for t in above),
        "best_above": max((t.value for t in above if t.value is not None), default=None),
        "wall_s": round(wall, 1),
    }


CALIBRATION_GRID = (  # (batch, max_len, amp, gradient_checkpointing), one hard negative
    (16, 64, False, False),
    (32, 128, False, False),
    (64, 128, True, False),
    (32, 256, False, False),
    (64, 256, False, False),
    (32, 256, False, True),
    (64, 256, True, True),
)


def calibrate(work: Path, train_path: Path, eval_dir: Path, models: list[str]) -> None:
    """Print the CPU estimate against measured peaks of real tiny-replica trials."""
    from search.memory.estimate import estimate_peak_memory
    from search.record.config import TrialConfig
    from search.record.models import MODELS
    from search.train.data import load_train
    from search.train.tiny import build_tiny_replica
    from search.train.tiny import tiny_info
    from search.worker.isolation import run_isolated

    texts = [t for e in load_train(train_path) for t in (e.query, e.positive, *e.negatives)]
    ratios = []
    for name in models:
        info = MODELS[name]
        path = build_tiny_replica(info, work / "cache" / "tiny", texts)
        for batch, max_len, amp, ckpt in CALIBRATION_GRID:
            cfg = TrialConfig(
                model=name,
                model_path=str(path),
                batch_size=batch,
                max_len=max_len,
                lr=1e-4,
                temperature=0.05,
                warmup_ratio=0.0,
                weight_decay=0.0,
                epochs=1,
                amp=amp,
                gradient_checkpointing=ckpt,
                hard_negatives=1,
                seed=0,
                device="cpu",
                train_path=str(train_path),
                eval_dir=str(eval_dir),
                pooling=info.pooling,
                max_train_samples=2 * batch,
            )
            out = run_isolated(cfg)
            if out.status != "complete" or out.peak_memory_mb is None:
                print(f"{name} {batch}x{max_len} amp={amp} ckpt={ckpt}: {out.status} {out.error}")
                continue
            measured = out.peak_memory_mb - (out.baseline_memory_mb or 0.0)
            estimate = estimate_peak_memory(tiny_info(info), cfg, device_type="cpu").total_mb
            ratios.append(estimate / measured)
            print(
                f"{name:22s} batch={batch:3d} max_len={max_len:3d} amp={amp!s:5s} "
                f"ckpt={ckpt!s:5s} measured={measured:7.1f} MiB estimate={estimate:7.1f} MiB "
                f"ratio={estimate / measured:.3f}",
                flush=True,
            )
    if ratios:
        print(f"estimate / measured: min {min(ratios):.3f}, max {max(ratios):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=16, help="trial budget of each side")
    parser.add_argument("--memory-limit", default="1GiB", help="what each trial may use")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-train-samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--seeds", default=None, help="several paired runs, e.g. 1-5 or 1,3 (overrides --seed)"
    )
    parser.add_argument("--work", type=Path, default=None, help="folder for data and studies")
    parser.add_argument(
        "--sides", default="naive,service", help="comma-separated sides: naive, service, border"
    )
    parser.add_argument(
        "--border-probability",
        type=float,
        default=0.1,
        help="the border side's sampler.border_probability",
    )
    parser.add_argument(
        "--calibrate",
        default=None,
        metavar="MODELS",
        help="instead: compare the CPU estimate with measured peaks (comma-separated models)",
    )
    args = parser.parse_args()

    import optuna
    import torch

    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from search.worker.isolation import warm_up

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-oom-"))
    work.mkdir(parents=True, exist_ok=True)
    warm_up()
    if args.calibrate:
        train_path, eval_dir = prepare_data(work, seed=args.seed)
        calibrate(work, train_path, eval_dir, args.calibrate.split(","))
        return
    seeds = _seeds(args.seeds) if args.seeds else [args.seed]
    per_seed = []
    for seed in seeds:
        args.seed = seed
        seed_work = work / f"seed{seed}" if args.seeds else work
        seed_work.mkdir(parents=True, exist_ok=True)
        per_seed.append((seed, run_pair(seed_work, args)))
    if len(per_seed) > 1:
        summarize(per_seed)
    else:
        summarize_border(per_seed)


def _seeds(text: str) -> list[int]:
    """``1-5`` -> [1, 2, 3, 4, 5]; ``1,3`` -> [1, 3]."""
    if "-" in text:
        low, high = text.split("-", 1)
        return list(range(int(low), int(high) + 1))
    return [int(x) for x in text.split(",")]


def summarize(per_seed: list[tuple[int, dict[str, dict[str, Any]]]]) -> None:
    """One line per seed, then the verdict over the seeds (paired: same data and seed)."""
    print(f"# over {len(per_seed)} seeds (paired: each seed's data and sampler seed are shared)")
    wins, shares = 0, []
    for seed, res in per_seed:
        naive, service = res.get("naive"), res.get("service")
        if naive is None or service is None:
            continue
        nb, sb = naive["best_ndcg@10"] or 0.0, service["best_ndcg@10"] or 0.0
        wins += sb >= nb
        shares.append(service["oom_share"])
        print(
            f"seed {seed}: best nDCG@10 naive {nb:.4f} vs service {sb:.4f} "
            f"({sb - nb:+.4f}); trained naive {naive['trained']} / service "
            f"{service['trained']} (+{service['trials'] - service['trained']} skips); OOM share "
            f"naive {naive['oom_share']:.2%} vs service {service['oom_share']:.2%}"
        )
    if shares:
        print(
            f"service best >= naive best in {wins}/{len(shares)} seeds (target: all); "
            f"service OOM share at most {max(shares):.2%} (target < 2%)"
        )
    summarize_border(per_seed)


def summarize_border(per_seed: list[tuple[int, dict[str, dict[str, Any]]]]) -> None:
    """Border side against the service (never border), paired per seed: best and OOM share."""
    rows = [
        (s, r["service"], r["border"]) for s, r in per_seed if {"service", "border"} <= r.keys()
    ]
    if not rows:
        return
    better = worse = 0
    for seed, service, border in rows:
        sb, bb = service["best_ndcg@10"] or 0.0, border["best_ndcg@10"] or 0.0
        better, worse = better + (bb > sb), worse + (bb < sb)
        print(
            f"seed {seed}: best nDCG@10 never-border {sb:.4f} vs border {bb:.4f} "
            f"({bb - sb:+.4f}); "
            f"OOM share {service['oom_share']:.2%} vs {border['oom_share']:.2%}; trials above the "
            f"limit {service['above']} vs {border['above']} ({border['above_oom']} OOM, best "
            f"{_score(border['best_above'])})"
        )
    shares = [b["oom_share"] for _, _, b in rows]
    print(
        f"border best > never-border best in {better}/{len(rows)} seeds, < in {worse}; "
        f"border OOM share mean {sum(shares) / len(shares):.2%}, at most {max(shares):.2%}"
    )


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def run_pair(work: Path, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Both sides on one seed's data; prints each side and the ratio."""
    for db in work.glob("*.db"):
        db.unlink()  # each run starts from empty studies
    train_path, eval_dir = prepare_data(work, seed=args.seed)
    border = f", border side: border_probability {args.border_probability}"
    print(
        f"# {args.trials} trials per side, --memory-limit {args.memory_limit}, CPU "
        f"({os.cpu_count()} cores, 1 torch thread), tiny replicas, epochs={args.epochs}, "
        f"max_train_samples={args.max_train_samples}, seed={args.seed}"
        + (border if "border" in args.sides.split(",") else "")
    )
    results = {}
    for mode in args.sides.split(","):
        spec = bench_spec(mode, train_path, eval_dir, args)
        res = run_side(mode, spec, work, args)
        results[mode] = res
        print(
            f"{mode:8s} trials={res['trials']} trained={res['trained']} "
            f"outcomes={res['outcomes']} "
            f"worker_s={res['worker_s']} oom_s={res['oom_s']} "
            f"oom_share={res['oom_share']:.2%} best_ndcg@10={res['best_ndcg@10']} "
            f"above={res['above']} (oom {res['above_oom']}, best {_score(res['best_above'])}) "
            f"wall_s={res['wall_s']}",
            flush=True,
        )
    if {"naive", "service"} <= results.keys():
        naive, service = results["naive"]["oom_share"], results["service"]["oom_share"]
        ratio = service / naive if naive else float("nan")
        print(
            f"ratio service/naive share of worker-seconds lost to OOM: {ratio:.3f} "
            f"(service {service:.2%} vs naive {naive:.2%}; targets < 2% and < 0.1)"
        )
    return results


if __name__ == "__main__":
    main()
