"""The facts of a spec's model: read from its own ``config.json``, the shipped table as fallback.

A ``models:`` entry names its weights (``id`` or ``path``) and how it embeds (pooling,
normalisation, prefixes). Its architecture facts, the ones the memory estimate needs, are read
with ``AutoConfig.from_pretrained(..., local_files_only=True)`` (no weights, no network) from
the local directory, else from the local Hugging Face cache; only when neither holds a config
does a model of the shipped table (``search.record.models.KNOWN_MODELS``) fall back to the table.
``ModelInfo.source`` says which: ``config.json:<dir>``, ``hf-cache`` or ``table``.

Example:
    >>> from search.spec.load import load_spec
    >>> from search.spec.study_spec import shipped_spec_path
    >>> spec = load_spec(shipped_spec_path("ko-retrieval"))
    >>> model_settings(spec, "multilingual-e5-small").query_prefix
    'query: '
    >>> model_ref(spec, "ko-simcse")
    'BM-K/KoSimCSE-roberta'
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING
from typing import Any

from search.record.models import BY_HF_ID
from search.record.models import KNOWN_MODELS
from search.record.models import OFFSET_POSITIONS
from search.record.models import SDPA_MODEL_TYPES
from search.record.models import ModelInfo
from search.record.models import attention_of

if TYPE_CHECKING:
    from search.spec.study_spec import ModelEntry
    from search.spec.study_spec import StudySpec

# Spec fields that override a fact read from the config.
FACT_OVERRIDES = (
    "num_layers",
    "hidden",
    "heads",
    "ffn",
    "vocab",
    "max_positions",
    "attn_implementation",
    "architecture",
)
_SENTENCEPIECE_FILES = ("sentencepiece.bpe.model", "spiece.model", "tokenizer.model")


@dataclass(frozen=True)
class ModelSettings:
    """How one model embeds, resolved from its entry, the table and its own files."""

    ref: str  # what from_pretrained loads: the local directory or the Hugging Face id
    pooling: str
    normalize: bool
    query_prefix: str
    passage_prefix: str


def table_entry(name: str, entry: ModelEntry) -> ModelInfo | None:
    """The shipped table's model this entry is: by its ``id``, else by its name."""
    if entry.id is not None:
        return BY_HF_ID.get(entry.id)
    return KNOWN_MODELS.get(name)


def model_ref(spec: StudySpec, name: str) -> str:
    """What ``from_pretrained`` loads for ``name``: its local path, its id, or the table's id."""
    entry = spec.models[name]
    if entry.path is not None:
        return str(spec.resolve_path(entry.path))
    if entry.id is not None:
        return entry.id
    return KNOWN_MODELS[name].hf_id


def local_dir(spec: StudySpec, name: str) -> Path | None:
    """The directory holding the model's files: its ``path``, else its snapshot in the cache."""
    entry = spec.models[name]
    if entry.path is not None:
        return spec.resolve_path(entry.path)
    config = cached_file(model_ref(spec, name), "config.json")
    return config.parent if config is not None else None


def cached_file(repo_id: str, filename: str) -> Path | None:
    """``filename`` of ``repo_id`` in the local Hugging Face cache, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename)
    except ValueError:  # not a valid repo id (e.g. a path that does not exist)
        return None
    return Path(found) if isinstance(found, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _sentence_transformers_settings(directory: Path | None) -> dict[str, Any]:
    """Pooling, normalisation and prompts from a sentence-transformers model's own files."""
    if directory is None:
        return {}
    out: dict[str, Any] = {}
    modules = _read_json_list(directory / "modules.json")
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith("Pooling"):
            pooling = _read_json(directory / str(module.get("path", "")) / "config.json")
            if pooling.get("pooling_mode_cls_token"):
                out["pooling"] = "cls"
            elif pooling.get("pooling_mode_lasttoken"):
                out["pooling"] = "last-token"
            elif pooling.get("pooling_mode_mean_tokens"):
                out["pooling"] = "mean"
        elif kind.endswith("Normalize"):
            out["normalize"] = True
    if modules and "normalize" not in out:
        out["normalize"] = False
    prompts = _read_json(directory / "config_sentence_transformers.json").get("prompts") or {}
    if isinstance(prompts, dict):
        if isinstance(prompts.get("query"), str):
            out["query_prefix"] = prompts["query"]
        passage = prompts.get("passage", prompts.get("document"))
        if isinstance(passage, str):
            out["passage_prefix"] = passage
    return out


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else []


