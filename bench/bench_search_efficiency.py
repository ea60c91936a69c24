"""Worker-hours to a near-best config: old random sweep vs TPE vs the staged strategy (surrogate).

Real Optuna studies in memory, each run by the service's own trial step
(``search.worker.worker.Worker.open`` + ``Worker.step``: the claim with free skips and the
stage plan, ``search.sampling``'s sampler and space, the feasible draws, the preflight with the
OOM frontier, the trial record, the tell); only the training is replaced, by a surrogate
trainer (``trainer=``) of the ko-retrieval space on a 24 GiB GPU:

* **score** (nDCG@10 after training): each model's ceiling from the published Korean figures in
  DESIGN.md (mean of Ko-StrategyQA and AutoRAGRetrieval: bge-m3-ko 0.835, multilingual-e5-small
  0.777, multilingual-minilm 0.441; ko-simcse has none published: 0.70 assumed), minus
  quadratic penalties in log learning rate (0.06 per decade squared, around a per-model
  optimum), log temperature, warmup and weight decay, plus a small gain for larger batches
  (more in-batch negatives) and a loss for short ``max_len``. Assumed shapes, not fitted.
* **learning curve**: at a fraction ``f`` of training the score is
  ``final - 0.15 (1 - f)^1.5`` plus noise (sd 0.01 on the fixed eval sample, 0.002 on the
  full eval), so rankings at the same step mostly hold (kind to pruning).
* **time**: ``6 x non-embedding parameters x tokens`` per training example (query 24 tokens,
  passages ``min(max_len, 170)``, one hard negative), 50,000 pairs, 2 epochs, at 40 TFLOP/s;
  gradient checkpointing x1.33; a load of 36 s (72 s for bge-m3-ko); 5 s per sample eval.
  bge-m3-ko trains in about 0.6 h, the small models in about 0.04 h.
* **memory**: ``search.memory.estimate`` (CUDA, AMP) times a fixed per-config factor
  (lognormal, sd 0.1: the estimate's error), against 24 GiB. A real OOM costs the load plus
  one step with the service's fail-fast first step, and the load plus a random part of the
  first epoch without it (the old sweep: the longest batch turns up anywhere).

Strategies (same budget of trained trials; skips are free, up to the skip bound):

* **(a) random**: the old W&B sweep: random sampling of the flat space (no per-model
  conditions; per-model checkpointing kept), no preflight, no frontier, no pruner, no
  fail-fast: OOMs cost their time. Run through the same step, with the preflight off
  (``use_estimate`` / ``use_frontier`` False), ``NopPruner`` and no baseline trials.
* **(b) tpe**: the service before issue 9: TPE over the conditional space, preflight and
  frontier (and, where the tree has it, the sampler drawing only shapes the preflight lets
  run: ``search.memory.feasible``, as the worker sets it), median pruner on the per-epoch reports
  (``PrunerSection()``'s defaults, no ``eval_every_steps``).
* (``--shared-lr``: one learning-rate optimum for all models, the sensitivity case where the
  baseline stage's lessons about lr carry over to the big model.)
* **(c) staged**: the shipped ko-retrieval spec as a user runs it: its stages (baseline small
  models; big-safe seeded at the frontier with the baseline's best settings and a
  learning-rate ladder; refine around the top 3), its ``training.eval_every_steps`` (sooner
  reports on the examples axis) and its pruner, with the same preflight and feasible draws as
  (b). ``--staged-pruner`` swaps only the pruner's type (a sensitivity run).

Prints per strategy the median (and mean) worker-hours until the study first holds a complete
trial within 1% of the best reachable score (the best surrogate score over every config of the
flat space that fits 24 GiB), in how many seeds it got there within the budget (a seed that
never does counts its whole budget's hours: a lower bound), and the ratios c/a and c/b of the
medians (targets: c <= a/3, c <= b).

Run::

    python bench/bench_search_efficiency.py                  # 20 seeds, budget 60
    python bench/bench_search_efficiency.py --seeds 5 --budget 40
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402

from search.memory.device import DeviceInfo  # noqa: E402
from search.memory.estimate import estimate_peak_memory  # noqa: E402
from search.record.config import TrialConfig  # noqa: E402
from search.record.models import MODELS  # noqa: E402
from search.sampling.space import SampledParams  # noqa: E402
from search.sampling.space import build_config  # noqa: E402
from search.spec.load import resolve_spec  # noqa: E402
from search.spec.options import RunOptions  # noqa: E402
from search.spec.study_spec import PrunerSection  # noqa: E402
from search.spec.study_spec import SamplerSection  # noqa: E402
from search.spec.study_spec import StudySpec  # noqa: E402
from search.worker.budget import SkipBoundError  # noqa: E402
from search.worker.isolation import TrialOutcome  # noqa: E402
from search.worker.trainer import TrainHooks  # noqa: E402
from search.worker.worker import Worker  # noqa: E402

GIB = 2**30
DEVICE = DeviceInfo(
    name="cuda:0", label="cuda:0 (surrogate, 24 GiB)", total_bytes=24 * GIB, free_bytes=24 * GIB
)
CEILING = {  # DESIGN.md: mean nDCG@10 of Ko-StrategyQA and AutoRAGRetrieval; ko-simcse assumed
    "bge-m3-ko": (0.796 + 0.874) / 2,
    "multilingual-e5-small": (0.752 + 0.801) / 2,
    "multilingual-minilm": (0.459 + 0.423) / 2,
    "ko-simcse": 0.70,
}
LR_OPT = {
    "bge-m3-ko": 2e-5,
    "multilingual-e5-small": 6e-5,
    "multilingual-minilm": 8e-5,
    "ko-simcse": 4e-5,
}
PAIRS, EPOCHS, FLOPS = 50_000, 2, 40e12
Q_TOKENS, P_TOKENS, HARD_NEGATIVES = 24, 170, 1
SAMPLE_EVAL_S = 5.0
TARGET = 0.99  # within 1% of the best reachable score


def true_score(cfg: TrialConfig) -> float:
    """The surrogate's nDCG@10 of a config after full training (see the module docstring)."""
    penalty = 0.06 * math.log10(cfg.lr / LR_OPT[cfg.model]) ** 2
    penalty += 0.03 * math.log10(cfg.temperature / 0.03) ** 2
    penalty += 0.02 * ((cfg.warmup_ratio - 0.1) / 0.1) ** 2
    penalty += 0.004 * abs(cfg.weight_decay - 0.01) / 0.1
    bonus = 0.012 * math.log2(cfg.batch_size / 32) / 3
    short = 0.03 * math.exp(-(cfg.max_len - 64) / 100)
    return CEILING[cfg.model] - penalty + bonus - short


