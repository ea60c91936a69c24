"""What the sampler's feasible grid costs per trial, against the preflight of one config.

Before each trial the worker asks the preflight about every (batch_size, max_len) pair of every
model (``search.memory.feasible.feasible_grid``): 40 pairs in the shipped ko-retrieval spec. The
anchor, in the same process over the same trial list, is what every trial already paid: the
preflight of its one config against the study's trials (``search.memory.preflight.preflight``).
Trials are synthetic completed records (the frontier reads only records); the device is a 24 GiB
GPU.

Run::

    python bench/bench_feasible_grid.py                    # 0, 1,000 and 10,000 trials
    python bench/bench_feasible_grid.py --trials 0,100000
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from search.memory.device import DeviceInfo  # noqa: E402
from search.memory.feasible import feasible_grid  # noqa: E402
from search.memory.preflight import preflight  # noqa: E402
from search.record import attrs  # noqa: E402
from search.record.config import TrialConfig  # noqa: E402
from search.record.models import MODELS  # noqa: E402
from search.sampling.space import SampledParams  # noqa: E402
from search.sampling.space import build_config  # noqa: E402
from search.spec.load import load_spec  # noqa: E402
from search.spec.study_spec import shipped_spec_path  # noqa: E402

DEVICE = DeviceInfo("cuda:0", "cuda:0 (24 GiB)", 24 * 2**30, 24 * 2**30)


def _timed(fn: Callable[..., object], repeat: int, *fn_args: object) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        fn(*fn_args)
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", default="0,1000,10000", help="comma-separated trial counts")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = load_spec(shipped_spec_path("ko-retrieval"))
    choices = {m: spec.space.choices_for(m) for m in spec.models}
    pairs = sum(len(c["batch_size"]) * len(c["max_len"]) for c in choices.values())

    def config_for(model: str, batch: int, max_len: int) -> TrialConfig:
        params = SampledParams(model, batch, max_len, 5e-5, 0.05, 0.1, 0.05)
        return build_config(spec, params, device="cuda")

    print(f"# shipped ko-retrieval, {pairs} pairs over {len(choices)} models, {DEVICE.label}")
    for n in (int(x) for x in args.trials.split(",")):
        study = optuna.create_study()
        record = config_for("ko-simcse", 32, 128).to_json()
        for i in range(n):
            ua = {
                attrs.MEMORY_ESTIMATE_MB: 5000.0 + i % 9000,
                attrs.DEVICE_MEMORY_MB: 24576.0,
                attrs.DEVICE_KIND: "cuda",
            }
            if i % 50 == 7:  # a real OOM now and then
                ua |= {attrs.OOM: True, attrs.OOM_KIND: "real"}
            study.add_trial(
                optuna.trial.create_trial(
                    state=TrialState.PRUNED if ua.get(attrs.OOM) else TrialState.COMPLETE,
                    value=None if ua.get(attrs.OOM) else 0.5,
                    user_attrs=ua,
                    system_attrs={attrs.SYSTEM_CONFIG: record},
                )
            )
        trials = study.get_trials(deepcopy=False)
        cfg = config_for("bge-m3-ko", 64, 384)
        one = _timed(preflight, args.repeat, cfg, MODELS["bge-m3-ko"], DEVICE, trials)
        grid = _timed(feasible_grid, args.repeat, choices, config_for, MODELS.get, DEVICE, trials)
        print(
            f"{n:6d} trials: feasible grid {grid * 1000:8.1f} ms, one config's preflight "
            f"{one * 1000:8.1f} ms, ratio {grid / one:6.2f}"
        )


if __name__ == "__main__":
    main()
