"""What the dashboard shows beyond Optuna's own views: trial notes, the study note, plots.

- Each finished trial gets a one-line note (``search.record.trial_record.trial_summary``), so an
  OOM reads "OOM (real) in backward at 23.1 of 24.0 GiB — ..." instead of a bare "Pruned".
- The study gets the per-model report as its note (markdown), refreshed by the worker at most
  every ``STUDY_NOTE_INTERVAL_S`` seconds and at the end, and by ``search report --publish``.
- ``search report --publish`` uploads the report's plots to the study's artifact store
  (a directory: ``--artifacts DIR``, ``$SEARCH_ARTIFACTS``, else ``<sqlite file>.artifacts``),
  replacing the previous upload of each file, so re-publishing never grows the store.

Notes are optuna-dashboard's (``save_note``: study system attributes); without the
``dashboard`` extra they are skipped. Nothing here may fail a trial: the runner's hooks log a
failure in one line and go on.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from collections.abc import Iterable
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from search.observe.artifacts import ENV_ARTIFACTS
from search.observe.artifacts import artifact_dir
from search.observe.artifacts import artifact_store
from search.observe.install import install_hint
from search.observe.plots import PlotsUnavailableError
from search.observe.plots import require_plot_libs
from search.observe.plots import write_plots
from search.observe.report import study_metric
from search.observe.report import study_report
from search.record.trial_record import trial_summary
from search.worker.events import Closed
from search.worker.events import HandedBack
from search.worker.events import Requeued
from search.worker.events import Skipped
from search.worker.events import Subscriber
from search.worker.events import Told
from storage import compat
from storage import rdb_backend

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from storage import ArtifactStore

_logger = logging.getLogger(__name__)

STUDY_NOTE_INTERVAL_S = 30.0  # a worker refreshes the study note at most this often
_ARTIFACTS_ATTR_PREFIX = "artifacts:"  # Optuna's key of an artifact's metadata
# When each open study last had its note written (monotonic seconds); gone with the study.
_last_study_note: weakref.WeakKeyDictionary[optuna.Study, float] = weakref.WeakKeyDictionary()
_metrics: weakref.WeakKeyDictionary[optuna.Study, str] = weakref.WeakKeyDictionary()


class PublishError(ValueError):
    """A user mistake in what to publish (no artifact directory for a PostgreSQL study)."""


# ------------------------------------------------------------------ the runner's hooks


def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Save ``trial``'s summary as its note; refresh the study note when it is due.

    Never raises: a failure is one warning line (the trial is already told).
    """
    try:
        if not _dashboard_installed():
            return
        save_trial_note(study, trial)
        now = time.monotonic()
        last = _last_study_note.get(study)
        if last is None or now - last >= STUDY_NOTE_INTERVAL_S:
            _last_study_note[study] = now
            save_study_note(study)
    except Exception as exc:  # noqa: BLE001 - a note must never fail a trial
        _logger.warning("dashboard note of trial %d not written: %s", trial.number, _line(exc))


def note_trial(study: optuna.Study, trial_id: int) -> None:
    """Save the summary of a trial this worker did not tell (handed back, failed as stale).

    Only the trial's note; never raises.
    """
    try:
        if _dashboard_installed():
            save_trial_note(study, compat.study_storage(study).get_trial(trial_id))
    except Exception as exc:  # noqa: BLE001 - a note must never fail a hand-back
        _logger.warning("dashboard note of trial id %d not written: %s", trial_id, _line(exc))


def finish(study: optuna.Study) -> None:
    """Refresh the study note once more at the end of a run (never raises)."""
    try:
        if _dashboard_installed():
            save_study_note(study)
    except Exception as exc:  # noqa: BLE001
        _logger.warning("dashboard study note not written: %s", _line(exc))


