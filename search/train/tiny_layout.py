"""Where a tiny replica lives and what its facts are, without importing torch or transformers.

A worker whose replicas are already built (``search.train.tiny.build_tiny_replica``) reads only
this: their directories and facts, so ``search run --tiny`` does not import the model classes
(seconds) to find that there is nothing to build.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from search.record.models import ModelInfo

# Default dimensions of a replica: small enough that all four build in a few seconds on one core.
TINY_DIMS: dict[str, int] = {
    "num_layers": 2,  # transformer layers
    "hidden": 64,  # hidden size
    "heads": 4,  # attention heads (hidden must divide by it)
    "ffn": 128,  # feed-forward size
    "vocab_size": 4000,  # tokenizer trained up to this size; the embedding has exactly this many
}

# Written last into a replica's directory: its presence means the replica is complete.
MARKER = "tiny_replica.json"


def tiny_info(
    info: ModelInfo,
    *,
    num_layers: int = TINY_DIMS["num_layers"],
    hidden: int = TINY_DIMS["hidden"],
    heads: int = TINY_DIMS["heads"],
    ffn: int = TINY_DIMS["ffn"],
    vocab_size: int = TINY_DIMS["vocab_size"],
    seed: int = 0,
) -> ModelInfo:
    """The facts of a model's tiny replica (what the memory estimate reads under ``--tiny``).

    Args:
        info: The real model.
        num_layers: Replica layers.
        hidden: Replica hidden size.
        heads: Replica attention heads.
        ffn: Replica feed-forward size.
        vocab_size: Replica vocabulary (embedding rows).
        seed: Accepted so that the same keyword arguments fit every function here; unused.

    Returns:
        ``info`` with the tiny dimensions; name, positions, pooling and prefixes unchanged.
    """
    _check_dims(num_layers=num_layers, hidden=hidden, heads=heads, ffn=ffn, vocab_size=vocab_size)
    del seed
    return dataclasses.replace(
        info, num_layers=num_layers, hidden=hidden, heads=heads, ffn=ffn, vocab=vocab_size
    )


def tiny_replica_dir(
    info: ModelInfo,
    cache_dir: str | Path,
    *,
    num_layers: int = TINY_DIMS["num_layers"],
    hidden: int = TINY_DIMS["hidden"],
    heads: int = TINY_DIMS["heads"],
    ffn: int = TINY_DIMS["ffn"],
    vocab_size: int = TINY_DIMS["vocab_size"],
    seed: int = 0,
) -> Path:
    """Where ``build_tiny_replica`` puts (or finds) a replica, without building it.

    The name is ``<model>-tiny-L<layers>-H<hidden>``, followed by ``-A<heads>``, ``-F<ffn>``,
    ``-V<vocab>`` and ``-S<seed>`` for each value that differs from the defaults.

    Args:
        info: The real model.
        cache_dir: Folder holding the replicas.
        num_layers: Replica layers.
        hidden: Replica hidden size.
        heads: Replica attention heads.
        ffn: Replica feed-forward size.
        vocab_size: Replica vocabulary.
        seed: Seed of the weights' initialisation.

    Returns:
        ``cache_dir / name``.
    """
    _check_dims(num_layers=num_layers, hidden=hidden, heads=heads, ffn=ffn, vocab_size=vocab_size)
    name = f"{info.name}-tiny-L{num_layers}-H{hidden}"
    for tag, value, default in (
        ("A", heads, TINY_DIMS["heads"]),
        ("F", ffn, TINY_DIMS["ffn"]),
        ("V", vocab_size, TINY_DIMS["vocab_size"]),
        ("S", seed, 0),
    ):
        if value != default:
            name += f"-{tag}{value}"
    return Path(cache_dir) / name


def _check_dims(*, num_layers: int, hidden: int, heads: int, ffn: int, vocab_size: int) -> None:
    """Raise ``ValueError`` on dimensions no model can have."""
    for name, value in (
        ("num_layers", num_layers),
        ("hidden", hidden),
        ("heads", heads),
        ("ffn", ffn),
        ("vocab_size", vocab_size),
    ):
        if value < 1:
            raise ValueError(f"Tiny replica dimensions must be positive, but got {name}={value}.")
    if hidden % heads:
        raise ValueError(f"hidden must be a multiple of heads, but got {hidden=} and {heads=}.")


def replica_facts(info: ModelInfo, directory: str | Path) -> ModelInfo | None:
    """The facts of the replica built in ``directory`` from its marker, or None without one.

    The marker holds the dimensions the replica was built with, so the facts come without
    loading its ``config.json`` through transformers (which imports torch): the same facts as
    ``search.spec.model_facts.facts_of_directory``, with ``source`` naming the marker.
    """
    marker = Path(directory) / MARKER
    try:
        built = json.loads(marker.read_text(encoding="utf-8"))
        dims = {key: int(built[key]) for key in ("num_layers", "hidden", "heads", "ffn")}
        dims["vocab_size"] = int(built["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return dataclasses.replace(tiny_info(info, **dims), source=f"{MARKER}:{directory}")
