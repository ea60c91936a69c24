"""A stage's ``conditions: device``: the big model widens to what each worker's device fits.

Two in-process workers share one SQLite study, each with a surrogate CUDA device (80 GiB and
24 GiB) and a trainer that scores larger shapes higher, so the sampler's choices and the frontier
seeds are the product's (``Worker.open``, ``Worker.step``), with no weights and no GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest

from search.memory.device import DeviceInfo
from search.memory.feasible import PREFLIGHT_STATES
from search.sampling.space import sample_params
from search.sampling.stages import frontier_seeds
from search.spec.load import load_spec
from search.spec.model_facts import resolve_facts
from search.spec.options import RunOptions
from search.spec.stage_check import grid_choices_for
from search.spec.stage_check import stage_choices
from search.spec.study_spec import SpecError
from search.spec.study_spec import StageSection
from search.spec.study_spec import StudySpec
from search.spec.study_spec import shipped_spec_path
from search.worker.isolation import TrialOutcome
from search.worker.worker import Worker

GIB = 2**30
BIG = "bge-m3-ko"
SHIPPED = {(b, n) for b in (32, 64) for n in (256, 384)}  # the space's conditions for BIG


def _spec(conditions: Any = "device") -> StudySpec:
    """The shipped spec with one frontier stage of the big model (``conditions`` its own)."""
    spec = load_spec(shipped_spec_path("ko-retrieval"))
    stage = StageSection.model_validate(
        {"name": "big", "models": [BIG], "conditions": conditions, "seed": "frontier"}
    )
    return spec.model_copy(update={"stages": [stage]})


def _device(gib: int) -> DeviceInfo:
    return DeviceInfo("cuda:0", f"cuda:0 (surrogate, {gib} GiB)", gib * GIB, gib * GIB)


def _trainer(oom: set[tuple[int, int]]) -> Any:
    """Larger shapes score higher; a shape in ``oom`` runs out of memory for real."""

    def train(cfg: Any, hooks: Any) -> TrialOutcome:
        if (cfg.batch_size, cfg.max_len) in oom:
            return TrialOutcome(status="oom", oom_kind="real", error="OutOfMemoryError: surrogate")
        value = 0.2 + cfg.batch_size * cfg.max_len / 1e6 + cfg.lr
        return TrialOutcome(status="complete", value=value, metrics={"ndcg@10": value})

    return train


def _open(spec: StudySpec, tmp_path: Path, gib: int, n: int, oom: set[tuple[int, int]]) -> Worker:
    opts = RunOptions(
        storage_url=f"sqlite:///{tmp_path}/device.db",
        n_trials=n,
        seed=7,
        device="cuda",
        study_name="device-conditions",
    )
    return Worker.open(
        spec,
        opts,
        device=_device(gib),
        facts={BIG: resolve_facts(spec, BIG)},
        model_paths={BIG: "dragonkue/BGE-m3-ko"},
        trainer=_trainer(oom),
        baselines=False,
        warm=False,
    )


def _run(
    spec: StudySpec, tmp_path: Path, n: int, oom: frozenset[tuple[int, int]] = frozenset()
) -> tuple[dict[int, list[tuple[int, int]]], dict[int, Worker]]:
    """Alternate steps of an 80 GiB and a 24 GiB worker (80 first) until the budget is spent:
    each worker's ``(batch_size, max_len)`` per trial it ran, in order."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    workers = {gib: _open(spec, tmp_path, gib, n, set(oom)) for gib in (80, 24)}
    drawn: dict[int, list[tuple[int, int]]] = {80: [], 24: []}
    try:
        for _ in range(n):
            for gib, worker in workers.items():
                result = worker.step()
                if result.frozen is not None:
                    p = result.frozen.params
                    drawn[gib].append((p["batch_size"], p["max_len"]))
    finally:
        for worker in workers.values():
            worker.close()
    return drawn, workers


