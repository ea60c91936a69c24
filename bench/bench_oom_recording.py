"""How should an OOM trial be recorded so that TPE learns the most from it? A simulation.

No training: the service's own pieces sample and judge each trial. The shipped ko-retrieval
spec and sampler (``resolve_spec``, ``make_sampler``: TPE, multivariate, group, constant liar,
8 startup trials) sample the conditional space (``sample_params``, ``build_config``), and a
trial runs out of memory when the service's CUDA estimate for the REAL model
(``estimate_peak_memory(MODELS[name], cfg, device_type="cuda")``) exceeds a device budget.
By default gradient checkpointing is off for every model (``dataclasses.replace``), so that a
real share of the space runs out of memory (at 24 GiB every bge-m3-ko config does). A trial
that fits gets a synthetic nDCG@10: a smooth function of the model, lr, temperature, batch
size and max_len plus small noise (the bigger, longer configs near the memory edge score best,
so the sampler has to learn where that edge is). In-memory storage, ``ask``/``tell``, no
preflight and no frontier: what is measured is what the SAMPLER learns.

Recordings of an OOM trial compared, on the same seeds:

* ``pruned`` - PRUNED with no intermediate value (the runner's current ``_tell``);
* ``fail`` - FAIL, as the old sweeps had it (TPE ignores FAIL trials, also in its startup count);
* ``constraint+pruned`` - ``trial.set_constraint("oom", estimate - budget in GiB)`` then PRUNED;
* ``constraint+complete`` - the same constraint, told COMPLETE with the value 0.0 (the floor);
* ``random`` - reference: RandomSampler (learns nothing), OOM told PRUNED.

In the constraint recordings a trial that fits records its (negative) margin as the same
constraint. ``Trial.set_constraint`` is Optuna 5's API (``TPESampler(constraints_func=...)``
is deprecated there and stores under the same ``constraints`` system attribute); TPE reads
``FrozenTrial.constraints`` whatever the sampler was built with, so the service's sampler
needs no change for it.

Measured per study: OOM trials after the startup trials (trial number >= n_startup_trials;
lower is better), all OOM trials, and the best score reached (higher is better), as mean and
standard deviation over seeds; the gap to the optimum is the best feasible noise-free score
minus the noise-free score of the trial with the best observed value (the one a user picks).
The anchor is the current recording (``pruned``) in the same run. Also: on how many seeds
a recording sampled exactly the same trials as ``pruned``.

Shared names against branch names (``--space both``): the same simulation, OOM told PRUNED,
with today's space (``shared``: ``sample_params`` and ``make_sampler``, every trial samples
``model``, ``batch_size``, ``max_len``, ... under one name each, the sampler keeping each
model's choices) against the earlier one (``branch``: ``batch_size.<model>`` /
``max_len.<model>`` per model, plain TPE), on the same seeds. Printed per budget: the median
over seeds of the trials needed to reach a config within ``--near`` of the best feasible
score (noise-free; a study that never does counts as trials + 1), of the best score after
20, 40 and all trials, and of the OOM count; the paired difference shared - branch (median,
mean +- 2 standard errors, and on how many seeds shared is better / worse).

Run::

    python bench/bench_oom_recording.py                      # 24 and 40 GiB, 10 seeds x 80
    python bench/bench_oom_recording.py --space both --seeds 20   # shared vs branch names
    python bench/bench_oom_recording.py --seeds 20 --trials 100 --budgets 24,40,80
    python bench/bench_oom_recording.py --checkpointing spec  # bge-m3-ko checkpointed, as shipped
    python bench/bench_oom_recording.py --startup 20           # more random trials first
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from search.memory.estimate import estimate_peak_memory  # noqa: E402
from search.record.models import MODELS  # noqa: E402
from search.sampling.sampler import make_base_sampler  # noqa: E402
from search.sampling.sampler import make_sampler  # noqa: E402
from search.sampling.space import SampledParams  # noqa: E402
from search.sampling.space import branch_name  # noqa: E402
from search.sampling.space import build_config  # noqa: E402
from search.sampling.space import sample_params  # noqa: E402
from search.spec.load import resolve_spec  # noqa: E402
from search.spec.study_spec import StudySpec  # noqa: E402

GIB = 1024**3
CONSTRAINT_KEY = "oom"  # the constraint's name: estimate - budget in GiB, > 0 is an OOM
PESSIMISTIC_VALUE = 0.0  # nDCG@10's floor, for the constraint+complete recording

# Synthetic quality: a base per model (published Korean retrieval nDCG@10, DESIGN.md), an
# optimum in log(lr) and log(temperature), and gains from bigger batches (more in-batch
# negatives) and longer inputs (less truncation), which are what costs memory.
BASE = {
    "bge-m3-ko": 0.80,
    "multilingual-e5-small": 0.75,
    "ko-simcse": 0.62,
    "multilingual-minilm": 0.46,
}
LR_OPT = {"bge-m3-ko": 2e-5, "multilingual-e5-small": 5e-5, "ko-simcse": 5e-5}
LR_OPT_DEFAULT = 5e-5
TEMPERATURE_OPT = 0.03
NOISE_SD = 0.003


def quality(p: SampledParams) -> float:
    """Noise-free synthetic nDCG@10 of a config that fits in memory."""
    lr_opt = LR_OPT.get(p.model, LR_OPT_DEFAULT)
    return (
        BASE[p.model]
        - 0.06 * math.log10(p.lr / lr_opt) ** 2
        - 0.04 * math.log10(p.temperature / TEMPERATURE_OPT) ** 2
        + 0.012 * math.log2(p.batch_size / 32)
        + 0.02 * (1 - 128 / p.max_len)
        - 0.02 * (p.warmup_ratio - 0.1) ** 2
    )


def noise(seed: int, number: int) -> float:
    """The noise of trial ``number`` in the study of ``seed`` (same for every recording)."""
    return random.Random(seed * 1_000_003 + number).gauss(0.0, NOISE_SD)


class Judge:
    """Decides OOM from the service's CUDA estimate of the real model against a budget.

    Args:
        spec: The study spec (for ``build_config``).
        budget_gib: Device memory in GiB.
        checkpointing: ``off`` forces gradient checkpointing off for every model; ``spec``
            keeps the spec's settings (bge-m3-ko checkpointed).
    """

    def __init__(self, spec: StudySpec, budget_gib: float, *, checkpointing: str) -> None:
        if budget_gib <= 0:
            raise ValueError(f"budget must be positive, but got {budget_gib=}.")
        if checkpointing not in ("off", "spec"):
            raise ValueError(f"checkpointing must be off or spec, but got {checkpointing=}.")
        self._spec = spec
        self._budget_gib = budget_gib
        self._checkpointing = checkpointing

    @functools.cache  # noqa: B019 - a few dozen shapes per judge
    def estimate_gib(self, model: str, batch_size: int, max_len: int) -> float:
        """Estimated peak of a shape in GiB (lr and the other floats do not change it)."""
        params = SampledParams(model, batch_size, max_len, 5e-5, 0.05, 0.1, 0.01)
        cfg = build_config(self._spec, params, device="cuda")
        if self._checkpointing == "off":
            cfg = dataclasses.replace(cfg, gradient_checkpointing=False)
        return estimate_peak_memory(MODELS[model], cfg, device_type="cuda").total_bytes / GIB

    def margin_gib(self, p: SampledParams) -> float:
        """Estimate minus budget in GiB: above 0 the trial runs out of memory."""
        return self.estimate_gib(p.model, p.batch_size, p.max_len) - self._budget_gib

    def best_feasible(self) -> float:
        """Noise-free score of the best config that fits (lr, temperature at their optima)."""
        best = -math.inf
        for model in self._spec.models:
            choices = self._spec.space.choices_for(model)
            for b in choices["batch_size"]:
                for s in choices["max_len"]:
                    if self.estimate_gib(model, b, s) > self._budget_gib:
                        continue
                    lr = LR_OPT.get(model, LR_OPT_DEFAULT)
                    p = SampledParams(model, b, s, lr, TEMPERATURE_OPT, 0.1, 0.0)
                    best = max(best, quality(p))
        return best

    def oom_share(self) -> float:
        """Share of the conditional space's (model, batch, max_len) cells that OOM."""
        cells = [
            (m, b, s)
            for m in self._spec.models
            for b in self._spec.space.choices_for(m)["batch_size"]
            for s in self._spec.space.choices_for(m)["max_len"]
        ]
        return sum(self.estimate_gib(*c) > self._budget_gib for c in cells) / len(cells)


