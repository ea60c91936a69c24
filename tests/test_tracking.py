"""W&B runs, one per trial: the real ``wandb`` library offline, read back from what it wrote.

The runs come from ``run_study`` itself (the worker owns them). ``fake_train`` below stands in
for the objective in the real trial process: by trial number it completes, falls under the
median rule, or runs out of memory in backward; the next trial is then skipped as ``frontier``
(no process). ``wandb`` 0.2x/0.3x writes an offline run as one ``.wandb`` record log (the
``files/`` directory stays empty until ``wandb sync``): ``_read_run`` parses it with wandb's
own protobuf messages. A tiny replica trained for real shows the loop's per-step stream.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import optuna
import pytest
from _cli import run_search
from _factories import trial_config
from optuna.trial import TrialState

from search.observe.subscribers import standard_subscribers
from search.observe.tracking import Tracker
from search.observe.tracking import TrackingSettings
from search.observe.tracking import tracking_settings
from search.record import attrs
from search.record.trial_record import config_of
from search.spec.load import load_spec
from search.spec.options import DEFAULT_CACHE
from search.spec.options import RunOptions
from search.spec.study_spec import StudySpec
from search.worker.budget import SkipBoundError
from search.worker.runner import run_study as run_study_only
from storage import redact_url

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning"),
]

HERE = "test_tracking"  # the trial process imports fake_train by this module name
DEMO = Path(__file__).resolve().parents[1] / "search" / "studies" / "data" / "ko-demo"
FAKE_KEY = "f" * 8 + "0123456789abcdef0123456789abcdef"  # 40 characters, like a real key
MIB = 2**20


def fake_train(cfg: Any, *, report: Any = None, on_phase: Any = None, on_step: Any = None) -> Any:
    """Trial 0 completes, 1 is pruned after epoch 1, 2 runs out of memory in backward."""
    number = cfg.seed  # training.seed 0: the seed is the trial number
    if on_phase is not None:
        on_phase("forward")
    worker = os.environ.get("TEST_TRACKING_SIGTERM_PID")
    if worker:  # stop the worker (as docker stop would) while this trial trains
        os.kill(int(worker), signal.SIGTERM)
        time.sleep(60)
    if number == 2:
        on_phase("backward")
        raise MemoryError("fake: out of memory in backward")
    metrics: dict[str, float] = {}
    for epoch in (1, 2):
        for step in (1, 2):
            if on_step is not None:
                on_step(2 * (epoch - 1) + step, {"loss": 2.0 / (step + epoch), "lr": cfg.lr})
        value = 0.5 + 0.1 * epoch if number == 0 else 0.1
        metrics = {"ndcg@10": value, "mrr@10": value / 2}
        if report is not None and report(epoch, metrics):
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")
    return {"metrics": metrics, "peak_memory_mb": 12.5}


def _spec(tmp_path: Path, name: str, *, tracking: str = "", extra: str = "") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"""study: {{name: {name}, direction: maximize, metric: ndcg@10, n_trials: 4,
        max_skips_per_trial: 1}}
models:
  ko-simcse: {{}}
space:
  batch_size: [16]
  max_len: [32]
  lr: {{low: 1.0e-5, high: 2.0e-4, log: true}}
  temperature: {{low: 0.01, high: 0.1, log: true}}
  warmup_ratio: {{low: 0.0, high: 0.2}}
  weight_decay: {{low: 0.0, high: 0.1}}