def model_settings(spec: StudySpec, name: str) -> ModelSettings:
    """Pooling, normalisation and prefixes: the entry's, else the table's, else the model's own
    sentence-transformers files, else mean pooling, not normalised, no prefixes."""
    entry = spec.models[name]
    table = table_entry(name, entry)
    found: dict[str, Any] = {"pooling": "mean", "normalize": False}
    found.update({"query_prefix": "", "passage_prefix": ""})
    if table is not None:
        found.update(
            pooling=table.pooling,
            normalize=table.normalize,
            query_prefix=table.query_prefix,
            passage_prefix=table.passage_prefix,
        )
    else:
        found.update(_sentence_transformers_settings(local_dir(spec, name)))
    for field in ("pooling", "normalize", "query_prefix", "passage_prefix"):
        value = getattr(entry, field)
        if value is not None:
            found[field] = value
    return ModelSettings(ref=model_ref(spec, name), **found)


def config_max_tokens(spec: StudySpec, name: str) -> int | None:
    """The longest input of ``name`` from its local ``config.json`` read as plain JSON (no
    transformers, no torch), the entry's overrides first; None when no local config says it.

    Raises:
        ValueError: The config.json is not JSON.
    """
    entry = spec.models[name]
    directory = local_dir(spec, name)
    file = directory / "config.json" if directory is not None else None
    if file is None or not file.is_file():
        return None
    raw = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    positions = entry.max_positions or raw.get("max_position_embeddings")
    if not isinstance(positions, int) or isinstance(positions, bool) or positions < 1:
        return None
    architecture = entry.architecture or str(raw.get("model_type") or "bert")
    return positions - 2 if architecture in OFFSET_POSITIONS else positions


def load_config(directory_or_id: str) -> Any:
    """The model's config, no weights, no network.

    A local ``config.json`` of a family this service trains (``SDPA_MODEL_TYPES``) that names
    every fact the estimate reads is read as it is: transformers writes each of them into every
    config it saves, and importing transformers (and torch) for it costs a worker 2 s of CPU.
    Anything else: ``AutoConfig.from_pretrained(..., local_files_only=True)``.
    """
    raw = _plain_config(Path(directory_or_id) / "config.json")
    if raw is not None:
        return SimpleNamespace(**raw)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(directory_or_id, local_files_only=True)


_PLAIN_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)


def _plain_config(file: Path) -> dict[str, Any] | None:
    """``file``'s settings when it is a config of a trained family with every fact an integer."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # not there, or not JSON: AutoConfig says what is wrong
    if not isinstance(raw, dict) or raw.get("model_type") not in SDPA_MODEL_TYPES:
        return None
    if not all(type(raw.get(f)) is int and raw[f] > 0 for f in _PLAIN_FIELDS):
        return None
    return raw


def _tokenizer_kind(directory: Path | None, model_type: str, table: ModelInfo | None) -> str:
    if table is not None:
        return table.tokenizer
    if model_type == "xlm-roberta":
        return "sentencepiece"
    if directory is not None and any((directory / f).is_file() for f in _SENTENCEPIECE_FILES):
        return "sentencepiece"
    return "wordpiece"


def facts_from_config(
    name: str,
    config: Any,
    *,
    hf_id: str,
    settings: ModelSettings,
    source: str,
    directory: Path | None = None,
    table: ModelInfo | None = None,
    attention: bool = True,
) -> ModelInfo:
    """The facts of a transformers config (``PretrainedConfig``) under the spec's settings."""
    model_type = str(getattr(config, "model_type", "") or "bert")
    hidden = int(config.hidden_size)
    fallback_positions = table.max_positions if table is not None else 512
    return ModelInfo(
        name=name,
        hf_id=hf_id,
        architecture=model_type,
        tokenizer=_tokenizer_kind(directory, model_type, table),  # type: ignore[arg-type]
        num_layers=int(config.num_hidden_layers),
        hidden=hidden,
        heads=int(config.num_attention_heads),
        ffn=int(getattr(config, "intermediate_size", None) or 4 * hidden),
        vocab=int(config.vocab_size),
        max_positions=int(getattr(config, "max_position_embeddings", None) or fallback_positions),
        pooling=settings.pooling,  # type: ignore[arg-type]
        normalize=settings.normalize,
        query_prefix=settings.query_prefix,
        passage_prefix=settings.passage_prefix,
        attn_implementation=attention_of(config) if attention else "sdpa",
        source=source,
    )