Tell = Callable[[optuna.Study, optuna.Trial, float, float | None], None]


def _tell_pruned(study: optuna.Study, trial: optuna.Trial, margin: float, v: float | None) -> None:
    if v is None:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, v)


def _tell_fail(study: optuna.Study, trial: optuna.Trial, margin: float, v: float | None) -> None:
    if v is None:
        study.tell(trial, state=TrialState.FAIL)
    else:
        study.tell(trial, v)


def _tell_constraint_pruned(
    study: optuna.Study, trial: optuna.Trial, margin: float, v: float | None
) -> None:
    trial.set_constraint(CONSTRAINT_KEY, margin)
    if v is None:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, v)


def _tell_constraint_complete(
    study: optuna.Study, trial: optuna.Trial, margin: float, v: float | None
) -> None:
    trial.set_constraint(CONSTRAINT_KEY, margin)
    study.tell(trial, PESSIMISTIC_VALUE if v is None else v)


RECORDINGS: dict[str, Tell] = {
    "pruned": _tell_pruned,
    "fail": _tell_fail,
    "constraint+pruned": _tell_constraint_pruned,
    "constraint+complete": _tell_constraint_complete,
    "random": _tell_pruned,
}
ANCHOR = "pruned"


def _branch_choice(trial: optuna.Trial, field: str, model: str, choices: list[int]) -> int:
    if len(choices) == 1:
        return choices[0]
    return int(trial.suggest_categorical(branch_name(field, model), choices))