def _non_embedding_params(model: str) -> float:
    info = MODELS[model]
    return float(info.n_params - (info.vocab + info.max_positions) * info.hidden)


def train_hours(cfg: TrialConfig) -> float:
    """Hours of one full training run (without load and evaluation)."""
    tokens = min(cfg.max_len, Q_TOKENS) + (1 + HARD_NEGATIVES) * min(cfg.max_len, P_TOKENS)
    seconds = 6 * _non_embedding_params(cfg.model) * tokens * PAIRS * EPOCHS / FLOPS
    seconds *= 1.33 if cfg.gradient_checkpointing else 1.0
    seconds *= 1.0 - 0.1 * math.log2(cfg.batch_size / 32) / 3  # bigger batches run a bit faster
    return seconds / 3600


def load_hours(cfg: TrialConfig) -> float:
    return (72.0 if cfg.model == "bge-m3-ko" else 36.0) / 3600


def true_peak_bytes(cfg: TrialConfig) -> float:
    """The estimate times a fixed per-config factor: the estimate's own error."""
    rng = random.Random(f"{cfg.model}/{cfg.batch_size}/{cfg.max_len}/{cfg.gradient_checkpointing}")
    factor = math.exp(rng.gauss(0.0, 0.1))
    return estimate_peak_memory(MODELS[cfg.model], cfg, device_type="cuda").total_bytes * factor


def curve(final: float, f: float, noise: float, rng: random.Random) -> float:
    return final - 0.15 * (1.0 - f) ** 1.5 + rng.gauss(0.0, noise)


def best_reachable(spec: StudySpec) -> float:
    """The best surrogate score over the flat space's configs that fit the device."""
    best = -1.0
    for model in spec.models:
        for batch in spec.space.batch_size:
            for max_len in spec.space.max_len:
                if max_len > MODELS[model].max_tokens:
                    continue
                params = SampledParams(
                    model=model,
                    batch_size=batch,
                    max_len=max_len,
                    lr=LR_OPT[model],
                    temperature=0.03,
                    warmup_ratio=0.1,
                    weight_decay=0.01,
                )
                cfg = build_config(spec, params, model_path="x", device="cuda")
                if true_peak_bytes(cfg) <= DEVICE.total_bytes:
                    best = max(best, true_score(cfg))
    return best


