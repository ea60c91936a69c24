"""Where each model's weights are, checked before the first trial (no budget spent on a miss).

A model is present when its local ``path`` holds a config, a tokenizer and weights; or when
those files are in the local Hugging Face cache; or, unless the hub is off
(``HF_HUB_OFFLINE=1``), when the hub answers for its id within a short timeout (the first trial
downloads it). Offline, nothing is retried. A run with missing models stops with one line per
model and the fixes (``hf download``, ``models.<name>.path``, ``--tiny``,
``--skip-unavailable``), exit 2, before the study is touched.

Example:
    >>> weights_files(Path("/nonexistent"))
    []
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from search.record import attrs
from search.record.config import DEFAULT_OBJECTIVE
from search.spec.model_facts import cached_file
from search.spec.model_facts import hub_offline
from search.spec.model_facts import model_ref
from search.spec.space_check import missing_sqlite

if TYPE_CHECKING:
    import optuna

    from search.spec.options import RunOptions
    from search.spec.study_spec import StudySpec

HUB_TIMEOUT_S = 5.0  # one try per model, all models at once
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHTS_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ModelsUnavailableError(ValueError):
    """Models of the spec whose weights cannot be loaded here; one line per model, the fixes."""


@dataclass(frozen=True)
class Availability:
    """Whether one model's weights can be loaded, and from where (or why not)."""

    name: str
    ref: str  # the directory or the Hugging Face id
    where: str | None  # "path" | "hf-cache" | "hub"; None: not available
    problem: str = ""


