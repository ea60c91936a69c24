"""Worker-hours to a near-best config: random sweeps vs TPE vs the staged strategy, per world.

Real Optuna studies in memory, each run by the service's own trial step
(``search.worker.worker.Worker.open`` + ``Worker.step``: the claim with free skips and the
stage plan, the sampler and space, the feasible draws, the preflight with the OOM frontier,
the trial record, the tell); only the training is replaced, by a surrogate trainer
(``bench/surrogate_ko.py``: score surface, learning curve with eval noise, time, memory).

Surrogate (default world): each model's ceiling from the published Korean figures in DESIGN.md
(mean of Ko-StrategyQA and AutoRAGRetrieval: bge-m3-ko 0.835, multilingual-e5-small 0.777,
multilingual-minilm 0.441; ko-simcse 0.70 assumed), minus quadratic penalties in log learning
rate (per-model optimum), log temperature (0.03), warm-up (0.1) and weight decay (0.01), plus
0.004 per doubling of the batch and a loss for short ``max_len``. At a fraction ``f`` of
training a config scores ``final - amp (1 - f)^pow`` (amp 0.115 and pow 3.25 times lognormal
factors per config, sd 0.5 and 0.3, fitted to helper R's real runs: see ``surrogate_ko``) plus
the eval's noise (sd 0.01 on the fixed eval sample of the sooner reports, 0.002 on the full
eval at each epoch's end; each report carries 2.5 x its noise sd as ``ndcg@10_se``, as the
real runs' SE over queries did); the bench prints the world's Spearman of the eval at 10/25/50% of
training against the final score, to compare with a real-run calibration. Time: ``6 x
non-embedding parameters x tokens`` per example, 50,000 pairs, 2 epochs, 40 TFLOP/s,
checkpointing x1.33, load 36 s (72 s bge-m3-ko), 5 s per sample eval. Memory:
``search.memory.estimate`` times a per-shape lognormal factor (sd 0.1) against 24 GiB; a real
OOM costs the load plus one step with the service's fail-fast, the load plus a random part of
the first epoch without. Every random draw is keyed by (world, seed, config, step), never by
the strategy (common random numbers): comparisons within a seed are paired.

Worlds (``--world NAME[,NAME]`` or ``all``; what each changes, and why a Korean retrieval team
could be in it):

* ``default``: as above.
* ``per-model-optima``: temperature, warm-up, weight decay and lr optima differ per model
  (bge-m3-ko: lr 1.2e-5, temperature 0.05, warm-up 0.05, wd 0.05): a big multilingual
  model fine-tuned on Korean pairs rarely wants the small models' settings.
* ``big-not-best``: bge-m3-ko's ceiling 0.76, below e5-small's 0.777: a domain (legal,
  medical) where the big model's pre-training does not transfer.
* ``slow-big``: bge-m3-ko's curve starts lower (amp 0.21, pow 2): its early sample evals
  are a few points below e5-small's although it ends best (a large model with a long warm-up).
* ``crossing``: curve shapes vary more per config (amp sd 0.8, pow sd 0.6) and the sample
  eval is noisier (sd 0.025): a small eval sample, curves that cross.
* ``gpu16`` / ``gpu80``: a 16 / 80 GiB device; in gpu80 bge-m3-ko gains 0.015 per batch
  doubling and from long inputs, so shapes beyond 64x384 score higher and fit (an A100-80).
* ``pairs5k`` / ``pairs500k``: 5,000 / 500,000 training pairs: time x0.1 / x10, and the
  spec's eval points (every 5,000 examples, warm-up 10,000) move on the curve.
* ``optimistic-estimate``: true peaks 25% above the service's estimate (another attention
  kernel, fragmentation).
* ``band0.5`` / ``band2``: the target within 0.5% / 2% of the best (default 1%), same noise
  as ``default``.
* ``border-best``: a 16 GiB device where bge-m3-ko's best shape, 64x384, is a border pair
  (estimate 18.1 GiB, fits only within the estimate's band; true peak x0.85) and beats its
  other shapes by more than 1%.

Strategies (same budget of trained trials; skips are free, up to the skip bound):

* ``random`` (a): the W&B random sweep as a user runs it: the flat space (no conditions), no
  preflight, frontier or baselines, no pruner, per-epoch evals only, OOMs cost their time.
* ``random-hb`` (a-hb): the same with W&B's Hyperband early termination (``early_terminate:
  {type: hyperband, min_iter: 2, eta: 3}``; :class:`WandbHyperband`, a port of wandb/sweeps'
  ``hyperband_stopping.py``), an iteration being each logged value of the metric: the sample
  eval every ``training.eval_every_steps`` examples (and the epoch's full eval), so bands at the
  2nd, 6th and 18th of 20 reports. ``random-hb-alt``: ``min_iter: 4`` (bands 4, 12), the
  sensitivity alternative.
* ``tpe`` (b): plain ``optuna.samplers.TPESampler(seed=seed)`` (Optuna's defaults) given to
  ``Worker.open(sampler=...)``: the service does not wrap it, so the conditional space falls
  back to per-model branch names and there are no feasible draws; the preflight, frontier and
  baselines are the service's; the shipped pruner and sooner reports (as (c)), no stages.
* ``tpe-big`` (b2): the same on bge-m3-ko alone.
* ``staged`` (c): the shipped ko-retrieval spec as is.
* ``staged-device``: (c) with the big-safe stage's ``conditions: device``; ``staged-border``:
  (c) with ``sampler.border_probability: 0.1`` (only where the spec has these settings).

Per world and strategy: the median worker-hours until the study first holds a complete trial
within the world's band of the best reachable score (the best true score over the flat space's
configs that truly fit the device, per seed), with a bootstrap 90% interval over seeds (a seed
that never gets there counts its whole budget's hours: a lower bound), the share of seeds that
never get there, the median final best (the true score of the complete trial with the best
reported value: what a team keeps), and the paired ratios of medians c/b, c/b2, c/(a-hb), c/a
(bootstrap over seeds, the same seeds for both). Seeds: ``--seeds-set tune`` (0-29) or
``heldout`` (1000-1059, the default, never used for tuning).

Run::

    python bench/bench_search_efficiency.py --world all --jobs 2          # held-out seeds
    python bench/bench_search_efficiency.py --world default --seeds-set tune
    python bench/bench_search_efficiency.py --quick                       # 3 seeds, 2 worlds
    python bench/bench_search_efficiency.py --pruner warmup_share=0.2     # pruner sensitivity
    python bench/bench_search_efficiency.py --world all --blocks 20       # per-block ratios
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import random
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import optuna  # noqa: E402
import surrogate_ko as sk  # noqa: E402
from optuna.trial import FrozenTrial  # noqa: E402

from search.memory.device import DeviceInfo  # noqa: E402
from search.record.config import TrialConfig  # noqa: E402
from search.record.counts import spent_count  # noqa: E402
from search.record.models import MODELS  # noqa: E402
from search.spec.load import resolve_spec  # noqa: E402
from search.spec.options import RunOptions  # noqa: E402
from search.spec.study_spec import PrunerSection  # noqa: E402
from search.spec.study_spec import SamplerSection  # noqa: E402
from search.spec.study_spec import StudySpec  # noqa: E402
from search.worker.budget import SkipBoundError  # noqa: E402
from search.worker.isolation import TrialOutcome  # noqa: E402
from search.worker.trainer import TrainHooks  # noqa: E402
from search.worker.worker import Worker  # noqa: E402

SEED_SETS = {"tune": list(range(0, 30)), "heldout": list(range(1000, 1060))}
BASELINES = ("random", "random-hb", "random-hb-alt", "tpe", "tpe-big")
STAGED = ("staged", "staged-device", "staged-border")
STRATEGIES = BASELINES + STAGED
RATIOS = (("tpe", "c/b"), ("tpe-big", "c/b2"), ("random-hb", "c/(a-hb)"), ("random", "c/a"))
HYPERBAND = {"random-hb": (2, 3.0), "random-hb-alt": (4, 3.0)}  # (min_iter, eta)
BORDER_PROBABILITY = 0.1
QUICK_WORLDS = ("default", "slow-big")
BIG = "bge-m3-ko"


class WandbHyperband(optuna.pruners.BasePruner):
    """W&B sweeps' Hyperband early termination (wandb/sweeps ``hyperband_stopping.py``,
    ``min_iter`` form, ``strict`` as its schema's default), as an Optuna pruner.

    Bands at ``min_iter x eta^k`` iterations (an iteration: each reported value, in step
    order). At its latest band ``b`` (``b <= len(history)``) a run stops when its value at
    iteration ``b`` is worse than the ``int(n / eta)``-th best of the ``n`` runs of the sweep
    (any state, itself included) that reached ``b``: the top ``1/eta`` go on. W&B's controller
    checks runs periodically; here each report is checked (the same decisions when runs go one
    at a time, as here).
    """

    def __init__(self, min_iter: int = 2, eta: float = 3.0) -> None:
        self.bands = [int(min_iter * eta**k) for k in range(100) if min_iter * eta**k < 1e9]
        self.eta = eta
        self._done: dict[int, list[float]] = {}  # finished trials' histories, read once

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        history = [v for _, v in sorted(trial.intermediate_values.items())]
        passed = [b for b in self.bands if b <= len(history)]
        if not passed:
            return False
        band = passed[-1]
        sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
        values = [sign * history[band - 1]]
        for other in study.get_trials(deepcopy=False):
            if other.number == trial.number:
                continue
            theirs = self._done.get(other.number)
            if theirs is None:
                theirs = [v for _, v in sorted(other.intermediate_values.items())]
                if other.state.is_finished():  # its history no longer changes
                    self._done[other.number] = theirs
            if len(theirs) >= band:
                values.append(sign * theirs[band - 1])
        threshold = sorted(values)[int((1.0 / self.eta) * len(values))]
        return sign * history[band - 1] > threshold


@dataclass
class Result:
    """One study: hours to the target (None: never), its whole hours, its final best."""

    world: str
    strategy: str
    seed: int
    hours_to_target: float | None
    hours: float
    final_best: float  # true score of the complete trial with the best reported value
    trained: int
    skips: int
    ooms: int
    pruned: int

    @property
    def cost(self) -> float:
        """Hours to the target, or the whole budget's (a lower bound) when never reached."""
        return self.hours if self.hours_to_target is None else self.hours_to_target