@dataclass
class Result:
    hours: float  # worker-hours until the target (or the whole budget's when not reached)
    reached: bool
    trained: int
    skips: int
    ooms: int
    pruned: int


def strategy_spec(kind: str, pruner: str | None = None) -> StudySpec:
    """The shipped ko-retrieval spec, shaped for one strategy.

    (c) is the spec as shipped (its stages, ``training.eval_every_steps`` and pruner);
    ``pruner`` replaces (c)'s pruner type (a sensitivity run), keeping the shipped settings.
    (b) drops the stages and the sooner reports and uses the median pruner as it was before
    issue 9 (``PrunerSection()``'s defaults, per-epoch reports). (a) drops the conditions too.
    """
    spec = resolve_spec("ko-retrieval", None)
    if kind == "random":
        space = spec.space.model_copy(update={"conditions": {}})
        return spec.model_copy(
            update={"space": space, "stages": [], "sampler": SamplerSection(type="random")}
        )
    if kind == "tpe":
        training = spec.training.model_copy(update={"eval_every_steps": None})
        return spec.model_copy(
            update={"stages": [], "training": training, "pruner": PrunerSection()}
        )
    if pruner is not None and pruner != spec.pruner.type:
        section = spec.pruner.model_copy(update={"type": pruner})
        return spec.model_copy(update={"pruner": section})
    return spec


def run(kind: str, seed: int, budget: int, target: float, pruner: str | None = None) -> Result:
    """One study of ``kind`` with ``budget`` trained trials; hours until ``target`` is held.

    The study is the service's (``Worker.open`` on an in-memory storage, ``Worker.step`` per
    trial); the surrogate trains each config the step hands it and adds up its hours.
    """
    spec = strategy_spec(kind, pruner)
    rng = random.Random(f"{kind}/{seed}")  # the surrogate's noise and OOM points
    service = kind != "random"
    opts = RunOptions(
        storage_url="inmemory",
        n_trials=budget,
        seed=seed,
        device="cuda",
        use_estimate=service,  # (a): no preflight, no frontier (and so no feasible draws)
        use_frontier=service,
        study_name=f"{kind}-{seed}",
        worker=kind,
    )
    spent = {"hours": 0.0}
    trained: list[TrialConfig] = []

    def trainer(cfg: TrialConfig, hooks: TrainHooks) -> TrialOutcome:
        trained.append(cfg)
        cost, outcome = simulate(cfg, hooks, service=service, rng=rng)
        spent["hours"] += cost
        return outcome

    counts = {"skips": 0, "ooms": 0, "pruned": 0}
    worker = Worker.open(
        spec,
        opts,
        storage=optuna.storages.InMemoryStorage(),
        check_data=False,
        device=DEVICE,
        facts={model: MODELS[model] for model in spec.models},
        model_paths=dict.fromkeys(spec.models, "x"),
        trainer=trainer,
        pruner=None if service else optuna.pruners.NopPruner(),
        baselines=service,  # (a), the old sweep, had no baseline trials
        warm=False,
    )
    with worker:
        while True:
            try:
                step = worker.step(wait=False)
            except SkipBoundError:
                break
            if step.stopped:
                break
            if step.outcome == "skipped":
                counts["skips"] += 1
            elif step.outcome == "complete":
                if true_score(trained[-1]) >= target:
                    return Result(spent["hours"], True, _trained(worker.study), **counts)
            else:
                counts["ooms" if step.outcome == "oom" else "pruned"] += 1
        return Result(spent["hours"], False, _trained(worker.study), **counts)


def _trained(study: optuna.Study) -> int:
    from search.record.counts import spent_count

    return spent_count(study.get_trials(deepcopy=False))