def _with_overrides(info: ModelInfo, entry: ModelEntry) -> ModelInfo:
    changes = {f: getattr(entry, f) for f in FACT_OVERRIDES if getattr(entry, f) is not None}
    return dataclasses.replace(info, **changes) if changes else info


def hub_offline() -> bool:
    """Whether the hub may not be used (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "on", "yes", "true")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _download_config(repo_id: str) -> Path | None:
    """Fetch only ``config.json`` of ``repo_id`` into the cache (one try), or None.

    The hub's host is tried first with one plain connection (3 s): without a network the
    answer is None at once, not huggingface_hub's retries with backoff.
    """
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants
    from huggingface_hub import hf_hub_download

    endpoint = urlsplit(constants.ENDPOINT)
    try:
        port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
        socket.create_connection((endpoint.hostname or "", port), timeout=3).close()
    except OSError:
        return None
    try:
        return Path(hf_hub_download(repo_id, "config.json", etag_timeout=5))
    except Exception:  # noqa: BLE001 - any failure: the facts fall back or the caller says so
        return None


def resolve_facts(
    spec: StudySpec, name: str, *, attention: bool = True, download: bool = False
) -> ModelInfo:
    """The facts of ``spec``'s model ``name``: its config.json, else the table; then overrides.

    Args:
        spec: The study spec.
        name: A key of ``spec.models``.
        attention: Find out the attention implementation (imports torch); without it the
            facts say ``sdpa`` (what every model of the table runs) unless overridden.
        download: When no config is local and the hub may be used, fetch only the config
            (a model the hub has but this machine has not downloaded yet).

    Raises:
        LookupError: No config is reachable and the model is not in the shipped table.
    """
    entry = spec.models[name]
    table = table_entry(name, entry)
    settings = model_settings(spec, name)
    ref = settings.ref
    hf_id = entry.id or (table.hf_id if table is not None and entry.path is None else ref)
    directory: Path | None
    if entry.path is not None:
        directory = spec.resolve_path(entry.path)
        source = f"config.json:{directory}"
        has_config = (directory / "config.json").is_file()
    else:
        config_file = cached_file(ref, "config.json")
        if config_file is None and download and not hub_offline():
            config_file = _download_config(ref)
        directory = config_file.parent if config_file is not None else None
        source = "hf-cache"
        has_config = config_file is not None
    if has_config:
        config = _cached_config(str(directory) if directory is not None else ref)
        info = facts_from_config(
            name,
            config,
            hf_id=hf_id,
            settings=settings,
            source=source,
            directory=directory,
            table=table,
            attention=attention,
        )
    elif table is not None:
        info = dataclasses.replace(
            table,
            name=name,
            pooling=settings.pooling,  # type: ignore[arg-type]
            normalize=settings.normalize,
            query_prefix=settings.query_prefix,
            passage_prefix=settings.passage_prefix,
            source="table",
        )
    else:
        raise LookupError(f"no config.json of model {name!r} is reachable at {ref}")
    return _with_overrides(info, entry)


def facts_of_directory(info: ModelInfo, directory: str | Path) -> ModelInfo:
    """``info`` with the facts of the model saved in ``directory`` (a tiny replica)."""
    directory = Path(directory)
    config = _cached_config(str(directory))
    settings = ModelSettings(
        str(directory), info.pooling, info.normalize, info.query_prefix, info.passage_prefix
    )
    found = facts_from_config(
        info.name,
        config,
        hf_id=info.hf_id,
        settings=settings,
        source=f"config.json:{directory}",
        directory=directory,
    )
    return dataclasses.replace(found, tokenizer=info.tokenizer)


_CONFIGS: dict[str, Any] = {}


def _cached_config(directory_or_id: str) -> Any:
    """One ``load_config`` per directory or id in this process (configs do not change)."""
    if directory_or_id not in _CONFIGS:
        _CONFIGS[directory_or_id] = load_config(directory_or_id)
    return _CONFIGS[directory_or_id]


def resolve_all(spec: StudySpec, names: list[str] | None = None) -> dict[str, ModelInfo]:
    """``resolve_facts`` of each model of ``spec`` (or of ``names``)."""
    return {name: resolve_facts(spec, name) for name in (names or list(spec.models))}
