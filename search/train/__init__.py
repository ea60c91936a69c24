"""The AMP training objective: data, tiny replicas, the bi-encoder, loss, metrics and loop.

The names below load on first use (PEP 562), so that ``import search.train.data`` (the CLI's
error handler, data validation) does not pull in torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    from search.train.data import DataError
    from search.train.data import EvalSet
    from search.train.data import TrainExample
    from search.train.data import load_eval
    from search.train.data import load_train
    from search.train.data import validate_data
    from search.train.encoder import BiEncoder
    from search.train.encoder import ModelLoadError
    from search.train.loop import TrainResult
    from search.train.loop import autocast_dtype
    from search.train.loop import cpu_has_native_bf16
    from search.train.loop import peak_memory_mb
    from search.train.loop import resolve_device
    from search.train.loop import seed_everything
    from search.train.loop import train
    from search.train.losses import InfoNCELoss
    from search.train.metrics import evaluate
    from search.train.metrics import retrieval_metrics
    from search.train.nli_retrieval import klue_nli_to_retrieval
    from search.train.tiny import build_tiny_replica
    from search.train.tiny_layout import tiny_info
    from search.train.tiny_layout import tiny_replica_dir

_EXPORTS = {
    "DataError": "search.train.data",
    "EvalSet": "search.train.data",
    "TrainExample": "search.train.data",
    "load_eval": "search.train.data",
    "load_train": "search.train.data",
    "validate_data": "search.train.data",
    "BiEncoder": "search.train.encoder",
    "ModelLoadError": "search.train.encoder",
    "klue_nli_to_retrieval": "search.train.nli_retrieval",
    "TrainResult": "search.train.loop",
    "autocast_dtype": "search.train.loop",
    "cpu_has_native_bf16": "search.train.loop",
    "peak_memory_mb": "search.train.loop",
    "resolve_device": "search.train.loop",
    "seed_everything": "search.train.loop",
    "train": "search.train.loop",
    "InfoNCELoss": "search.train.losses",
    "evaluate": "search.train.metrics",
    "retrieval_metrics": "search.train.metrics",
    "build_tiny_replica": "search.train.tiny",
    "tiny_info": "search.train.tiny_layout",
    "tiny_replica_dir": "search.train.tiny_layout",
}

__all__ = [
    "BiEncoder",
    "DataError",
    "EvalSet",
    "InfoNCELoss",
    "ModelLoadError",
    "TrainExample",
    "TrainResult",
    "autocast_dtype",
    "build_tiny_replica",
    "cpu_has_native_bf16",
    "evaluate",
    "klue_nli_to_retrieval",
    "load_eval",
    "load_train",
    "peak_memory_mb",
    "resolve_device",
    "retrieval_metrics",
    "seed_everything",
    "tiny_info",
    "tiny_replica_dir",
    "train",
    "validate_data",
]


def __getattr__(name: str) -> Any:
    """Import an exported name's module on first access."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
