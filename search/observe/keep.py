"""Keep the top-K trials' trained models as Optuna artifacts; remove those pushed out.

With ``artifacts.top_k`` K > 0 (the spec; default 3) the worker gives each trial a fresh
directory (``TrialConfig.save_dir``), and the trial's process saves its encoder there after the
last evaluation as a sentence-transformers model (``search.train.export``). When the trial
completes:

1. after it is told, the worker uploads the directory (one uncompressed tar,
   ``model-trial-N.tar``) to the study's artifact store if fewer than K kept models beat it,
   and records the artifact id as a study system attribute
   (``search:model_kept:<number>``: ``{"artifact": id, "store": where}``; a told trial's
   attributes cannot change; studies run before issue 15 hold ``model_artifact`` on the trial);
   an upload that fails (an unwritable store) keeps nothing and is recorded in one line
   (``search:model_not_kept:<number>``, and a warning);
2. then it removes the kept model of every completed trial that K other kept models now beat
   (and of any trial that holds one but did not complete), recording each removal as a study
   system attribute (``search:model_removed:<id>``).

A trial that cannot enter is not written at all: once K models are kept, the worker gives each
new trial the K-th best kept value (``TrialConfig.save_bar``, from its last view, which only
lags: the bar only rises) and a trial that ends worse saves nothing (a tie still saves). In a
long study most trials end below the bar, and each skips the save (a sentence-transformers
directory: 90 MB for all-MiniLM-L6-v2, 2.2 GB for bge-m3) and its upload.

Only stored models rank: a completed trial whose model was not stored (its upload failed, it
saved none, or it did not enter) never displaces one that was. The worker does both on its
event thread (:class:`KeepSubscriber`), never on the trial step: the step only gives the
trial a path to save its model in (``training_config``, a path, no I/O). Ranking is by the
study's value, ties going to the earlier trial. No lock is needed between workers: a model
that K kept models beat in any worker's (possibly stale) view is beaten by K kept models in
every later view (one of them is removed only when K kept models beat it, and those beat the
first too), so concurrent removals are all right; each worker removes after each of its
uploads, so the last removal of the study comes after every upload was recorded, and exactly
the K best stored models stay (provided each worker's event thread finishes:
``search.worker.dispatch``'s flush bound). Disk use stays at K models, plus one being saved
per running trial and the told ones waiting for the event thread.

The store: ``artifacts.store`` in the spec (a directory, ``file://DIR``, ``s3://BUCKET`` or
``gs://BUCKET``), else ``$SEARCH_ARTIFACTS``, else the directory beside the SQLite file
(``search.observe.artifacts.artifact_dir``). A study in a database server without one keeps no
model (one warning). Nothing here may fail a trial: an error is one warning line.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import math
import shutil
import tarfile
import tempfile
import uuid
import weakref
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from optuna.trial import TrialState

from search.observe.artifacts import artifact_dir
from search.observe.artifacts import artifact_store
from search.record import attrs
from search.record.config import SaveBar
from search.record.config import TrialConfig
from search.train.export import SEARCH_JSON
from search.train.export import update_search_json
from search.worker.events import Claimed
from search.worker.events import Closed
from search.worker.events import Dropped
from search.worker.events import HandedBack
from search.worker.events import Subscriber
from search.worker.events import Told
from storage import compat

if TYPE_CHECKING:
    from search.spec.options import RunOptions
    from search.spec.study_spec import StudySpec
    from search.worker.isolation import TrialOutcome
    from storage import ArtifactStore

_logger = logging.getLogger(__name__)
MODEL_FILE = "model-trial-{number}.tar"
_keepers: weakref.WeakKeyDictionary[optuna.Study, ModelKeeper] = weakref.WeakKeyDictionary()


def store_location(
    spec: StudySpec, storage_url: str, option: str | Path | None = None
) -> str | None:
    """Where kept models go: ``option``, the spec's ``artifacts.store``, ``$SEARCH_ARTIFACTS``,
    else beside the SQLite file; None for a server database without any of them.

    A directory comes back absolute; a URL (``s3://``, ``gs://``) as it is.
    """
    chosen = str(option) if option else spec.artifacts.store
    if chosen and chosen.startswith(("s3://", "gs://")):
        return chosen
    if chosen:
        return str(spec.resolve_path(chosen.removeprefix("file://")).resolve())
    directory = artifact_dir(storage_url)
    return str(directory.resolve()) if directory is not None else None


def open_store(location: str, *, create: bool = False) -> ArtifactStore:
    """Optuna's artifact store at ``location`` (a directory, ``s3://BUCKET``, ``gs://BUCKET``)."""
    if location.startswith("s3://"):
        from optuna.artifacts import Boto3ArtifactStore

        return Boto3ArtifactStore(location.removeprefix("s3://").strip("/"))
    if location.startswith("gs://"):
        from optuna.artifacts import GCSArtifactStore

        return GCSArtifactStore(location.removeprefix("gs://").strip("/"))
    return artifact_store(Path(location.removeprefix("file://")), create=create)


def _rank_key(direction: optuna.study.StudyDirection) -> Any:
    sign = -1.0 if direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
    return lambda t: (sign * float(t.value), t.number)


def removed_artifacts(study: optuna.Study, system: Mapping[str, Any] | None = None) -> set[str]:
    """Ids of the kept models that were removed since (pushed out of the top K)."""
    prefix = attrs.MODEL_REMOVED_PREFIX
    system = _system_attrs(study) if system is None else system
    return {key[len(prefix) :] for key in system if key.startswith(prefix)}


def model_artifacts(
    study: optuna.Study,
    trials: Sequence[FrozenTrial] | None = None,
    system: Mapping[str, Any] | None = None,
) -> dict[int, tuple[str, str]]:
    """Trial number -> (artifact id, store) of every model uploaded for the study, removed since
    or not: a study system attribute ``search:model_kept:<number>``, or the trial's own
    ``model_artifact`` on studies run before a model was uploaded after its tell."""
    system = _system_attrs(study) if system is None else system
    out: dict[int, tuple[str, str]] = {}
    for t in trials if trials is not None else study.get_trials(deepcopy=False):
        artifact = t.user_attrs.get(attrs.MODEL_ARTIFACT)
        if artifact:
            out[t.number] = (str(artifact), str(t.user_attrs.get(attrs.MODEL_ARTIFACT_STORE, "")))
    prefix = attrs.MODEL_KEPT_PREFIX
    for key, value in system.items():
        if key.startswith(prefix) and isinstance(value, dict) and value.get("artifact"):
            out[int(key[len(prefix) :])] = (str(value["artifact"]), str(value.get("store", "")))
    return out


def kept_models(
    study: optuna.Study, trials: Sequence[FrozenTrial] | None = None
) -> dict[int, tuple[str, str]]:
    """Trial number -> (artifact id, store) of every model the study still keeps."""
    return _kept(study, trials, _system_attrs(study))


def models_not_kept(
    study: optuna.Study, system: Mapping[str, Any] | None = None
) -> dict[int, str]:
    """Trial number -> why its model could not be stored (one line each)."""
    prefix = attrs.MODEL_NOT_KEPT_PREFIX
    system = _system_attrs(study) if system is None else system
    return {int(k[len(prefix) :]): str(v) for k, v in system.items() if k.startswith(prefix)}


def _ranked_holders(
    study: optuna.Study, trials: Sequence[FrozenTrial], system: Mapping[str, Any]
) -> list[FrozenTrial]:
    """The completed trials that keep a stored model, best first (ties: the earlier)."""
    kept = _kept(study, trials, system)
    holders = [
        t
        for t in trials
        if t.number in kept and t.state == TrialState.COMPLETE and t.value is not None
    ]
    return sorted(holders, key=_rank_key(study.direction))


def _kept(
    study: optuna.Study, trials: Sequence[FrozenTrial] | None, system: Mapping[str, Any]
) -> dict[int, tuple[str, str]]:
    """``kept_models`` on the study system attributes read once."""
    removed = removed_artifacts(study, system)
    uploaded = model_artifacts(study, trials, system)
    return {n: kept for n, kept in uploaded.items() if kept[0] not in removed}


def _system_attrs(study: optuna.Study) -> dict[str, Any]:
    return compat.study_storage(study).get_study_system_attrs(compat.study_id(study))


class ModelKeeper:
    """One worker's side of the top-K rule on one study (see the module docstring)."""

    def __init__(
        self, study: optuna.Study, top_k: int, location: str | None, metric: str | None = None
    ) -> None:
        self.study = study
        self.top_k = top_k
        self.location = location
        self.metric = metric  # the study's: with it, trials that cannot be kept save nothing
        # The K-th best kept value in this worker's last view (None: fewer than K kept). It
        # only rises, so a stale one lets a trial save a model it need not, never the reverse.
        self.bar: float | None = None
        self._stores: dict[str, ArtifactStore] = {}
        self._dirs: dict[int, Path] = {}  # trial number -> where its process saves its model
        self._root = Path(tempfile.gettempdir())
        atexit.register(self.discard_all)

    @property
    def active(self) -> bool:
        """Whether trials save their model (K > 0 and a store to keep them in)."""
        return self.top_k > 0 and self.location is not None

    def prepare(self, cfg: TrialConfig, number: int) -> TrialConfig:
        """``cfg`` with a fresh ``save_dir`` for trial ``number`` (unchanged when inactive).

        Computes a path only (the trial's process creates the directory when it saves): the
        worker calls it on its step's thread, where nothing may wait on I/O.
        """
        if not self.active:
            return cfg
        path = self._root / f"search-trial-{number}-model-{uuid.uuid4().hex[:12]}"
        self._dirs[number] = path
        bar = None
        if self.metric is not None and self.bar is not None:
            maximize = self.study.direction == optuna.study.StudyDirection.MAXIMIZE
            bar = SaveBar(self.metric, self.bar, maximize)
        return dataclasses.replace(cfg, save_dir=str(path), save_bar=bar)

    def keep(self, number: int, outcome: TrialOutcome, metric: str) -> str | None:
        """After the tell: upload trial ``number``'s model if it enters the top K; its id.

        Never raises; the saved directory is removed either way.
        """
        directory = self._dirs.pop(number, None)
        try:
            value = outcome.metrics.get(metric) if outcome.status == "complete" else None
            if directory is None or value is None or not math.isfinite(value):
                return None  # not complete, or told FAIL for a non-finite value
            if not (directory / "modules.json").is_file():
                return None  # the objective saved nothing (a fake one, or a failed save)
            if not self._could_enter(float(value), number):
                return None
        except Exception as exc:  # noqa: BLE001 - keeping a model must never fail a trial
            _logger.warning("model of trial %d not kept: %s", number, _line(exc))
            return None
        else:
            try:
                return self._upload(number, directory, metric, float(value))
            except Exception as exc:  # noqa: BLE001
                self._not_stored(number, exc)
                return None
        finally:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)

    def discard(self, number: int) -> None:
        """Remove what trial ``number`` saved (skipped, handed back, dropped)."""
        directory = self._dirs.pop(number, None)
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def prune(self) -> list[int]:
        """After the tell: remove the models of trials now outside the top K; their numbers.

        Nothing to do when this worker keeps no model (K = 0 or no store). Never raises.
        """
        if not self.active:
            return []
        try:
            removed, top = _prune(self.study, self.top_k, self._store)
        except Exception as exc:  # noqa: BLE001
            _logger.warning("kept models not pruned: %s", _line(exc))
            return []
        if len(top) >= self.top_k:  # the next trials must reach the K-th to be worth saving
            self.bar = float(top[self.top_k - 1].value)  # type: ignore[arg-type]
        return removed

    # ------------------------------------------------------------------ internals

    def _store(self, location: str) -> ArtifactStore:
        if location not in self._stores:
            self._stores[location] = open_store(location, create=True)
        return self._stores[location]

    def _could_enter(self, value: float, number: int) -> bool:
        """Fewer than K kept models beat ``(value, number)`` (models not stored do not count)."""
        key = _rank_key(self.study.direction)
        mine = key(_Ranked(value, number))
        trials = self.study.get_trials(deepcopy=False)
        holders = _ranked_holders(self.study, trials, _system_attrs(self.study))
        better = sum(t.number != number and key(t) < mine for t in holders)
        return better < self.top_k

    def _not_stored(self, number: int, exc: BaseException) -> None:
        """Say (once, one line) and record on the study that trial ``number``'s model was not
        stored; the upload wrote no ``search:model_kept`` key, so it is not kept."""
        line = f"could not store the model in {self.location}: {_line(exc)}"
        _logger.warning("model of trial %d not kept: %s", number, line)
        try:
            compat.study_storage(self.study).set_study_system_attr(
                compat.study_id(self.study), f"{attrs.MODEL_NOT_KEPT_PREFIX}{number}", line
            )
        except Exception as error:  # noqa: BLE001 - the warning above said it
            _logger.debug("not recorded: %s", _line(error))

    def _upload(self, number: int, directory: Path, metric: str, value: float) -> str:
        from optuna.artifacts import upload_artifact

        assert self.location is not None
        study = self.study
        update_search_json(
            directory, study=study.study_name, trial=number, metric=metric, value=value
        )
        with tempfile.TemporaryDirectory(prefix="search-model-tar-") as tmp:
            tar = Path(tmp) / MODEL_FILE.format(number=number)
            with tarfile.open(tar, "w") as archive:
                for path in sorted(directory.rglob("*")):
                    archive.add(path, arcname=str(path.relative_to(directory)), recursive=False)
            # A study artifact: the trial is told, its attributes cannot change any more.
            artifact_id = upload_artifact(
                artifact_store=self._store(self.location),
                file_path=str(tar),
                study_or_trial=study,
                mimetype="application/x-tar",
            )
        compat.study_storage(study).set_study_system_attr(
            compat.study_id(study),
            f"{attrs.MODEL_KEPT_PREFIX}{number}",
            {"artifact": artifact_id, "store": self.location},
        )
        return artifact_id

    def discard_all(self) -> None:
        """Remove every directory this keeper handed out and did not keep (worker exit)."""
        for number in list(self._dirs):
            self.discard(number)