def sample_branch_params(trial: optuna.Trial, spec: StudySpec) -> SampledParams:
    """The space as sampled before the shared names: one name per model's branch."""
    model = str(trial.suggest_categorical("model", list(spec.models)))
    choices = spec.space.choices_for(model)
    space = spec.space
    return SampledParams(
        model=model,
        batch_size=_branch_choice(trial, "batch_size", model, choices["batch_size"]),
        max_len=_branch_choice(trial, "max_len", model, choices["max_len"]),
        lr=trial.suggest_float("lr", space.lr.low, space.lr.high, log=space.lr.log),
        temperature=trial.suggest_float(
            "temperature", space.temperature.low, space.temperature.high, log=True
        ),
        warmup_ratio=trial.suggest_float(
            "warmup_ratio", space.warmup_ratio.low, space.warmup_ratio.high
        ),
        weight_decay=trial.suggest_float(
            "weight_decay", space.weight_decay.low, space.weight_decay.high
        ),
    )


SPACES = ("shared", "branch")


@dataclass(frozen=True)
class StudyResult:
    """One simulated study: OOM counts, the best score and the sampled trials in order."""

    ooms_after_startup: int
    ooms: int
    best: float
    best_true: float
    trajectory: tuple[tuple[object, ...], ...]
    best_at: tuple[float, ...] = ()  # best observed score after each trial
    true_by_trial: tuple[float, ...] = ()  # noise-free score of each trial (0.0 for an OOM)


def simulate(
    spec: StudySpec,
    judge: Judge,
    recording: str,
    *,
    seed: int,
    n_trials: int,
    space: str = "shared",
) -> StudyResult:
    """Run ``n_trials`` ask/tell trials of one recording on an in-memory study.

    ``space``: ``shared`` samples with the service's ``sample_params`` and ``make_sampler``,
    ``branch`` with per-model branch names and plain TPE (``make_base_sampler``).
    """
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, but got {space=}.")
    sample = sample_params if space == "shared" else sample_branch_params
    if recording == "random":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed)
    elif space == "shared":
        sampler = make_sampler(spec, seed=seed)
    else:
        sampler = make_base_sampler(spec, seed=seed)
    study = optuna.create_study(direction=spec.study.direction, sampler=sampler)
    tell = RECORDINGS[recording]
    n_startup = spec.sampler.n_startup_trials
    ooms = ooms_after = 0
    best = best_true = -math.inf
    trajectory = []
    best_at: list[float] = []
    true_by_trial: list[float] = []
    for _ in range(n_trials):
        trial = study.ask()
        p = sample(trial, spec)
        trajectory.append(dataclasses.astuple(p))
        margin = judge.margin_gib(p)
        if margin > 0:
            ooms += 1
            ooms_after += trial.number >= n_startup
            tell(study, trial, margin, None)
            best_at.append(max(best, 0.0))
            true_by_trial.append(0.0)
            continue
        value = quality(p) + noise(seed, trial.number)
        if value > best:
            best, best_true = value, quality(p)
        tell(study, trial, margin, value)
        best_at.append(best)
        true_by_trial.append(quality(p))
    if best == -math.inf:  # nothing fitted: score the study at nDCG's floor
        best = best_true = 0.0
    return StudyResult(
        ooms_after, ooms, best, best_true, tuple(trajectory), tuple(best_at), tuple(true_by_trial)
    )


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _se_diff(a: list[float], b: list[float]) -> float:
    """Standard error of the mean paired difference (same seeds)."""
    d = [x - y for x, y in zip(a, b, strict=True)]
    return statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else 0.0