def has_device_conditions() -> bool:
    """Whether the product's stages accept ``conditions: device`` (helper S2, issue 16)."""
    from search.spec.study_spec import StageSection

    return "device" in str(StageSection.model_fields["conditions"].annotation)


def has_border_probability() -> bool:
    return "border_probability" in SamplerSection.model_fields


def available(strategy: str) -> bool:
    if strategy == "staged-device":
        return has_device_conditions()
    if strategy == "staged-border":
        return has_border_probability()
    return strategy in STRATEGIES


@functools.cache
def flat_spec() -> StudySpec:
    """The shipped spec's models and ranges, no conditions, no stages (the W&B sweep's)."""
    spec = resolve_spec("ko-retrieval", None)
    space = spec.space.model_copy(update={"conditions": {}})
    return spec.model_copy(
        update={"space": space, "stages": [], "sampler": SamplerSection(type="random")}
    )


# ``--pruner KEY=VALUE,...``: the shipped pruner section changed for every service strategy
# (tpe, tpe-big, staged*), a sensitivity run; set before the worker processes fork.
PRUNER_OVERRIDES: dict[str, str] = {}


def parse_pruner(text: str) -> dict[str, str]:
    """``warmup_share=0.4,noise_z=0.6`` -> a dict, checked against the spec's pruner section."""
    pairs = dict(item.split("=", 1) for item in text.split(",") if "=" in item)
    if not pairs or len(pairs) != len([i for i in text.split(",") if i]):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,KEY=VALUE], got {text!r}")
    unknown = sorted(set(pairs) - set(PrunerSection.model_fields))
    if unknown:
        raise argparse.ArgumentTypeError(f"pruner has no setting {', '.join(unknown)}")
    try:
        PrunerSection.model_validate({**PrunerSection().model_dump(), **pairs})
    except ValueError as exc:  # pydantic's ValidationError: its first error, one line
        errors = getattr(exc, "errors", list)()
        first = errors[0] if errors else {"loc": ("?",), "msg": str(exc)}
        raise argparse.ArgumentTypeError(
            f"pruner.{first['loc'][0]} (value: {pairs.get(str(first['loc'][0]))}): {first['msg']}"
        ) from None
    return pairs


