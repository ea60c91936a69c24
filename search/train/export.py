"""A trained bi-encoder as a sentence-transformers model directory, with its ``search.json``.

``SentenceTransformer(DIR)`` loads what :func:`save_sentence_transformer` writes with the
trial's pooling (CLS, mean or last token), normalisation and max length, and its prefixes as
``prompts`` named ``query`` and ``document`` with ``default_prompt_name`` unset, so users call
``encode_query`` / ``encode_document`` (the sentence-transformers convention). The files are
written here in the documented format that sentence-transformers 2.x to 6.x read (``modules.json``,
``sentence_bert_config.json``, ``1_Pooling/config.json``, ``config_sentence_transformers.json``),
so a trial needs no sentence-transformers import: the test loads them with the real library.

``search.json`` beside them holds the effective config, the metrics per epoch, and (filled in
by the worker, which knows them) the study name and trial number.

Example:
    >>> import tempfile
    >>> from search.record.config import TrialConfig
    >>> cfg = TrialConfig(model="m", model_path="p", batch_size=8, max_len=64, lr=1e-4,
    ...     temperature=0.05, warmup_ratio=0.0, weight_decay=0.0, epochs=1, amp=False,
    ...     gradient_checkpointing=False, hard_negatives=0, seed=0, device="cpu",
    ...     train_path="t", eval_dir="e", pooling="mean", normalize=True,
    ...     query_prefix="query: ", passage_prefix="passage: ")
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = write_sentence_transformer_config(cfg, d, hidden=64)
    ...     modules = json.loads((Path(d) / "modules.json").read_text())
    ...     pooling = json.loads((Path(d) / "1_Pooling/config.json").read_text())
    >>> [m["type"].rsplit(".", 1)[1] for m in modules], pooling["pooling_mode_mean_tokens"]
    (['Transformer', 'Pooling', 'Normalize'], True)
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterable
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    from search.record.config import TrialConfig
    from search.train.encoder import BiEncoder

__all__ = [
    "SEARCH_JSON",
    "read_search_json",
    "save_sentence_transformer",
    "follow_umask",
    "save_trial_model",
    "update_search_json",
    "write_sentence_transformer_config",
]

SEARCH_JSON = "search.json"
ST_FORMAT_VERSION = "3.0.0"  # the oldest sentence-transformers reading every key written here
# The service's pooling -> the sentence-transformers Pooling flag that computes the same thing.
_POOLING_FLAGS = {
    "cls": "pooling_mode_cls_token",
    "mean": "pooling_mode_mean_tokens",
    "last-token": "pooling_mode_lasttoken",
}
_ALL_FLAGS = (
    "pooling_mode_cls_token",
    "pooling_mode_mean_tokens",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)


def current_umask() -> int:
    """The process's umask (``/proc/self/status`` on Linux, else set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(directory: str | Path) -> Path:
    """Give ``directory`` and everything in it the modes ``open`` / ``mkdir`` would have given:
    files ``0666 & ~umask``, directories ``0777 & ~umask`` (as ``SentenceTransformer.save``).

    ``tempfile`` creates 0600 files and 0700 directories, and safetensors writes its weights
    0600: a model saved through them would be unreadable to a serving account.

    Example:
        >>> with tempfile.TemporaryDirectory() as d:
        ...     fd, f = tempfile.mkstemp(dir=d); os.close(fd)
        ...     _ = follow_umask(d)
        ...     oct(os.stat(f).st_mode & 0o777) == oct(0o666 & ~current_umask())
        True
    """
    mask = current_umask()
    root = Path(directory)
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    return root


def _write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (a reader never sees half a file), with the umask's mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide it from other users
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    os.replace(tmp, path)