def trials_to_near(result: StudyResult, optimum: float, near: float) -> int:
    """Trials until one scores (noise-free) within ``near`` of ``optimum``; else trials + 1."""
    for number, true in enumerate(result.true_by_trial):
        if true >= optimum - near:
            return number + 1
    return len(result.true_by_trial) + 1


def _paired(shared: list[float], branch: list[float], *, lower_is_better: bool) -> str:
    """Median paired difference, mean +- 2 standard errors, and seeds better / worse."""
    d = [a - b for a, b in zip(shared, branch, strict=True)]
    better = sum((x < 0) if lower_is_better else (x > 0) for x in d)
    worse = sum((x > 0) if lower_is_better else (x < 0) for x in d)
    two_se = 2 * _se_diff(shared, branch)
    return (
        f"{statistics.median(d):+8.3f}  {statistics.fmean(d):+8.4f} +- {two_se:.4f}  "
        f"{better:>2} / {worse:<2}"
    )


def compare_spaces(
    spec: StudySpec, budgets: list[float], seeds: list[int], args: argparse.Namespace
) -> None:
    """Shared names against branch names on the same seeds, OOM told PRUNED (the runner's)."""
    checkpoints = [n for n in (20, 40) if n < args.trials] + [args.trials]
    for budget in budgets:
        judge = Judge(spec, budget, checkpointing=args.checkpointing)
        optimum = judge.best_feasible()
        print(
            f"\n{budget:g} GiB: {judge.oom_share():.0%} of (model, batch, max_len) cells OOM; "
            f"best feasible score {optimum:.4f}; near = within {args.near} of it"
        )
        results = {
            space: [
                simulate(spec, judge, ANCHOR, seed=s, n_trials=args.trials, space=space)
                for s in seeds
            ]
            for space in SPACES
        }
        rows: list[tuple[str, dict[str, list[float]], bool, str]] = []
        to_near = {
            k: [float(trials_to_near(r, optimum, args.near)) for r in v]
            for k, v in results.items()
        }
        rows.append(("trials to near-optimum", to_near, True, "{:8.1f}"))
        for n in checkpoints:
            best_n = {k: [r.best_at[n - 1] for r in v] for k, v in results.items()}
            rows.append((f"best score after {n}", best_n, False, "{:8.4f}"))
        gap = {k: [optimum - r.best_true for r in v] for k, v in results.items()}
        rows.append(("gap of the picked trial", gap, True, "{:8.4f}"))
        rows.append(
            (
                "OOM trials",
                {k: [float(r.ooms) for r in v] for k, v in results.items()},
                True,
                "{:8.1f}",
            )
        )
        rows.append(
            (
                "OOM after startup",
                {k: [float(r.ooms_after_startup) for r in v] for k, v in results.items()},
                True,
                "{:8.1f}",
            )
        )
        print(
            f"{'median over seeds':<24} {'shared':>8} {'branch':>8}  shared - branch, paired: "
            "median, mean +- 2 se, seeds better / worse"
        )
        for label, by_space, lower, fmt in rows:
            sh, br = by_space["shared"], by_space["branch"]
            print(
                f"{label:<24} {fmt.format(statistics.median(sh))} "
                f"{fmt.format(statistics.median(br))}  "
                f"{_paired(sh, br, lower_is_better=lower)}"
            )