class NotesSubscriber(Subscriber):
    """The dashboard notes of a worker's trials and study, from its trial events.

    Written on the worker's event thread (``search.worker.events``), never on the trial step
    nor under the budget lock: each told or skipped trial's note (and the study note when
    due), the note of a trial handed back or failed as stale and re-queued, and the study note
    once more when the worker leaves.
    """

    def on_told(self, event: Told) -> None:
        after_trial(event.study, event.frozen)

    def on_skipped(self, event: Skipped) -> None:
        after_trial(event.study, event.frozen)

    def on_requeued(self, event: Requeued) -> None:
        note_trial(event.study, event.trial_id)  # "failed as stale, re-queued"

    def on_handed_back(self, event: HandedBack) -> None:
        note_trial(event.study, event.trial_id)  # "handed back ..., re-queued"

    def on_closed(self, event: Closed) -> None:
        finish(event.study)  # the study note as this worker leaves it


def _line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def _dashboard_installed() -> bool:
    if compat.dashboard_installed():
        return True
    _logger.debug("optuna-dashboard not installed: no dashboard notes")
    return False


# ------------------------------------------------------------------ notes


def _cached_metric(study: optuna.Study) -> str:
    """The study's metric, read once per study (its names are among the study's notes)."""
    metric = _metrics.get(study)
    if metric is None:
        metric = _metrics[study] = study_metric(study)
    return metric


def save_trial_note(study: optuna.Study, trial: FrozenTrial, *, text: str | None = None) -> str:
    """Write the trial's one-line summary as its dashboard note; returns the text.

    ``save_note`` reads every study system attribute twice (every trial's note lives there),
    about 0.4 s a trial at 1,000 trials; a new note of one chunk needs none of that, so it is
    written directly under optuna-dashboard's own keys (version 1, chunk 0) when the installed
    version has them, else through ``save_note``. A trial is noted once, after it is told.
    """
    if text is None:
        text = trial_summary(trial, metric=_cached_metric(study), pruner=_pruner_name(study))
    trial_id = compat.trial_id(trial)
    keys = compat.dashboard_note_keys(trial_id)
    if keys is None or len(text) > compat.DASHBOARD_NOTE_CHUNK:
        compat.save_dashboard_trial_note(study, trial_id, text)
        return text
    version_key, chunk_key = keys
    storage, study_id = compat.study_storage(study), compat.study_id(study)
    storage.set_study_system_attr(study_id, chunk_key, text)
    storage.set_study_system_attr(study_id, version_key, 1)
    return text


def publish_trial_notes(study: optuna.Study) -> int:
    """(Re)write every finished trial's note the service writes; returns how many were written.

    A study run where optuna-dashboard was not installed, or whose workers died before their
    notes, is brought up to date. A note a person edited in the dashboard (its version above
    the service's 1) is left alone, and a note that already reads the same is not written again.
    """
    metric = _cached_metric(study)
    storage, study_id = compat.study_storage(study), compat.study_id(study)
    system = storage.get_study_system_attrs(study_id)
    pruner = _pruner_name(study)
    written = 0
    for trial in study.get_trials(deepcopy=False):
        if not trial.state.is_finished():
            continue
        trial_id = compat.trial_id(trial)
        keys = compat.dashboard_note_keys(trial_id)
        text = trial_summary(trial, metric=metric, pruner=pruner)
        if keys is not None:
            version_key, chunk_key = keys
            version = int(system.get(version_key, 0) or 0)
            if version > 1 or (version == 1 and system.get(chunk_key) == text):
                continue  # edited by a person, or up to date
        save_trial_note(study, trial, text=text)
        written += 1
    return written


def save_study_note(study: optuna.Study) -> str:
    """Write the per-model report (markdown) as the study's dashboard note; returns it."""
    report = study_report(study, storage=rdb_backend(compat.study_storage(study)))
    text = study_note(report, metric=report["metric"])
    compat.save_dashboard_study_note(study, text)
    return text


def _pruner_name(study: optuna.Study) -> str | None:
    name = type(study.pruner).__name__
    return None if name == "NopPruner" else name.removesuffix("Pruner").lower()


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _config(config: dict[str, Any] | None) -> str:
    if not config:
        return "-"
    return (
        f"b{config.get('batch_size')} len{config.get('max_len')} "
        f"lr {config.get('lr', 0):.1e} T {config.get('temperature', 0):.3f}"
    )