@dataclasses.dataclass
class _Ranked:
    value: float
    number: int


def prune_models(study: optuna.Study, top_k: int, store_of: Any) -> list[int]:
    """Remove the kept models of trials outside the top K (or not complete); their numbers.

    ``store_of(location)`` opens the store a trial's model went to.
    """
    return _prune(study, top_k, store_of)[0]


def _prune(study: optuna.Study, top_k: int, store_of: Any) -> tuple[list[int], list[FrozenTrial]]:
    """``prune_models``, and the top K holders it kept (best first)."""
    from optuna.artifacts.exceptions import ArtifactNotFound

    system = _system_attrs(study)
    trials = study.get_trials(deepcopy=False)
    kept = _kept(study, trials, system)
    by_number = {t.number: t for t in trials}
    holders = [
        (by_number[n], artifact, location)
        for n, (artifact, location) in kept.items()
        if n in by_number
    ]
    if not holders:
        return [], []
    # Only kept models rank: a trial whose model was not stored never pushes one out.
    ranked = _ranked_holders(study, trials, system)[:top_k]
    top = {t.number for t in ranked}
    drop = [
        (t, artifact, location)
        for t, artifact, location in holders
        if (t.state == TrialState.COMPLETE and t.number not in top)
        or t.state in (TrialState.FAIL, TrialState.PRUNED)
    ]
    done: list[int] = []
    for t, artifact, location in drop:
        if location:
            try:
                store_of(location).remove(artifact)
            except ArtifactNotFound:
                pass  # another worker removed it first
        compat.study_storage(study).set_study_system_attr(
            compat.study_id(study), attrs.MODEL_REMOVED_PREFIX + artifact, t.number
        )
        done.append(t.number)
    return done, ranked