training: {{epochs: 2, amp: false, hard_negatives: 1, seed: 0, max_train_samples: 32}}
data: {{train: {DEMO / "train.jsonl"}, eval: {DEMO}, split: test}}
sampler: {{type: random}}
pruner: {{type: median, n_startup_trials: 1, n_warmup_steps: 0}}
{tracking}
{extra}""",
        encoding="utf-8",
    )
    return path


def _opts(tmp_path: Path, db: str, **over: object) -> RunOptions:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    base: dict[str, object] = dict(
        storage_url=f"sqlite:///{tmp_path / db}",
        device="cpu",
        cache_dir=tmp_path / "cache",
        objective=f"{HERE}:fake_train",
        seed=7,
        worker="wandb-test",
    )
    return RunOptions(**(base | over))  # type: ignore[arg-type]


def run_study(spec: StudySpec, opts: RunOptions) -> Any:
    """``run_study`` with the CLI's observers (the W&B runs come from its tracking subscriber)."""
    return run_study_only(spec, opts, subscribers=standard_subscribers(spec, opts))


# ------------------------------------------------------------------ reading an offline run


@dataclass
class OfflineRun:
    """What one offline ``.wandb`` file holds."""

    run: Any  # wandb's RunRecord: project, run_group, job_type, display_name, config
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None