def _grid(worker: Worker) -> dict[tuple[int, int], bool]:
    trials = worker.study.get_trials(deepcopy=False, states=PREFLIGHT_STATES)
    return dict((worker.feasible_grid(list(trials), {}) or {})[BIG])


def test_device_stages_widen_the_big_model_to_each_workers_device(tmp_path: Path) -> None:
    drawn, workers = _run(_spec(), tmp_path, 12)
    fits80, fits24 = _grid(workers[80]), _grid(workers[24])
    assert (256, 512) in fits80 and (256, 512) not in fits24  # the devices differ
    # The frontier seed, claimed first by the 80 GiB worker: the largest shape of the space.
    assert drawn[80][0] == (256, 512)
    assert set(drawn[80]) - SHIPPED, drawn[80]  # beyond 64 / 384
    assert all(pair in fits80 for pair in drawn[80])
    # The 24 GiB worker keeps to its own device: what its preflight lets run, all sure pairs.
    assert drawn[24] and all(fits24.get(pair) for pair in drawn[24]), (drawn[24], fits24)
    assert not set(drawn[24]) & (set(fits80) - set(fits24))
    # Its own frontier seed would be the largest shape its preflight lets run (here a border one).
    spec, trials = workers[24].spec, workers[24].study.get_trials(deepcopy=False)
    seed24 = workers[24].stage_plan.seeds(spec.stages[0], trials)[0]  # type: ignore[union-attr]
    assert (seed24["batch_size"], seed24["max_len"]) == max(
        fits24, key=lambda s: (s[0] * s[1], s[1])
    )


def test_without_the_opt_in_the_big_model_keeps_the_spec_conditions(tmp_path: Path) -> None:
    drawn, _ = _run(_spec(conditions={}), tmp_path, 8)
    assert drawn[80][0] == (64, 384)  # the frontier seed: the largest of the conditions
    assert set(drawn[80]) | set(drawn[24]) <= SHIPPED


def test_a_real_oom_of_a_widened_shape_narrows_it(tmp_path: Path) -> None:
    drawn, workers = _run(_spec(), tmp_path, 8, oom=frozenset({(256, 512)}))
    assert drawn[80][0] == (256, 512)  # the seed ran out of memory for real
    assert (256, 512) not in drawn[80][1:] + drawn[24]
    assert (256, 512) not in _grid(workers[80])  # the frontier ruled it out on 80 GiB
    worker = workers[80]
    trials = worker.study.get_trials(deepcopy=False)
    seed = worker.stage_plan.seeds(worker.spec.stages[0], trials)[0]  # type: ignore[union-attr]
    assert (seed["batch_size"], seed["max_len"]) == (256, 384)  # the next largest that fits


def test_the_frontier_seed_skips_shapes_the_preflight_would_skip() -> None:
    spec = _spec()
    arch = resolve_facts(spec, BIG)
    from search.memory.feasible import preflight_fits
    from search.sampling.space import SampledParams
    from search.sampling.space import build_config

    def config_for(model: str, batch: int, max_len: int) -> Any:
        params = SampledParams(
            model=model,
            batch_size=batch,
            max_len=max_len,
            lr=3e-5,
            temperature=0.03,
            warmup_ratio=0.1,
            weight_decay=0.05,
        )
        return build_config(spec, params, device="cuda")

    small = _device(16)
    kw: dict[str, Any] = {"config_for": config_for, "device_total_bytes": small.total_bytes}
    blind = frontier_seeds(spec, spec.stages[0], [], **kw)
    told = frontier_seeds(
        spec, spec.stages[0], [], **kw, fits=lambda cfg: preflight_fits(cfg, arch, small, [])
    )
    assert (blind[0]["batch_size"], blind[0]["max_len"]) == (256, 512)  # no real OOM yet
    shape = (told[0]["batch_size"], told[0]["max_len"])
    assert shape != (256, 512) and preflight_fits(config_for(BIG, *shape), arch, small, [])


