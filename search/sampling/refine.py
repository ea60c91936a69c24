"""Refine around what worked: configs near the study's top K trials, new and not ruled out.

``search refine --study NAME [--top K] [--n-trials N]`` and the ``refine`` stage of a staged
search (``search.sampling.stages``, ``seed: top_k``) both call :func:`refine_candidates`, a pure
function of the study's trials and spec (no storage), so a simulation can call it too.

Around each of the top K completed trials, in this order (round-robin over the K trials):

1. its own shape with the learning rate, then the temperature, times and divided by
   ``FACTOR``, then the warm-up ratio minus and plus ``STEP`` of its range (all kept within
   the space's range): the settings first, because they have an optimum inside their range
   that only moves around the trial find, and in contrastive fine-tuning they move the score
   more than a neighbouring shape does (a trial's shape is mostly already the largest the
   device allows: the big-safe stage starts at the frontier);
2. its neighbouring shapes: the next smaller and larger ``batch_size`` and ``max_len`` among
   the model's choices (space, its conditions, and the stage's conditions), with the trial's
   own learning rate, temperature, warm-up and weight decay;
3. then random draws: a shape among the trial's own and its neighbours, learning rate and
   temperature log-uniform within ``FACTOR`` of the trial's, warm-up and weight decay uniform
   within ``STEP`` of their range around the trial's (every setting moves, so a top trial
   with a poor warm-up can still be refined into a good one).

When single moves stall (the refine stage's last finished trials, ``STALL`` or more in a row,
did not improve on the study's best before each: ``stall_length``), joint moves come first
around each top trial (``_joint``), one more for each further ``STALL`` trials without a new
best (counted in a fixed order, tried ones included, so a stall that lasts gets a few of them,
not only them): towards where the top trials' differences point (from each other top trial of
the same model through the trial, as far again), then two, then three of the learning rate,
temperature and warm-up moved together by a single move's step each; after them, the list
above. Settings that interact (learning rate and warm-up, temperature and batch) can hold a
trial in a spot that no single move leaves.

A candidate is kept only if it is new (no trial of the study, queued ones included, has the
same parameters) and no real OOM of the study rules it out (``search.memory.frontier``:
``find_frontier_oom`` on the trial's recorded config with the candidate's values).

``search refine`` enqueues the candidates (user attribute ``stage`` = ``refine``) and raises
the study's budget by their count under the budget lock, so the next ``search run`` /
``search worker`` on the study runs them first (enqueued trials are claimed before fresh
ones), like any other trials.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Iterator
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

from optuna.trial import TrialState

from search.memory.frontier import find_frontier_oom
from search.record import attrs
from search.record.config import TrialConfig
from search.record.counts import budget_lock_name
from search.record.counts import is_skip
from search.record.counts import spent_count
from search.record.trial_record import config_of
from search.spec.stage_check import stage_choices
from storage import compat
from storage import named_lock

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from search.spec.study_spec import StudySpec

FACTOR = 2.0  # learning rate and temperature move within this factor of the best trial's
STEP = 0.25  # warm-up and weight decay move within this fraction of their range
STALL = 3  # refine trials in a row without a new best per joint move (``stall_length``)
JOINT = ("lr", "temperature", "warmup_ratio")  # the settings joint moves move together


PARAMS = ("model", "batch_size", "max_len", "lr", "temperature", "warmup_ratio", "weight_decay")
REFINE_STAGE = "refine"  # the stage recorded on trials enqueued by ``search refine``
_DRAWS = 64  # random draws per top trial before giving up on finding new candidates
_MIB = 1024**2


# Joint moves of one top trial: the other top trials' configs, the completed trials' configs and
# values, the configs tried so far.
_Joint = tuple[
    Sequence[dict[str, Any]], Sequence[tuple[dict[str, Any], float]], set[tuple[Any, ...]]
]


class RefineError(ValueError):
    """Nothing to refine around (no completed trial), or a bad option; one line."""


def top_trials(trials: Sequence[FrozenTrial], k: int, *, maximize: bool) -> list[FrozenTrial]:
    """The ``k`` best COMPLETE trials with a recorded config, best first."""
    done = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE
        and t.value is not None
        and math.isfinite(t.value)
        and config_of(t)
    ]
    done.sort(key=lambda t: (-t.value if maximize else t.value, t.number))  # type: ignore[operator]
    return done[:k]


def params_key(params: dict[str, Any]) -> tuple[Any, ...] | None:
    """What makes two configs the same trial (floats to 9 significant digits)."""
    try:
        return (
            str(params["model"]),
            int(params["batch_size"]),
            int(params["max_len"]),
            *(float(f"{float(params[k]):.9g}") for k in PARAMS[3:]),
        )
    except (KeyError, TypeError, ValueError):
        return None


def tried_keys(trials: Sequence[FrozenTrial]) -> set[tuple[Any, ...]]:
    """Keys of every config the study has tried or queued (effective config, else params)."""
    keys = set()
    for t in trials:
        for source in (config_of(t), t.params, t.system_attrs.get("fixed_params")):
            key = params_key(source) if isinstance(source, dict) else None
            if key is not None:
                keys.add(key)
    return keys


def _choices(spec: StudySpec, model: str, stage: str | None) -> dict[str, tuple[int, ...]]:
    if stage is not None:
        entry = stage_choices(spec).get(stage)
        if entry is not None and model in entry["model"]:
            return {f: entry[f][model] for f in ("batch_size", "max_len")}
    return {f: tuple(c) for f, c in spec.space.choices_for(model).items()}


def _neighbours(value: int, choices: Sequence[int]) -> list[int]:
    """The choices next to ``value`` (smaller first); its nearest if it is not a choice."""
    ordered = sorted(choices)
    if value not in ordered:
        return [min(ordered, key=lambda c: abs(c - value))]
    i = ordered.index(value)
    return [ordered[j] for j in (i - 1, i + 1) if 0 <= j < len(ordered)]


def _clip(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def stall_length(trials: Sequence[FrozenTrial], stage: str, *, maximize: bool) -> int:
    """How many of the last finished trials of ``stage`` (skips excluded), in a row, did not
    beat the best COMPLETE trial numbered before each of them."""
    own = [
        t
        for t in trials
        if t.user_attrs.get(attrs.STAGE) == stage and t.state.is_finished() and not is_skip(t)
    ]
    own.sort(key=lambda t: t.number, reverse=True)
    sign = 1.0 if maximize else -1.0
    # The best value so far after each completed trial, by number (one pass, not one per trial).
    done = top_trials(trials, len(trials), maximize=maximize)
    done.sort(key=lambda t: t.number)
    numbers = [t.number for t in done]
    best_so_far: list[float] = []
    for t in done:
        value = sign * float(t.value or 0.0)
        best_so_far.append(max(value, best_so_far[-1]) if best_so_far else value)
    for i, t in enumerate(own):
        if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value):
            before = bisect.bisect_left(numbers, t.number)  # completed trials numbered before
            if before == 0 or sign * t.value > best_so_far[before - 1]:
                return i
    return len(own)


def _coords(config: dict[str, Any]) -> dict[str, float]:
    """The settings on the scales refine moves them on (log for lr and temperature)."""
    return {
        k: math.log(float(config[k])) if k in ("lr", "temperature") else float(config[k])
        for k in PARAMS[3:]
    }


def _settings(coords: dict[str, float], spec: StudySpec) -> dict[str, float]:
    out = {}
    for k, v in coords.items():
        r = getattr(spec.space, k)
        out[k] = _clip(math.exp(v) if k in ("lr", "temperature") else v, r.low, r.high)
    return out


def _vertex(
    base: dict[str, Any], done: Sequence[tuple[dict[str, Any], float]], spec: StudySpec
) -> dict[str, Any] | None:
    """``base`` with each setting at the top of the parabola through ``base`` and its single
    moves of that setting (completed trials of its shape that differ from it in that setting
    only; on the scale refine moves it on), kept between those points; None when no setting
    has a parabola that opens downwards (for the better direction)."""
    centre = _coords(base)
    maximize = spec.study.direction == "maximize"
    shape = (base["model"], int(base["batch_size"]), int(base["max_len"]))
    points: dict[str, list[tuple[float, float]]] = {k: [] for k in centre}
    for config, value in done:
        if (config.get("model"), config.get("batch_size"), config.get("max_len")) != shape:
            continue
        try:
            coords = _coords(config)
        except (KeyError, TypeError, ValueError):
            continue
        moved = [k for k in centre if abs(coords[k] - centre[k]) > 1e-9]
        if len(moved) == 1:
            points[moved[0]].append((coords[moved[0]], value if maximize else -value))
        elif not moved:
            points["lr"].append((centre["lr"], value if maximize else -value))
    target = dict(centre)
    for k, pts in points.items():
        xs = sorted({x for x, _ in pts})
        if k == "lr":  # the centre's own value(s), recorded under lr
            centre_ys = [y for x, y in pts if abs(x - centre[k]) <= 1e-9]
        else:
            centre_ys = [y for x, y in points["lr"] if abs(x - centre["lr"]) <= 1e-9]
        if not centre_ys:
            continue
        left = [(x, y) for x, y in pts if x < centre[k] - 1e-9]
        right = [(x, y) for x, y in pts if x > centre[k] + 1e-9]
        if not left or not right:
            continue
        (x0, y0) = max(left)  # the nearest on each side
        (x2, y2) = min(right)
        x1, y1 = centre[k], max(centre_ys)
        denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
        a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
        b = (x2 * x2 * (y0 - y1) + x1 * x1 * (y2 - y0) + x0 * x0 * (y1 - y2)) / denom
        if a >= 0 or len(xs) < 2:
            continue
        target[k] = min(max(-b / (2 * a), x0), x2)
    if target == centre:
        return None
    return {**base, **_settings(target, spec)}


def _joint(
    base: dict[str, Any],
    others: Sequence[dict[str, Any]],
    done: Sequence[tuple[dict[str, Any], float]],
    spec: StudySpec,
) -> Iterator[dict[str, Any]]:
    """Joint moves around ``base``, in the module docstring's order; ``others``: the other top
    trials' configs; ``done``: the completed trials' configs and values."""
    vertex = _vertex(base, done, spec)
    if vertex is not None:
        yield vertex
    centre = _coords(base)
    for other in others:
        if other.get("model") == base["model"]:
            away = _coords(other)
            moved = {k: v + (v - away[k]) for k, v in centre.items()}
            yield {**base, **_settings(moved, spec)}
    step = {"lr": math.log(FACTOR), "temperature": math.log(FACTOR)}
    step["warmup_ratio"] = STEP * (spec.space.warmup_ratio.high - spec.space.warmup_ratio.low)
    for size in (2, 3):
        for names in itertools.combinations(JOINT, size):
            for signs in itertools.product((-1, 1), repeat=size):
                move = dict(zip(names, signs, strict=True))
                moved = {k: v + move.get(k, 0) * step.get(k, 0.0) for k, v in centre.items()}
                yield {**base, **_settings(moved, spec)}


def _around(
    best: dict[str, Any],
    spec: StudySpec,
    stage: str | None,
    rng: random.Random,
    joint: _Joint | None = None,
) -> Iterator[dict[str, Any]]:
    """Candidates around one trial's config, in the order of the module docstring; ``joint``:
    joint moves first, until as many as the stall allows have been tried."""
    model = str(best["model"])
    if model not in spec.models:
        return
    choices = _choices(spec, model, stage)
    base = {k: best[k] for k in PARAMS}
    if (
        base["batch_size"] not in choices["batch_size"]
        or base["max_len"] not in choices["max_len"]
    ):
        base["batch_size"] = min(choices["batch_size"], key=lambda c: abs(c - base["batch_size"]))
        base["max_len"] = min(choices["max_len"], key=lambda c: abs(c - base["max_len"]))
        yield dict(base)  # the trial's values, moved into this stage's choices
    if joint is not None:
        others, done, tried = joint
        for move in _joint(base, others, done, spec):
            if params_key(move) not in tried:
                yield move
                break
    batches = _neighbours(base["batch_size"], choices["batch_size"])
    lengths = _neighbours(base["max_len"], choices["max_len"])
    space = spec.space
    for name, rng_ in (("lr", space.lr), ("temperature", space.temperature)):
        for f in (1 / FACTOR, FACTOR):
            yield {**base, name: _clip(float(base[name]) * f, rng_.low, rng_.high)}
    step = STEP * (space.warmup_ratio.high - space.warmup_ratio.low)
    for d in (-step, step):
        value = _clip(
            float(base["warmup_ratio"]) + d, space.warmup_ratio.low, space.warmup_ratio.high
        )
        yield {**base, "warmup_ratio": value}
    for b in batches:
        yield {**base, "batch_size": b}
    for n in lengths:
        yield {**base, "max_len": n}
    for b in batches:
        for n in lengths:
            yield {**base, "batch_size": b, "max_len": n}
    shapes = [(base["batch_size"], base["max_len"])]
    shapes += [(b, base["max_len"]) for b in batches] + [(base["batch_size"], n) for n in lengths]
    for _ in range(_DRAWS):
        b, n = rng.choice(shapes)
        draw = {**base, "batch_size": b, "max_len": n}
        for name, rng_ in (("lr", space.lr), ("temperature", space.temperature)):
            low = math.log(max(float(base[name]) / FACTOR, rng_.low))
            high = math.log(min(float(base[name]) * FACTOR, rng_.high))
            draw[name] = math.exp(rng.uniform(low, high)) if high > low else float(base[name])
        for name, rng_ in (
            ("warmup_ratio", space.warmup_ratio),
            ("weight_decay", space.weight_decay),
        ):
            step = STEP * (rng_.high - rng_.low)
            low = max(float(base[name]) - step, rng_.low)
            high = min(float(base[name]) + step, rng_.high)
            draw[name] = rng.uniform(low, high) if high > low else float(base[name])
        yield draw


def refine_candidates(
    trials: Sequence[FrozenTrial],
    spec: StudySpec,
    *,
    top_k: int,
    n: int,
    rng: random.Random,
    stage: str | None = None,
    device_total_bytes: int | None = None,
    start: int = 0,
    stall: str | None = None,
) -> list[dict[str, Any]]:
    """Up to ``n`` new configs around the ``top_k`` best trials (see the module docstring).

    Args:
        trials: The study's trials (any states; WAITING ones count as tried).
        spec: The study spec (its space and conditions).
        top_k: How many of the best completed trials to refine around.
        n: How many candidates at most.
        rng: Source of the random draws (seed it for a reproducible list).
        stage: Keep to this stage's models' choices (``stages:``); None: the space's.
        device_total_bytes: The device the candidates will run on, for the OOM frontier;
            None: each top trial's own recorded device memory (0 when not recorded: then any
            real OOM of a dominated config rules a candidate out).
        start: Begin the round-robin with the ``start``-th best (modulo ``top_k``), so that
            one config at a time still turns around the top K.
        stall: The stage whose trials tell whether single moves stalled (``stall_length``);
            default ``stage``, else ``REFINE_STAGE``.

    Returns:
        Fixed parameters for ``study.enqueue_trial``: every sampled parameter.
    """
    if n < 1 or top_k < 1:
        return []
    maximize = spec.study.direction == "maximize"
    tops = top_trials(trials, top_k, maximize=maximize)
    seen = tried_keys(trials)
    finished = [t for t in trials if t.state.is_finished()]
    length = stall_length(trials, stall or stage or REFINE_STAGE, maximize=maximize)
    allowed = length >= STALL and length % STALL == 0
    done = (  # the completed trials' configs and values, for joint moves only
        [
            (config_of(t) or {}, float(t.value or 0.0))
            for t in top_trials(trials, len(trials), maximize=maximize)
        ]
        if allowed
        else []
    )
    configs = [config_of(t) or {} for t in tops]
    streams = []
    for i, t in enumerate(tops):
        config = configs[i]
        joint = (configs[:i] + configs[i + 1 :], done, seen) if allowed else None
        if device_total_bytes is None:
            memory = t.user_attrs.get(attrs.DEVICE_MEMORY_MB)
            device = int(float(memory) * _MIB) if isinstance(memory, (int, float)) else 0
        else:
            device = device_total_bytes
        streams.append((config, device, _around(config, spec, stage, rng, joint)))
    if streams:
        first = start % len(streams)
        streams = streams[first:] + streams[:first]
    out: list[dict[str, Any]] = []
    while streams and len(out) < n:
        for entry in list(streams):
            config, device, stream = entry
            candidate = next(stream, None)
            if candidate is None:
                streams.remove(entry)
                continue
            key = params_key(candidate)
            if key is None or key in seen:
                continue
            seen.add(key)
            try:
                cfg = TrialConfig.from_json({**config, **candidate})
            except (TypeError, ValueError):
                continue
            if find_frontier_oom(finished, cfg, device) is not None:
                continue
            out.append(candidate)
            if len(out) >= n:
                break
    return out


def enqueue_refine(
    study: optuna.Study,
    spec: StudySpec,
    *,
    top_k: int,
    n: int,
    seed: int | None = None,
    device_total_bytes: int | None = None,
) -> list[dict[str, Any]]:
    """Enqueue up to ``n`` refine candidates and raise the study's budget by their count.

    Both under the study's budget lock, so a worker claiming meanwhile sees both or neither.
    ``device_total_bytes``: the device the candidates will run on (``refine_candidates``).

    Raises:
        RefineError: The study has no completed trial to refine around.
    """
    with named_lock(compat.study_storage(study), budget_lock_name(study)):
        trials = study.get_trials(deepcopy=False)
        maximize = spec.study.direction == "maximize"
        if not top_trials(trials, 1, maximize=maximize):
            raise RefineError(
                f"study {study.study_name!r} has no completed trial to refine around yet"
            )
        candidates = refine_candidates(
            trials,
            spec,
            top_k=top_k,
            n=n,
            rng=random.Random(seed),
            device_total_bytes=device_total_bytes,
        )
        for params in candidates:
            study.enqueue_trial(params, user_attrs={attrs.STAGE: REFINE_STAGE})
        if candidates:
            stored = study.user_attrs.get(attrs.STUDY_N_TRIALS)
            spent = _spent(trials)
            base = max(int(stored), spent) if stored is not None else spent
            study.set_user_attr(attrs.STUDY_N_TRIALS, base + len(candidates))
    return candidates


def _spent(trials: Sequence[FrozenTrial]) -> int:
    return spent_count(trials)