def write_sentence_transformer_config(
    cfg: TrialConfig, directory: str | Path, *, hidden: int
) -> Path:
    """Write the sentence-transformers module files of ``cfg``'s encoder into ``directory``.

    The transformer itself (``config.json``, weights, tokenizer) is the caller's to save.

    Args:
        cfg: The trial's config: ``pooling``, ``normalize``, ``max_len`` and the prefixes.
        directory: The model directory.
        hidden: The encoder's hidden size (the embedding size).

    Returns:
        ``directory`` as a Path.
    """
    if cfg.pooling not in _POOLING_FLAGS:
        raise ValueError(
            f"pooling must be one of {tuple(_POOLING_FLAGS)}, but got {cfg.pooling!r}"
        )
    out = Path(directory)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if cfg.normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }  # fmt: skip
        )
        (out / "2_Normalize").mkdir(parents=True, exist_ok=True)
    _write_json(out / "modules.json", modules)
    _write_json(
        out / "sentence_bert_config.json", {"max_seq_length": cfg.max_len, "do_lower_case": False}
    )
    pooling: dict[str, Any] = {"word_embedding_dimension": hidden}
    pooling.update({flag: flag == _POOLING_FLAGS[cfg.pooling] for flag in _ALL_FLAGS})
    pooling["include_prompt"] = True  # the service's mean pools over the prefix tokens too
    _write_json(out / "1_Pooling" / "config.json", pooling)
    prompts = {
        name: prefix
        for name, prefix in (("query", cfg.query_prefix), ("document", cfg.passage_prefix))
        if prefix
    }
    _write_json(
        out / "config_sentence_transformers.json",
        {
            "__version__": {"sentence_transformers": ST_FORMAT_VERSION},
            "prompts": prompts,
            "default_prompt_name": None,  # encode_query / encode_document pick the prompt
            "similarity_fn_name": "cosine",  # what the service ranks by (search.train.metrics)
        },
    )
    return out


def save_sentence_transformer(
    encoder: BiEncoder,
    cfg: TrialConfig,
    directory: str | Path,
    *,
    history: Iterable[Mapping[str, float]] = (),
    study: str | None = None,
    trial: int | None = None,
) -> Path:
    """Save ``encoder`` as a sentence-transformers model in ``directory``, with ``search.json``.

    Args:
        encoder: The trained bi-encoder (weights are saved as they are, float32).
        cfg: The trial's effective config (recorded in ``search.json`` without ``save_dir``
            and ``save_bar``).
        directory: Where to write (created; files of the same name are replaced).
        history: The metrics of each epoch.
        study: The study's name, when known here (the worker adds it otherwise).
        trial: The trial's number, likewise.

    Returns:
        ``directory`` as a Path.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = encoder.tokenizer
    previous = tokenizer.model_max_length
    tokenizer.model_max_length = cfg.max_len  # plain AutoTokenizer users truncate alike
    try:
        encoder.model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    finally:
        tokenizer.model_max_length = previous
    write_sentence_transformer_config(cfg, out, hidden=encoder.embedding_dim)
    config = cfg.to_json()
    config.pop("save_dir", None)
    config.pop("save_bar", None)
    _write_json(
        out / SEARCH_JSON,
        {"study": study, "trial": trial, "config": config, "history": [dict(h) for h in history]},
    )
    return follow_umask(out)  # safetensors' 0600 weights, a tempfile directory's 0700


def save_trial_model(
    encoder: BiEncoder, cfg: TrialConfig, history: Iterable[Mapping[str, float]] = ()
) -> bool:
    """The trial's save (``train`` calls it when ``cfg.save_dir`` is set); False on failure.

    A save that fails (disk full, memory) must not turn a completed trial into a failed one:
    it prints one line on stderr and leaves no ``modules.json``, so the worker keeps nothing.
    """
    if not cfg.save_dir:
        return False
    try:
        save_sentence_transformer(encoder, cfg, cfg.save_dir, history=history)
    except Exception as exc:  # noqa: BLE001 - the trial's result stands without its model
        with contextlib.suppress(OSError):
            (Path(cfg.save_dir) / "modules.json").unlink(missing_ok=True)
        line = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        print(f"search: the trial's model was not saved: {line}", file=sys.stderr)
        return False
    return True


def read_search_json(directory: str | Path) -> dict[str, Any] | None:
    """The ``search.json`` of a saved model, or None when there is none."""
    path = Path(directory) / SEARCH_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def update_search_json(directory: str | Path, **values: Any) -> dict[str, Any]:
    """Set keys of a saved model's ``search.json`` (the worker adds study and trial)."""
    data = read_search_json(directory) or {}
    data.update(values)
    _write_json(Path(directory) / SEARCH_JSON, data)
    return data