def test_stage_choices_and_the_grid_say_device() -> None:
    spec = _spec()
    big = stage_choices(spec)["big"]
    assert big["conditions"] == "device"
    assert big["batch_size"][BIG] == (32, 64, 128, 256)
    assert big["max_len"][BIG] == (128, 256, 384, 512)
    assert grid_choices_for(spec, BIG) == {
        "batch_size": [32, 64, 128, 256],
        "max_len": [128, 256, 384, 512],
    }
    plain = _spec(conditions={})
    assert stage_choices(plain)["big"]["conditions"] == "spec"
    assert grid_choices_for(plain, BIG) == {"batch_size": [32, 64], "max_len": [256, 384]}


def test_without_a_grid_a_device_stage_keeps_the_space_conditions() -> None:
    """No preflight (``--no-estimate --no-frontier``): nothing says what fits, so no widening."""
    from search.sampling.sampler import make_sampler

    spec = _spec()
    sampler = make_sampler(spec, seed=1)
    sampler.stage = "big"
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for _ in range(12):
        trial = study.ask()
        p = sample_params(trial, spec)
        assert (p.batch_size, p.max_len) in SHIPPED
        study.tell(trial, 0.5)


def _spec_file(tmp_path: Path, old: str, new: str, *more: tuple[str, str]) -> Path:
    text = shipped_spec_path("ko-retrieval").read_text(encoding="utf-8")
    for a, b in ((old, new), *more):
        assert text.count(a) == 1
        text = text.replace(a, b)
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_conditions_device_loads_on_a_stage(tmp_path: Path) -> None:
    path = _spec_file(tmp_path, "    n_trials: 6\n", "    n_trials: 6\n    conditions: device\n")
    spec = load_spec(path)
    assert spec.stages[1].conditions == "device"
    assert stage_choices(spec)["big-safe"]["batch_size"][BIG] == (32, 64, 128, 256)


@pytest.mark.parametrize(
    ("old", "new", "field", "why"),
    [
        ("    n_trials: 6\n", "    n_trials: 6\n    conditions: gpu\n",
         "field stages.1.conditions (value: 'gpu')", "expected device"),
        ("    n_trials: 6\n", "    n_trials: 6\n    conditions: [device]\n",
         "field stages.1.conditions", ""),
        ("  conditions:\n    bge-m3-ko:\n      batch_size: [32, 64]\n      max_len: [256, 384]\n"
         "    ko-simcse:\n      max_len: [128]\n", "  conditions: device\n",
         "field space.conditions (value: 'device')", "stages.N.conditions: device"),
    ],
)  # fmt: skip
def test_a_misplaced_or_bad_device_is_one_line(
    tmp_path: Path, old: str, new: str, field: str, why: str
) -> None:
    path = _spec_file(tmp_path, old, new)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert field in message and why in message


def test_a_device_stage_may_not_widen_a_model_past_its_positions(tmp_path: Path) -> None:
    short = "    ko-simcse:\n      max_len: [128]\n"
    more = "".join(
        f"    {m}:\n      max_len: [128]\n"
        for m in ("multilingual-minilm", "multilingual-e5-small")
    )
    edits = [
        ("  max_len: [128, 256, 384, 512]\n", "  max_len: [128, 256, 384, 512, 1024]\n"),
        (short, short + more),
    ]
    assert load_spec(_spec_file(tmp_path, *edits[0], edits[1]))  # conditions keep them short
    path = _spec_file(
        tmp_path,
        *edits[0],
        edits[1],
        ("    n_trials: 16\n", "    n_trials: 16\n    conditions: device\n"),
    )
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(err.value) == (
        f"{path}: field stages.0.conditions (value: 'device'): widens ko-simcse to space.max_len "
        "1024, but it takes at most 512 tokens (its position embeddings); leave ko-simcse out "
        "of that stage's models, or drop 1024 from space.max_len"
    )