@functools.cache
def strategy_spec(strategy: str) -> StudySpec:
    """The spec each strategy runs (see the module docstring); read once per process."""
    spec = resolve_spec("ko-retrieval", None)
    if PRUNER_OVERRIDES and not strategy.startswith("random"):
        section = {**spec.pruner.model_dump(), **PRUNER_OVERRIDES}
        spec = spec.model_copy(update={"pruner": PrunerSection.model_validate(section)})
    if strategy == "random":
        flat = flat_spec()
        training = flat.training.model_copy(update={"eval_every_steps": None})
        return flat.model_copy(update={"training": training})
    if strategy.startswith("random-hb"):
        return flat_spec()
    if strategy in ("tpe", "tpe-big"):
        spec = spec.model_copy(update={"stages": []})
        if strategy == "tpe-big":
            conditions = {BIG: spec.space.conditions[BIG]} if BIG in spec.space.conditions else {}
            space = spec.space.model_copy(update={"conditions": conditions})
            spec = spec.model_copy(update={"models": {BIG: spec.models[BIG]}, "space": space})
        return spec
    if strategy == "staged-device":
        stages = [
            s.model_copy(update={"conditions": "device"}) if BIG in (s.models or []) else s
            for s in spec.stages
        ]
        return spec.model_copy(update={"stages": stages})
    if strategy == "staged-border":
        sampler = spec.sampler.model_copy(update={"border_probability": BORDER_PROBABILITY})
        return spec.model_copy(update={"sampler": sampler})
    if strategy != "staged":
        raise ValueError(f"unknown strategy {strategy!r}")
    return spec