def weights_files(directory: Path) -> list[Path]:
    """The weight files of a model directory: single files, or every shard of an index."""
    found = [directory / f for f in WEIGHTS_FILES if (directory / f).is_file()]
    for index in WEIGHTS_INDEXES:
        if (directory / index).is_file():
            try:
                shards = set(json.loads((directory / index).read_text())["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue
            paths = [directory / s for s in sorted(shards)]
            if paths and all(p.is_file() for p in paths):
                found.extend(paths)
    return found


def _missing_in_dir(directory: Path) -> str:
    """What a model directory lacks ('' when config, tokenizer and weights are there)."""
    if not directory.is_dir():
        return "no such directory" if not directory.exists() else "not a directory"
    lacks = []
    if not (directory / "config.json").is_file():
        lacks.append("config.json")
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        lacks.append("a tokenizer (tokenizer.json / tokenizer_config.json)")
    if not weights_files(directory):
        lacks.append("weights (model.safetensors / pytorch_model.bin)")
    return f"the directory lacks {', '.join(lacks)}" if lacks else ""


def _in_cache(repo_id: str) -> bool:
    """Config, tokenizer and weights of ``repo_id`` are all in the local Hugging Face cache."""
    config = cached_file(repo_id, "config.json")
    if config is None:
        return False
    if not any(cached_file(repo_id, f) is not None for f in TOKENIZER_FILES):
        return False
    if any(cached_file(repo_id, f) is not None for f in WEIGHTS_FILES):
        return True
    for index in WEIGHTS_INDEXES:
        found = cached_file(repo_id, index)
        if found is not None:
            return bool(weights_files(found.parent))
    return False


def _hub_answers(repo_id: str) -> str:
    """'' when the hub knows ``repo_id`` (one request, short timeout), else why not."""
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure means: not reachable now
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        return f"the hub did not answer ({type(exc).__name__}: {first[:120]})"
    return ""


def check_model(spec: StudySpec, name: str, *, offline: bool) -> Availability:
    """Where ``name``'s weights are, without the hub (the hub is asked by ``check_models``)."""
    entry = spec.models[name]
    ref = model_ref(spec, name)
    if entry.path is not None:
        problem = _missing_in_dir(Path(ref))
        return Availability(name, ref, None if problem else "path", problem)
    if _in_cache(ref):
        return Availability(name, ref, "hf-cache")
    why = "not in the local Hugging Face cache"
    if offline:
        why += " (HF_HUB_OFFLINE is set: the hub is not asked)"
    return Availability(name, ref, None, why)


def check_models(spec: StudySpec, names: list[str] | None = None) -> list[Availability]:
    """The availability of each model of ``spec`` (or of ``names``), in spec order."""
    offline = hub_offline()
    checked = [check_model(spec, n, offline=offline) for n in (names or list(spec.models))]
    ask = [a for a in checked if a.where is None and spec.models[a.name].path is None]
    if offline or not ask:
        return checked
    with ThreadPoolExecutor(max_workers=len(ask)) as pool:
        replies = list(pool.map(_hub_answers, [a.ref for a in ask]))
    answers = {a.name: reply for a, reply in zip(ask, replies, strict=True)}
    out = []
    for a in checked:
        reply = answers.get(a.name)
        if reply is None:
            out.append(a)
        elif reply:
            out.append(Availability(a.name, a.ref, None, f"{a.problem}, and {reply}"))
        else:
            out.append(Availability(a.name, a.ref, "hub"))
    return out


def missing_message(spec: StudySpec, missing: list[Availability], present: list[str]) -> str:
    """The error: a header, one line per missing model with its fix, the run-wide ways out."""
    where = spec.source or "the spec"
    lines = [
        f"{len(missing)} of {len(spec.models)} models cannot be loaded here (checked before "
        "any trial; nothing was written to the study):"
    ]
    for a in missing:
        entry = spec.models[a.name]
        if entry.path is not None:
            fix = f"put the model's files there, or point models.{a.name}.path at a DIR with them"
        else:
            fix = f"hf download {a.ref}, or set models.{a.name}.path: DIR (in {where})"
        lines.append(f"  {a.name} ({a.ref}): {a.problem}; fix: {fix}")
    tail = "or run with --tiny (offline replicas, no weights)"
    if present:
        tail += f", or --skip-unavailable (search only {', '.join(present)})"
    lines.append(tail)
    return "\n".join(lines)


def available_models(
    spec: StudySpec, *, skip_unavailable: bool, names: list[str] | None = None
) -> list[str]:
    """The models to search: all of them (or ``names``), or with ``skip_unavailable`` the
    present ones.

    Raises:
        ModelsUnavailableError: A model is missing (without ``skip_unavailable``), or none is
            present.
    """
    checked = check_models(spec, names)
    present = [a.name for a in checked if a.where is not None]
    missing = [a for a in checked if a.where is None]
    if missing and (not skip_unavailable or not present):
        raise ModelsUnavailableError(missing_message(spec, missing, present))
    return present


def searched_models(spec: StudySpec, opts: RunOptions, recorded: list[str] | None) -> list[str]:
    """The models this worker searches: the spec's (or those the study recorded), all present.

    A missing model stops the run with one line per model and its fix
    (``ModelsUnavailableError``, exit 2); ``--skip-unavailable`` drops it instead. ``--tiny``
    needs no weights, nor does a stand-in ``--objective`` (the hidden test hook loads no
    model) unless ``--skip-unavailable`` asks which models are here.

    Args:
        spec: The study spec.
        opts: The worker's options (``tiny``, ``skip_unavailable``, ``objective``).
        recorded: The models the existing study searches (``recorded_models``), or None.
    """
    names = [m for m in spec.models if recorded is None or m in recorded]
    if opts.tiny or (opts.objective != DEFAULT_OBJECTIVE and not opts.skip_unavailable):
        return names
    return available_models(spec, skip_unavailable=opts.skip_unavailable, names=names)


def recorded_models(storage: optuna.storages.BaseStorage, name: str) -> list[str] | None:
    """The models an existing study was created to search (``--skip-unavailable``), or None."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    models = storage.get_study_user_attrs(study_id).get(attrs.STUDY_MODELS)
    return [str(m) for m in models] if isinstance(models, list) else None


def check_before_run(
    spec: StudySpec,
    opts: RunOptions,
    name: str,
    *,
    storage: optuna.storages.BaseStorage | None = None,
) -> list[str]:
    """``searched_models`` for the CLI, before the training stack loads (stops in seconds).

    Reads the study's recorded models from ``storage`` (the run's, opened once by the
    caller), else from a storage opened here when it can hold the study (a missing SQLite
    file is not created here).
    """
    if opts.tiny or (opts.objective != DEFAULT_OBJECTIVE and not opts.skip_unavailable):
        return list(spec.models)
    if storage is not None:
        return searched_models(spec, opts, recorded_models(storage, name))
    recorded = None
    if not missing_sqlite(opts.storage_url):
        from storage import create_storage  # lazy: storage imports optuna and SQLAlchemy

        opened = create_storage(opts.storage_url, heartbeat_interval=None)
        try:
            recorded = recorded_models(opened, name)
        finally:
            engine = getattr(opened, "engine", None)
            if engine is not None:
                engine.dispose()  # the run opens its own storage
    return searched_models(spec, opts, recorded)