def _records(path: Path) -> Iterator[Any]:
    """The records of a ``.wandb`` file (a LevelDB-style log of wandb protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()  # type: ignore[attr-defined]  # generated protobuf
            record.ParseFromString(pending)
            pending = b""
            yield record


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def _read_run(directory: Path, run_id: str) -> OfflineRun:
    (path,) = directory.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    out: OfflineRun | None = None
    for record in _records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out = OfflineRun(record.run)
            for item in record.run.config.update:
                out.config[_key(item)] = json.loads(item.value_json)
        elif kind == "history" and out is not None:
            out.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary" and out is not None:
            for item in record.summary.update:
                out.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "exit" and out is not None:
            out.exit_code = record.exit.exit_code
    assert out is not None, f"no run record in {path}"
    return out


def _run(spec: StudySpec, opts: RunOptions) -> optuna.Study:
    """The study after a run; its one config ends on the skip bound once it ran out of memory.

    The spaces here hold one config: after its real OOM every later trial is a frontier skip,
    which spends no budget, so the run stops on the skip bound (1 x the budget here).
    """
    try:
        return run_study(spec, opts).study
    except SkipBoundError:
        return optuna.load_study(study_name=spec.study.name, storage=opts.storage_url)


def _by_number(study: optuna.Study) -> dict[int, optuna.trial.FrozenTrial]:
    return {t.number: t for t in study.get_trials()}


def _outcomes(study: optuna.Study) -> list[tuple[int, TrialState, float | None, dict]]:
    return [(t.number, t.state, t.value, t.params) for t in study.get_trials()]


# ------------------------------------------------------------------------------ the tests


def test_one_offline_run_per_trial_with_config_history_and_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)  # present, yet offline: never written
    monkeypatch.setenv("WANDB_MODE", "offline")
    spec = load_spec(_spec(tmp_path, "tracked", tracking="tracking: {wandb: true}"))
    study = _run(spec, _opts(tmp_path, "study.db"))
    trials = _by_number(study)
    assert [trials[n].user_attrs[attrs.OUTCOME] for n in range(4)] == [
        "complete",
        "pruned",
        "oom",
        "oom",
    ]
    assert len(trials) == 3 + 4  # three trained, then the skip bound's four frontier skips
    assert all(trials[n].user_attrs[attrs.OOM_KIND] == "frontier" for n in range(3, 7))
    runs = {}
    for number, trial in trials.items():
        run_id = trial.user_attrs[attrs.WANDB_RUN_ID]
        assert trial.user_attrs[attrs.WANDB_RUN_PATH] == f"tracked/{run_id}"
        runs[number] = _read_run(tmp_path, run_id)
    assert len(list(tmp_path.glob("wandb/offline-run-*"))) == 7  # one run per trial, no more

    for number, run in runs.items():
        assert run.run.project == "tracked"  # the spec's study name by default
        assert run.run.run_group == "tracked"
        assert run.run.job_type == "ko-simcse"
        assert run.run.display_name == f"tracked-trial-{number}"
        config = {k: v for k, v in run.config.items() if k != "_wandb"}
        assert config == config_of(trials[number])  # effective config, not branch names
        assert run.summary["trial"] == number
        assert run.summary["storage"] == redact_url(f"sqlite:///{tmp_path / 'study.db'}")
        assert run.summary["study"] == "tracked"

    complete = runs[0]
    steps = [h for h in complete.history if "train/loss" in h]
    assert [h["train/step"] for h in steps] == [1, 2, 3, 4]
    assert steps[0]["train/loss"] == pytest.approx(1.0)
    assert steps[0]["train/lr"] == pytest.approx(config_of(trials[0])["lr"])
    epochs = [h for h in complete.history if "eval/ndcg@10" in h]
    assert [(h["epoch"], h["eval/ndcg@10"]) for h in epochs] == [
        (1, pytest.approx(0.6)),
        (2, pytest.approx(0.7)),
    ]
    assert complete.summary["outcome"] == "complete"
    assert complete.summary["value"] == pytest.approx(0.7)
    assert complete.summary["eval/ndcg@10"] == pytest.approx(0.7)
    assert complete.summary[attrs.PEAK_MEMORY_MB] == pytest.approx(12.5)
    assert complete.exit_code == 0

    pruned = runs[1]
    assert pruned.summary["outcome"] == "pruned"
    assert [h["epoch"] for h in pruned.history if "eval/ndcg@10" in h] == [1]
    assert "pruned" in pruned.summary["note"]

    oom = runs[2]
    assert oom.summary["outcome"] == "oom"
    assert oom.summary[attrs.OOM_KIND] == "real"
    assert oom.summary[attrs.OOM_PHASE] == "backward"
    assert not [h for h in oom.history if "train/loss" in h]

    frontier = runs[3]
    assert frontier.summary["outcome"] == "oom"
    assert frontier.summary[attrs.OOM_KIND] == "frontier"
    assert frontier.summary[attrs.OOM_FRONTIER_TRIAL] == 2
    assert frontier.history == []

    # The API key is nowhere: not in any file written, nor in the study's attributes.
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path
    recorded: list[Any] = [
        study.user_attrs,
        study._storage.get_study_system_attrs(study._study_id),
    ]
    recorded += [[t.user_attrs, t.system_attrs] for t in trials.values()]
    assert FAKE_KEY not in json.dumps(recorded, default=str)


def test_a_predicted_oom_gets_a_run_without_a_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # no key: offline by default
    spec = load_spec(_spec(tmp_path, "predicted"))
    opts = _opts(
        tmp_path, "p.db", n_trials=1, memory_limit=64 * MIB, wandb=True, wandb_project="team"
    )
    (trial,) = _run(spec, opts).get_trials()
    assert trial.user_attrs[attrs.OOM_KIND] == "predicted"
    run = _read_run(tmp_path, trial.user_attrs[attrs.WANDB_RUN_ID])
    assert run.run.project == "team"  # --wandb-project wins over the default
    assert run.summary["outcome"] == "oom"
    assert run.summary[attrs.OOM_KIND] == "predicted"
    assert run.summary[attrs.MEMORY_ESTIMATE_MB] > 0.9 * 64
    assert "predicted" in run.summary["note"]


def test_a_handed_back_trial_closes_its_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("TEST_TRACKING_SIGTERM_PID", str(os.getpid()))
    spec = load_spec(_spec(tmp_path, "stopped", tracking="tracking: {wandb: true}"))
    previous = signal.getsignal(signal.SIGTERM)
    try:
        summary = run_study(spec, _opts(tmp_path, "stopped.db"))
    finally:
        signal.signal(signal.SIGTERM, previous)  # run_study leaves SIGTERM ignored once stopped
    assert summary.stopped_by == "sigterm" and summary.handed_back == 0
    trial = _by_number(summary.study)[0]
    assert trial.state == TrialState.FAIL and trial.user_attrs[attrs.HANDED_BACK] is True
    run = _read_run(tmp_path, trial.user_attrs[attrs.WANDB_RUN_ID])
    assert run.summary["outcome"] == "handed_back" and run.summary["trial"] == 0
    assert run.exit_code == 0  # finished, not left open


def test_no_wandb_flag_beats_the_spec(tmp_path: Path) -> None:
    spec = load_spec(_spec(tmp_path, "no-wandb", tracking="tracking: {wandb: true}"))
    summary = run_study(spec, _opts(tmp_path, "no.db", n_trials=1, wandb=False))
    (trial,) = summary.study.get_trials()
    assert attrs.WANDB_RUN_ID not in trial.user_attrs
    assert not (tmp_path / "wandb").exists()


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "search.observe.tracking"]


def test_broken_wandb_never_changes_the_trials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unwritable run directory, then a key W&B refuses with no network: same trials."""
    caplog.set_level(logging.WARNING, logger="search.observe.tracking")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    spec_path = _spec(tmp_path, "broken")
    reference = _run(load_spec(spec_path), _opts(tmp_path, "ref.db", wandb=False))

    # Offline, but the run directory cannot be created (a file is in its way; chmod does not
    # stop root).
    unwritable = tmp_path / "unwritable"
    unwritable.mkdir()
    (unwritable / "wandb").write_text("in the way")
    opts = _opts(unwritable, "study.db", wandb=True)
    offline = _run(load_spec(spec_path), opts)
    assert _outcomes(offline) == _outcomes(reference)
    assert all(attrs.WANDB_RUN_ID not in t.user_attrs for t in offline.get_trials())
    (line,) = _warnings(caplog)  # one line for the whole worker, naming what failed
    assert "W&B init (offline" in line and "FileExistsError" in line

    # Online with a key W&B cannot check (no network here: DNS fails, or the init times out).
    caplog.clear()
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("SEARCH_WANDB_INIT_TIMEOUT", "3")
    online_dir = tmp_path / "online"
    online_dir.mkdir()
    import wandb

    inits: list[str] = []
    real_init = wandb.init

    def counted_init(*args: Any, **kwargs: Any) -> Any:
        inits.append(str(kwargs.get("name")))
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", counted_init)
    online = _run(load_spec(spec_path), _opts(online_dir, "study.db", wandb=True))
    assert _outcomes(online) == _outcomes(reference)
    assert all(attrs.WANDB_RUN_ID not in t.user_attrs for t in online.get_trials())
    (line,) = _warnings(caplog)
    assert "W&B init (online" in line
    assert FAKE_KEY not in line
    # One init (one 3 s timeout) for the whole worker, not one per trial.
    assert len(inits) == 1 and len(online.get_trials()) > 1, inits
    for path in online_dir.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path