def _oom_cell(row: dict[str, Any]) -> str:
    """``5 (1 real, 4 frontier)``."""
    kinds = [
        (k, int(row.get(f"oom_{k}", 0) or 0)) for k in ("real", "host", "predicted", "frontier")
    ]
    total = sum(n for _, n in kinds)
    parts = ", ".join(f"{n} {k}" for k, n in kinds if n)
    return f"{total} ({parts})" if total else "0"


def _numbers(trials: list[int], limit: int = 12) -> str:
    shown = ", ".join(str(n) for n in trials[:limit])
    return shown + (f", … ({len(trials)})" if len(trials) > limit else "")


def study_note(report: dict[str, Any], *, metric: str = "ndcg@10") -> str:
    """The report as markdown: the overall best, one table row per model, the OOM configs.

    Example:
        >>> note = study_note({"study": "s", "trials": 1, "n_trials_budget": 4, "models": [
        ...     {"model": "m", "trials": 1, "complete": 1, "pruned_early": 0, "oom_real": 0,
        ...      "oom_host": 0, "oom_predicted": 0, "oom_frontier": 0, "failed": 0,
        ...      "oom_rate": 0.0, "oom_seconds": 0.0, "best_value": 0.5, "best_trial": 0,
        ...      "median_peak_memory_mb": 900.0, "best_config": {"batch_size": 32}}]})
        >>> note.splitlines()[2]
        'Best ndcg@10 **0.5000**: trial 0, m b32 lenNone lr 0.0e+00 T 0.000.'
    """
    models = report.get("models") or []
    budget = report.get("n_trials_budget")
    study = report["study"]
    lines = [f"## Per-model report of {study}", ""]
    best = report.get("best")
    if best is None:  # a report without the overall best: the best of the model rows
        rows = [m for m in models if m.get("best_value") is not None]
        if rows:
            maximize = report.get("direction", "maximize") == "maximize"
            top = (max if maximize else min)(rows, key=lambda m: m["best_value"])
            best = {"trial": top["best_trial"], "model": top["model"],
                    "value": top["best_value"], "config": top.get("best_config")}  # fmt: skip
    if best:
        extra = ", ".join(
            f"{k.upper().replace('RECALL', 'Recall')} {v:.4f}"
            for k, v in best.items()
            if k.startswith(("mrr@", "recall@")) and isinstance(v, (int, float))
        )
        lines.append(
            f"Best {metric} **{best['value']:.4f}**: trial {best['trial']}, {best['model']} "
            f"{_config(best.get('config'))}" + (f" ({extra})" if extra else "") + "."
        )
    else:
        lines.append(f"No complete trial yet: no best {metric}.")
    of_budget = f" of a budget of {budget}" if budget else ""
    trained = report.get("trained", report.get("trials", 0))  # what spends the budget
    skipped = report.get("skipped") or 0  # preflight skips: recorded, free
    skips = f" (+{skipped} skipped for memory, free)" if skipped else ""
    lines += [
        "",
        f"{trained} trials trained{of_budget}{skips}, updated "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Plots: the study's artifacts on the History "
        f"page (`search report --study {study} --publish`).",
        "",
        f"| model | trials | complete | pruned | OOM | failed | OOM rate | s lost to OOM "
        f"| training share | best {metric} | best trial | median peak MB | best config |",
        "|---|:-:|:-:|:-:|:-:|:-:|:-:|:-:|:-:|:-:|:-:|:-:|---|",  # centred: cells stay apart
    ]
    share = report.get("train_share")
    if share is not None:  # the trials that recorded their phases (older ones left out)
        lines[-2:-2] = [f"Worker time in training steps: {share:.0%}.", ""]
    for m in models:
        lines.append(
            f"| {m['model']} | {m['trials']} | {m['complete']} | {m['pruned_early']} "
            f"| {_oom_cell(m)} | {m['failed']} | {m['oom_rate']:.0%} | {m['oom_seconds']:.1f} "
            f"| {_fmt(m.get('train_share'), '.0%')} "
            f"| {_fmt(m.get('best_value'), '.4f')} | {_fmt(m.get('best_trial'), 'd')} "
            f"| {_fmt(m.get('median_peak_memory_mb'), '.0f')} | {_config(m.get('best_config'))} |"
        )
    ooms = report.get("oom_configs") or []
    if ooms:
        lines += [
            "",
            "### Out of memory",
            "",
            "| model | batch_size | max_len | kind | phase | trials |",
            "|---|:-:|:-:|:-:|:-:|---|",
        ]
        for o in ooms:
            lines.append(
                f"| {o['model']} | {_fmt(o.get('batch_size'), 'd')} "
                f"| {_fmt(o.get('max_len'), 'd')} | {o['kind']} | {o.get('phase') or '-'} "
                f"| {_numbers(list(o.get('trials') or []))} |"
            )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ artifacts