def keeper_for(study: optuna.Study, spec: StudySpec, opts: RunOptions) -> ModelKeeper:
    """The worker's keeper of ``study`` (one per open study; warns once without a store)."""
    keeper = _keepers.get(study)
    if keeper is None:
        top_k = spec.artifacts.top_k
        location = store_location(spec, opts.storage_url) if top_k > 0 else None
        if top_k > 0 and location is None:
            _logger.warning(
                "artifacts.top_k is %d but a study in a database server has no artifact store: "
                "set artifacts.store in the spec or $SEARCH_ARTIFACTS; no model is kept",
                top_k,
            )
        keeper = _keepers[study] = ModelKeeper(study, top_k, location, spec.study.metric)
    return keeper


class KeepSubscriber(Subscriber):
    """The worker's top-K models as a subscriber of its trial events.

    ``training_config`` (synchronous, on the step's thread) only gives the trial a path to
    save its model in; the upload, the removal of the models pushed out, and the clean-up run
    on the worker's event thread after the trial is told.
    """

    def __init__(self, spec: StudySpec, opts: RunOptions) -> None:
        self.spec = spec
        self.opts = opts

    def _keeper(self, study: optuna.Study) -> ModelKeeper:
        return keeper_for(study, self.spec, self.opts)

    def training_config(self, event: Claimed, cfg: TrialConfig) -> TrialConfig:
        return self._keeper(event.study).prepare(cfg, event.number)

    def on_told(self, event: Told) -> None:
        keeper = self._keeper(event.study)
        keeper.keep(event.number, event.outcome, self.spec.study.metric)
        keeper.prune()  # remove the models pushed out of the top K

    def on_handed_back(self, event: HandedBack) -> None:
        self._keeper(event.study).discard(event.number)

    def on_dropped(self, event: Dropped) -> None:
        self._keeper(event.study).discard(event.number)

    def on_closed(self, event: Closed) -> None:
        self._keeper(event.study).discard_all()


def extract_model(store: ArtifactStore, artifact_id: str, directory: Path) -> dict[str, Any]:
    """Write a kept model into ``directory`` (created); returns its ``search.json``."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="search-model-get-") as tmp:
        tar = Path(tmp) / "model.tar"
        with store.open_reader(artifact_id) as reader, tar.open("wb") as fh:
            shutil.copyfileobj(reader, fh)
        with tarfile.open(tar) as archive:
            archive.extractall(directory, filter="data")
    try:
        data = json.loads((directory / SEARCH_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


__all__ = [
    "KeepSubscriber",
    "ModelKeeper",
    "extract_model",
    "keeper_for",
    "kept_models",
    "model_artifacts",
    "models_not_kept",
    "open_store",
    "prune_models",
    "removed_artifacts",
    "store_location",
]