def test_settings_directory_mode_project_and_redacted_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = load_spec(_spec(tmp_path, "where", tracking="tracking: {wandb: true, project: team}"))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    pg = RunOptions(storage_url="postgresql://search:s3cret@db:5432/search", cache_dir=tmp_path)
    settings = tracking_settings(spec, pg)
    assert settings.enabled and settings.project == "team" and settings.mode == "offline"
    assert settings.directory == tmp_path  # a server's study: runs under $SEARCH_CACHE/wandb
    assert settings.storage == "postgresql://search:***@db:5432/search"
    sqlite = RunOptions(storage_url=f"sqlite:///{tmp_path}/a/b.db", wandb_project="cli")
    assert tracking_settings(spec, sqlite).directory == tmp_path / "a"  # beside the file
    assert tracking_settings(spec, sqlite).project == "cli"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert tracking_settings(spec, sqlite).mode == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert not Tracker(tracking_settings(spec, sqlite), "where").on
    assert not tracking_settings(spec, RunOptions(storage_url="sqlite://", wandb=False)).enabled
    off = tracking_settings(spec, RunOptions(storage_url="sqlite://", wandb=False))
    assert off.describe() is None  # no start line when W&B is off
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    online = tracking_settings(spec, sqlite)
    assert online.entity is None  # the spec names none, nor the option
    assert online.describe() == "W&B on, online to https://wandb.example.org: project cli"