def simulate(
    cfg: TrialConfig, hooks: TrainHooks, *, service: bool, rng: random.Random
) -> tuple[float, TrialOutcome]:
    """Train ``cfg`` on the surrogate: (worker-hours spent, outcome), reporting to the pruner
    through the step's hooks (``report_partial`` for the sooner sample evaluations, ``report``
    at each epoch's end, on the examples axis)."""
    load, train = load_hours(cfg), train_hours(cfg)
    if true_peak_bytes(cfg) > DEVICE.total_bytes:
        steps = PAIRS * EPOCHS / cfg.batch_size
        if service:  # fail-fast: the worst-case batch is the first step
            cost = load + train / steps
        else:  # the longest batch turns up anywhere in the first epoch
            cost = load + rng.random() * train / EPOCHS
        error = "OutOfMemoryError: CUDA out of memory (surrogate)"
        return cost, TrialOutcome(status="oom", oom_kind="real", phase="forward", error=error)
    final = true_score(cfg)
    total = PAIRS * EPOCHS
    points = [(e * PAIRS, False) for e in range(1, EPOCHS + 1)]
    if cfg.eval_every_steps:
        every = cfg.eval_every_steps
        points += [(s, True) for s in range(every, total, every) if s % PAIRS]
    spent = load
    history: list[dict[str, float]] = []
    for step, sooner in sorted(points):
        f = step / total
        value = curve(final, f, 0.01 if sooner else 0.002, rng)
        spent = load + f * train + (SAMPLE_EVAL_S / 3600 if sooner else 0.0)
        if sooner:
            prune = hooks.report_partial(step, {"ndcg@10": value})
        else:
            metrics = {"ndcg@10": value, "examples_seen": float(step)}
            history.append(metrics)
            prune = hooks.report(step // PAIRS, metrics)
        if prune:
            metrics = history[-1] if history else {}
            return spent, TrialOutcome(status="pruned", metrics=metrics, history=history)
    value = history[-1]["ndcg@10"]
    return spent, TrialOutcome(
        status="complete", value=value, metrics=history[-1], history=history
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument(
        "--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1"
    )
    parser.add_argument("--budget", type=int, default=60, help="trained trials per study")
    parser.add_argument("--strategies", default="random,tpe,staged")
    parser.add_argument(
        "--staged-pruner",
        default=None,
        choices=["median", "successive_halving", "hyperband", "none"],
        help="(c)'s pruner type on the sooner reports (default: the shipped spec's)",
    )
    parser.add_argument(
        "--shared-lr",
        action="store_true",
        help="sensitivity: one learning-rate optimum (3e-5) for every model, so what the small "
        "models teach about lr holds for bge-m3-ko (default: an optimum per model)",
    )
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    if args.shared_lr:
        LR_OPT.update(dict.fromkeys(LR_OPT, 3e-5))
    flat = strategy_spec("random")
    best = best_reachable(flat)
    target = TARGET * best
    print(
        f"# surrogate ko-retrieval on a 24 GiB GPU: best reachable nDCG@10 {best:.4f}, target "
        f">= {target:.4f}; {args.seeds} seeds"
        + (f" ({args.first_seed}..{args.first_seed + args.seeds - 1})" if args.first_seed else "")
        + f", budget {args.budget} trained trials per study; "
        f"lr optimum {'shared' if args.shared_lr else 'per model'}; "
        f"(c) pruner {strategy_spec('staged', args.staged_pruner).pruner.type}"
    )
    results: dict[str, list[Result]] = {}
    for kind in args.strategies.split(","):
        started = time.monotonic()
        results[kind] = [
            run(kind, seed, args.budget, target, args.staged_pruner)
            for seed in range(args.first_seed, args.first_seed + args.seeds)
        ]
        rs = results[kind]
        hours = [r.hours for r in rs]
        print(
            f"{kind:7s} worker-hours to target: median {statistics.median(hours):.2f}, mean "
            f"{statistics.mean(hours):.2f}; reached {sum(r.reached for r in rs)}/{len(rs)}; per "
            f"study mean trained {statistics.mean(r.trained for r in rs):.1f}, skips "
            f"{statistics.mean(r.skips for r in rs):.1f}, real OOMs "
            f"{statistics.mean(r.ooms for r in rs):.1f}, pruned "
            f"{statistics.mean(r.pruned for r in rs):.1f} ({time.monotonic() - started:.0f} s)",
            flush=True,
        )
    if {"random", "tpe", "staged"} <= results.keys():
        med = {k: statistics.median(r.hours for r in v) for k, v in results.items()}
        paired = [
            c.hours / b.hours for c, b in zip(results["staged"], results["tpe"], strict=True)
        ]
        print(
            f"ratio c/a {med['staged'] / med['random']:.3f} (target <= 0.333), c/b "
            f"{med['staged'] / med['tpe']:.3f} (target <= 1); paired c/b per seed: median "
            f"{statistics.median(paired):.3f}"
        )


if __name__ == "__main__":
    main()