def study_artifacts(study: optuna.Study) -> dict[str, str]:
    """The study's live artifacts: file name -> artifact id (removed ones left out)."""
    found: dict[str, str] = {}
    system = compat.study_storage(study).get_study_system_attrs(compat.study_id(study))
    for key, value in system.items():
        if not key.startswith(_ARTIFACTS_ATTR_PREFIX):
            continue
        meta = json.loads(value) if isinstance(value, str) else None
        if isinstance(meta, dict) and meta.get("filename"):
            found[str(meta["filename"])] = str(meta["artifact_id"])
    return found


def upload_files(
    study: optuna.Study, files: Iterable[Path], store: ArtifactStore
) -> list[tuple[str, str]]:
    """Upload ``files`` as study artifacts; a file name already uploaded is overwritten in
    place (same artifact id), so publishing again replaces instead of adding.

    Returns:
        ``(file name, artifact id)`` for each file, in order.
    """
    from optuna.artifacts import upload_artifact

    existing = study_artifacts(study)
    done: list[tuple[str, str]] = []
    for path in files:
        artifact_id = existing.get(path.name)
        if artifact_id is None:
            artifact_id = upload_artifact(
                study_or_trial=study, file_path=str(path), artifact_store=store
            )
        else:
            with path.open("rb") as fh:
                store.write(artifact_id, fh)
        done.append((path.name, artifact_id))
    return done


def publish(
    study: optuna.Study, *, url: str, artifacts: str | Path | None = None
) -> dict[str, Any]:
    """``search report --publish``: the study note, every trial's note where it is missing or
    out of date (``publish_trial_notes``), and the plots as study artifacts.

    Returns:
        ``{"note": text, "trial_notes": n written, "artifacts": [(file name, artifact id),
        ...], "directory": str}``.

    Raises:
        PublishError: No artifact directory for a study in a database server (``--artifacts
            DIR`` or ``$SEARCH_ARTIFACTS``), optuna-dashboard or the plot libraries missing;
            raised before anything is written.
    """
    directory = artifact_dir(url, artifacts)
    if directory is None:
        raise PublishError(
            "--publish: the plots of a study in a database server need a shared artifact "
            f"directory: --artifacts DIR or ${ENV_ARTIFACTS}"
        )
    if not _dashboard_installed():
        raise PublishError(
            f"--publish: optuna-dashboard is not installed (a partial install): {install_hint()}"
        )
    try:
        require_plot_libs()
    except PlotsUnavailableError as exc:
        raise PublishError(f"--publish: {exc}") from None
    import tempfile

    note = save_study_note(study)
    trial_notes = publish_trial_notes(study)
    store = artifact_store(directory, create=True)
    with tempfile.TemporaryDirectory(prefix="search-plots-") as tmp:
        written = write_plots(study, Path(tmp), storage=rdb_backend(compat.study_storage(study)))
        uploaded = upload_files(study, [Path(p) for p in written], store)
    return {
        "note": note,
        "trial_notes": trial_notes,
        "artifacts": uploaded,
        "directory": str(directory),
    }