def main(argv: list[str] | None = None) -> int:
    """Run every recording over the seeds and budgets, print the table and the verdict."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10, help="studies per recording and budget")
    ap.add_argument("--trials", type=int, default=80, help="trials per study")
    ap.add_argument("--budgets", default="24,40", help="device budgets in GiB, comma-separated")
    ap.add_argument("--checkpointing", choices=("off", "spec"), default="off")
    ap.add_argument("--recordings", default=",".join(RECORDINGS))
    ap.add_argument(
        "--space",
        choices=(*SPACES, "both"),
        default="shared",
        help="parameter names: shared (the service's), branch (before), both (compare them)",
    )
    ap.add_argument(
        "--near", type=float, default=0.01, help="--space both: 'near-optimum' score margin"
    )
    ap.add_argument(
        "--startup", type=int, default=None, help="override the spec's n_startup_trials"
    )
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)

    spec = resolve_spec("ko-retrieval", None)
    if args.startup is not None:
        sampler_section = spec.sampler.model_copy(update={"n_startup_trials": args.startup})
        spec = spec.model_copy(update={"sampler": sampler_section})
    recordings = [r for r in args.recordings.split(",") if r]
    unknown = sorted(set(recordings) - set(RECORDINGS))
    if unknown:
        ap.error(f"unknown recordings {unknown}; known: {', '.join(RECORDINGS)}")
    if ANCHOR not in recordings:
        recordings.insert(0, ANCHOR)
    seeds = list(range(args.seeds))
    budgets = [float(b) for b in args.budgets.split(",") if b]
    started = time.perf_counter()
    print(
        f"ko-retrieval space, {args.trials} trials x {len(seeds)} seeds per cell, "
        f"n_startup_trials={spec.sampler.n_startup_trials}, checkpointing={args.checkpointing}, "
        f"space={args.space}"
    )
    if args.space == "both":
        compare_spaces(spec, budgets, seeds, args)
        print(f"\nwall time {time.perf_counter() - started:.0f} s")
        return 0
    header = (
        f"{'budget':>6} {'recording':<20} {'OOM after startup':>18} {'OOM all':>8} "
        f"{'best score':>15} {'gap to optimum':>14} {'same as pruned':>14}"
    )
    wins: dict[str, list[str]] = {r: [] for r in recordings if r != ANCHOR}
    losses: dict[str, list[str]] = {r: [] for r in recordings if r != ANCHOR}
    identical: dict[str, int] = {r: 0 for r in recordings}  # studies equal to the anchor's
    for budget in budgets:
        judge = Judge(spec, budget, checkpointing=args.checkpointing)
        optimum = judge.best_feasible()
        print(
            f"\n{budget:g} GiB: {judge.oom_share():.0%} of (model, batch, max_len) cells OOM; "
            f"best feasible score {optimum:.4f}"
        )
        print(header)
        results = {
            r: [
                simulate(spec, judge, r, seed=s, n_trials=args.trials, space=args.space)
                for s in seeds
            ]
            for r in recordings
        }
        anchor = results[ANCHOR]
        a_after = [float(x.ooms_after_startup) for x in anchor]
        a_best = [x.best for x in anchor]
        for r in recordings:
            res = results[r]
            after = [float(x.ooms_after_startup) for x in res]
            best = [x.best for x in res]
            same = sum(x.trajectory == y.trajectory for x, y in zip(res, anchor, strict=True))
            identical[r] += same
            m_after, sd_after = _mean_sd(after)
            m_all, _ = _mean_sd([float(x.ooms) for x in res])
            m_best, sd_best = _mean_sd(best)
            gap = optimum - statistics.fmean(x.best_true for x in res)
            print(
                f"{budget:>6g} {r:<20} {m_after:>9.1f} +- {sd_after:>5.1f} {m_all:>8.1f} "
                f"{m_best:>7.4f} +- {sd_best:.4f} {gap:>14.4f} "
                f"{same:>9}/{len(seeds)}"
            )
            if r == ANCHOR or r == "random":
                continue
            # Better on OOMs by more than 2 paired standard errors, and not worse on the best
            # score by more than 2 (or the reverse), counts as a win (loss) at this budget.
            d_after = statistics.fmean(after) - statistics.fmean(a_after)
            d_best = statistics.fmean(best) - statistics.fmean(a_best)
            se_after, se_best = _se_diff(after, a_after), _se_diff(best, a_best)
            fewer = d_after < -2 * se_after and d_after < 0
            more = d_after > 2 * se_after and d_after > 0
            higher = d_best > 2 * se_best and d_best > 0
            lower = d_best < -2 * se_best and d_best < 0
            if (fewer and not lower) or (higher and not more):
                wins[r].append(f"{budget:g}")
            if (more and not higher) or (lower and not fewer):
                losses[r].append(f"{budget:g}")
        randoms = results.get("random", [])
        r_after = statistics.fmean(x.ooms_after_startup for x in randoms) if randoms else 0.0
        if r_after > 0:
            print(
                f"{'':>6} ratio OOM after startup, {ANCHOR} / random: "
                f"{statistics.fmean(a_after) / r_after:.2f}"
            )
    print(f"\nwall time {time.perf_counter() - started:.0f} s")
    winners = [r for r, w in wins.items() if w and not losses[r]]
    n_studies = len(seeds) * len(budgets)
    for r in wins:
        if r == "random":
            continue
        print(
            f"{r:<20} vs {ANCHOR}: better at {', '.join(wins[r]) or 'no'} GiB, "
            f"worse at {', '.join(losses[r]) or 'no'} GiB (2 paired standard errors); "
            f"sampled the same trials in {identical[r]}/{n_studies} studies"
        )
    if winners:
        print(f"VERDICT: record an OOM as {winners[0]} (beats {ANCHOR} without losing anywhere)")
    else:
        print(
            f"VERDICT: keep {ANCHOR} (no other recording beats it by more than the noise "
            "on OOMs after startup or on the best score)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