def test_no_wandb_package_is_one_line_and_no_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="search.observe.tracking")
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    settings = TrackingSettings(True, "p", tmp_path, "offline", "sqlite:///x.db")
    tracker = Tracker(settings, "s")
    tracker.prepare()
    cfg = trial_config(model_path="x", max_len=16, train_path="t", eval_dir="e")
    first, second = tracker.start(0, cfg), tracker.start(1, cfg)
    assert not first.active and not second.active and not tracker.on
    first.log_step(1, {"loss": 1.0})  # a no-op, never an error
    first.finish(None)
    (line,) = _warnings(caplog)
    assert "W&B import failed" in line and "wandb" in line
    assert not (tmp_path / "wandb").exists()


@pytest.mark.train
def test_a_tiny_trained_trial_streams_loss_lr_and_memory_per_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    spec = load_spec(_spec(tmp_path, "tiny-tracked", tracking="tracking: {wandb: true}"))
    cache = Path(os.environ.get("SEARCH_CACHE", DEFAULT_CACHE))  # reuse built replicas
    opts = _opts(
        tmp_path,
        "tiny.db",
        n_trials=1,
        tiny=True,
        cache_dir=cache,
        objective="search.train.loop:train",
    )
    summary = run_study(spec, opts)
    (trial,) = summary.study.get_trials()
    assert trial.state == TrialState.COMPLETE, trial.user_attrs.get(attrs.ERROR)
    run = _read_run(tmp_path, trial.user_attrs[attrs.WANDB_RUN_ID])
    steps = [h for h in run.history if "train/loss" in h]
    per_epoch = 32 // 16
    assert [h["train/step"] for h in steps] == list(range(1, 2 * per_epoch + 1))
    for row in steps:
        assert row["train/loss"] > 0
        assert 0 <= row["train/lr"] <= config_of(trial)["lr"]  # warmup and decay stay below peak
        assert row["train/memory_mb"] > 0
    epochs = [h for h in run.history if "eval/ndcg@10" in h]
    assert [h["epoch"] for h in epochs] == [1, 2]
    assert run.summary["outcome"] == "complete"
    assert run.summary["value"] == pytest.approx(trial.value)
    assert run.summary[attrs.PEAK_MEMORY_MB] == pytest.approx(
        trial.user_attrs[attrs.PEAK_MEMORY_MB]
    )


def test_a_run_says_where_wandb_goes_and_the_entity_option_beats_the_spec(
    tmp_path: Path,
) -> None:
    """``search run --wandb``: one line at the start (project, entity, offline and where, the
    ``wandb sync`` hint); ``--wandb-entity`` over ``tracking.entity``, in the run itself."""
    tracking = "tracking: {wandb: true, entity: spec-team}"
    spec = _spec(tmp_path, "entity", tracking=tracking)
    args = ["--spec", str(spec), "--storage", f"sqlite:///{tmp_path / 'e.db'}", "--device", "cpu"]
    args += ["--n-trials", "1", "--objective", "record_objective:train"]
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": "", "WANDB_ENTITY": "", "COLUMNS": "60"}
    done = run_search("run", *args, "--wandb-entity", "cli-team", env=env)
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("W&B")]
    runs = tmp_path / "wandb"
    assert line == (
        f"W&B on, offline: project entity, entity cli-team, runs in {runs} "
        f"(upload later: wandb sync {runs}/offline-run-*)"
    )
    study = optuna.load_study(study_name="entity", storage=f"sqlite:///{tmp_path / 'e.db'}")
    (trial,) = study.get_trials()
    run_id = trial.user_attrs[attrs.WANDB_RUN_ID]
    assert trial.user_attrs[attrs.WANDB_RUN_PATH] == f"cli-team/entity/{run_id}"
    assert _read_run(tmp_path, run_id).run.entity == "cli-team"  # what wandb.init was given