def run(w: sk.World, strategy: str, seed: int, budget: int, target: float) -> Result:
    """One study of ``strategy`` in world ``w``: ``budget`` trained trials through the
    service's step (``Worker.open`` on an in-memory storage, ``Worker.step`` per trial)."""
    spec = strategy_spec(strategy)
    service = not strategy.startswith("random")
    pruner: optuna.pruners.BasePruner | None = None
    if strategy == "random":
        pruner = optuna.pruners.NopPruner()
    elif strategy in HYPERBAND:
        pruner = WandbHyperband(*HYPERBAND[strategy])
    sampler = optuna.samplers.TPESampler(seed=seed) if strategy.startswith("tpe") else None
    opts = RunOptions(
        storage_url="inmemory",
        n_trials=budget,
        seed=seed,
        device="cuda",
        use_estimate=service,  # (a): no preflight, no frontier (and so no feasible draws)
        use_frontier=service,
        study_name=f"{strategy}-{seed}",
        worker=strategy,
    )
    device = DeviceInfo(
        name="cuda:0",
        label=f"cuda:0 (surrogate, {w.device_gib:g} GiB)",
        total_bytes=int(w.device_bytes),
        free_bytes=int(w.device_bytes),
    )
    spent = {"hours": 0.0}
    last = {"value": -math.inf}
    trained: list[TrialConfig] = []

    def trainer(cfg: TrialConfig, hooks: TrainHooks) -> TrialOutcome:
        trained.append(cfg)
        cost, outcome = sk.simulate(w, seed, cfg, hooks, fail_fast=service)
        spent["hours"] += cost
        last["value"] = outcome.value if outcome.value is not None else -math.inf
        return outcome

    counts = {"skips": 0, "ooms": 0, "pruned": 0}
    reached: float | None = None
    best_value, best_true = -math.inf, float("nan")
    worker = Worker.open(
        spec,
        opts,
        storage=optuna.storages.InMemoryStorage(),
        check_data=False,
        device=device,
        facts={model: MODELS[model] for model in spec.models},
        model_paths=dict.fromkeys(spec.models, "x"),
        trainer=trainer,
        sampler=sampler,
        pruner=pruner,
        baselines=service,  # the W&B sweep has no baseline trials
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
                cfg = trained[-1]
                score = sk.true_score(w, cfg)
                if reached is None and score >= target:
                    reached = spent["hours"]
                value = last["value"]  # the complete trial's value: its last full eval
                if value > best_value:
                    best_value, best_true = value, score
            else:
                counts["ooms" if step.outcome == "oom" else "pruned"] += 1
        n_trained = spent_count(worker.study.get_trials(deepcopy=False))
    return Result(w.name, strategy, seed, reached, spent["hours"], best_true, n_trained, **counts)


def _run_task(task: tuple[str, str, int, int, float]) -> Result:
    name, strategy, seed, budget, target = task
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    return run(sk.world(name), strategy, seed, budget, target)


# --- statistics ------------------------------------------------------------------------------


def _quantiles(xs: Sequence[float]) -> tuple[float, float]:
    s = sorted(x for x in xs if math.isfinite(x))
    if not s:
        return math.nan, math.nan
    return s[int(0.05 * (len(s) - 1))], s[int(math.ceil(0.95 * (len(s) - 1)))]


def bootstrap_median(xs: Sequence[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """90% percentile interval of the median (seeds resampled)."""
    rng = random.Random(seed)
    n = len(xs)
    meds = [statistics.median(xs[rng.randrange(n)] for _ in range(n)) for _ in range(reps)]
    return _quantiles(meds)


def paired_ratio(
    num: Sequence[float], den: Sequence[float], reps: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """median(num) / median(den) and its 90% interval, the same seeds resampled for both."""
    rng = random.Random(seed)
    n = len(num)
    ratios = []
    for _ in range(reps):
        idx = [rng.randrange(n) for _ in range(n)]
        ratios.append(
            statistics.median(num[i] for i in idx) / statistics.median(den[i] for i in idx)
        )
    lo, hi = _quantiles(ratios)
    return statistics.median(num) / statistics.median(den), lo, hi


def summarize(results: list[Result]) -> dict[str, object]:
    costs = [r.cost for r in results]
    lo, hi = bootstrap_median(costs)
    finals = [r.final_best for r in results]
    return {
        "median_hours": statistics.median(costs),
        "ci90": [lo, hi],
        "never": sum(r.hours_to_target is None for r in results) / len(results),
        "median_final_best": statistics.median(finals),
        "trained": statistics.mean(r.trained for r in results),
        "skips": statistics.mean(r.skips for r in results),
        "ooms": statistics.mean(r.ooms for r in results),
        "pruned": statistics.mean(r.pruned for r in results),
        "budget_hours": statistics.median(r.hours for r in results),
    }


# --- main ------------------------------------------------------------------------------------


def parse_worlds(text: str) -> list[str]:
    """``NAME[,NAME...]`` or ``all`` as world names; ArgumentTypeError names a bad one."""
    names = list(sk.WORLDS) if text.strip() == "all" else [n.strip() for n in text.split(",")]
    bad = [n for n in names if n not in sk.WORLDS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown world {', '.join(map(repr, bad)) or repr(text)}; "
            f"known: {', '.join(sk.WORLDS)} (or all)"
        )
    return names


def parse_strategies(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    bad = [n for n in names if n not in STRATEGIES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown strategy {', '.join(map(repr, bad))}; known: {', '.join(STRATEGIES)}"
        )
    return names


def world_header(w: sk.World, flat: StudySpec) -> str:
    rho = sk.rank_correlations(w, flat)
    corr = ", ".join(
        f"{int(f * 100)}% {rho['all'][f]:.2f}/{rho['within'][f]:.2f}/{rho['within_full'][f]:.2f}"
        for f in rho["all"]
    )
    at_opt = {m: sk.optimum_config(w, m, flat) for m in (BIG, "multilingual-e5-small")}
    early = ", ".join(
        f"{int(f * 100)}% " + "/".join(f"{sk.curve_mean(w, at_opt[m], f):.3f}" for m in at_opt)
        for f in (0.1, 0.25, 0.5, 1.0)
    )
    return (
        f"## world {w.name}: {w.summary}\n"
        f"# {w.device_gib:g} GiB, {w.pairs} pairs, target {w.target:g} x best; sample-eval sd "
        f"{w.sample_sd:g}, full-eval sd {w.full_sd:g}; Spearman vs the final score, 400 random "
        f"configs (sample eval all models / sample eval within a model / full eval within a "
        f"model): {corr}; mean curve of "
        f"bge-m3-ko / e5-small at their optima (64x384, no noise): {early}"
    )


def table(w: sk.World, by: dict[str, list[Result]], best: list[float]) -> list[str]:
    lines = [
        f"best reachable (median over seeds) {statistics.median(best):.4f}",
        "",
        "| strategy | median h to target [90% CI] | never | median final best | trained | "
        "skips | real OOMs | pruned | budget h |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for strategy, rs in by.items():
        s = summarize(rs)
        lo, hi = s["ci90"]  # type: ignore[misc]
        lines.append(
            f"| {strategy} | {s['median_hours']:.2f} [{lo:.2f}, {hi:.2f}] | "
            f"{s['never']:.0%} | {s['median_final_best']:.4f} | {s['trained']:.1f} | "
            f"{s['skips']:.1f} | {s['ooms']:.1f} | {s['pruned']:.1f} | {s['budget_hours']:.1f} |"
        )
    lines.append("")
    for staged in [s for s in STAGED if s in by]:
        parts = []
        for base, label in RATIOS:
            if base in by:
                r, lo, hi = paired_ratio([x.cost for x in by[staged]], [x.cost for x in by[base]])
                name = label if staged == "staged" else label.replace("c/", f"{staged}/")
                parts.append(f"{name} {r:.3f} [{lo:.3f}, {hi:.3f}]")
        if parts:
            lines.append(f"paired ratios of medians (90% CI): {'; '.join(parts)}")
    return lines


def block_ratios(by: dict[str, list[Result]], seeds: Sequence[int], size: int) -> list[str]:
    """staged's paired ratios of medians per block of ``size`` consecutive seeds."""
    if "staged" not in by:
        return []
    lines = []
    for start in range(0, len(seeds), size):
        idx = range(start, min(start + size, len(seeds)))
        parts = []
        for base, label in RATIOS:
            if base in by:
                num = [by["staged"][i].cost for i in idx]
                den = [by[base][i].cost for i in idx]
                parts.append(f"{label} {statistics.median(num) / statistics.median(den):.3f}")
        block = f"seeds {seeds[idx[0]]}..{seeds[idx[-1]]}"
        lines.append(f"block {block}: {'; '.join(parts)}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--world", type=parse_worlds, default=["default"], help="NAME[,...]|all")
    parser.add_argument("--seeds-set", choices=sorted(SEED_SETS), default="heldout")
    parser.add_argument("--seeds", type=int, default=None, help="only the first N of the set")
    parser.add_argument("--budget", type=int, default=60, help="trained trials per study")
    parser.add_argument(
        "--strategies",
        type=parse_strategies,
        default=None,
        help=f"comma-separated (default: every available one of {', '.join(STRATEGIES)})",
    )
    parser.add_argument("--jobs", type=int, default=1, help="processes (at most 2 here)")
    parser.add_argument("--json", type=Path, default=None, help="write everything there")
    parser.add_argument("--markdown", type=Path, default=None, help="write the tables there")
    parser.add_argument("--quick", action="store_true", help="3 seeds, worlds default,slow-big")
    parser.add_argument(
        "--pruner",
        type=parse_pruner,
        default={},
        help="sensitivity: KEY=VALUE,... replaces the shipped pruner's settings for the "
        "service strategies (e.g. warmup_share=0.2,noise_z=0.6)",
    )
    parser.add_argument(
        "--blocks",
        type=int,
        default=1,
        help="also print the paired ratios per block of this many consecutive seeds",
    )
    args = parser.parse_args(argv)
    PRUNER_OVERRIDES.clear()
    PRUNER_OVERRIDES.update(args.pruner)
    strategy_spec.cache_clear()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    worlds = list(QUICK_WORLDS) if args.quick else args.world
    seeds = SEED_SETS[args.seeds_set][: 3 if args.quick else args.seeds]
    strategies = args.strategies or [s for s in STRATEGIES if available(s)]
    missing = [s for s in strategies if not available(s)]
    if missing:
        parser.error(f"strategy {', '.join(missing)}: the product's spec lacks the setting")
    flat = flat_spec()
    started = time.monotonic()
    out: list[str] = [
        f"# surrogate ko-retrieval, {len(seeds)} {args.seeds_set} seeds "
        f"({seeds[0]}..{seeds[-1]}), budget {args.budget} trained trials per study, "
        f"strategies {', '.join(strategies)}; ratios: staged over each baseline"
    ]
    print(out[0], flush=True)
    everything: dict[str, object] = {"seeds_set": args.seeds_set, "seeds": seeds, "worlds": {}}
    for name in worlds:
        w = sk.world(name)
        t0 = time.monotonic()
        header = world_header(w, flat)
        print(header, flush=True)
        best = [sk.best_config_score(w, seed, flat) for seed in seeds]
        tasks = [
            (name, strategy, seed, args.budget, w.target * b)
            for strategy in strategies
            for seed, b in zip(seeds, best, strict=True)
        ]
        if args.jobs > 1:
            with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
                results = pool.map(_run_task, tasks, chunksize=1)
        else:
            results = [_run_task(t) for t in tasks]
        by = {s: [r for r in results if r.strategy == s] for s in strategies}
        lines = table(w, by, best)
        if args.blocks > 1:
            lines += block_ratios(by, seeds, args.blocks)
        lines.append(f"({time.monotonic() - t0:.0f} s)")
        print("\n".join(lines), flush=True)
        out += ["", header, *lines]
        everything["worlds"][name] = {  # type: ignore[index]
            "world": {k: (str(v) if k == "peak_override" else v) for k, v in asdict(w).items()},
            "best_reachable": best,
            "summary": {s: summarize(rs) for s, rs in by.items()},
            "results": [asdict(r) for r in results],
        }
        _write(args.json, args.markdown, everything, out)  # after each world: partial runs
    total = f"total {time.monotonic() - started:.0f} s"
    print(total)
    out.append(total)
    _write(args.json, args.markdown, everything, out)
    return 0


def _write(
    json_path: Path | None, md_path: Path | None, everything: dict[str, object], out: list[str]
) -> None:
    if json_path:
        json_path.write_text(json.dumps(everything, indent=1, default=str))
    if md_path:
        md_path.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    sys.exit(main())
