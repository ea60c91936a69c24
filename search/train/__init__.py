"""The AMP training objective: data, tiny replicas, the bi-encoder, loss, metrics and loop."""

from search.train.data import DataError
from search.train.data import EvalSet
from search.train.data import TrainExample
from search.train.data import load_eval
from search.train.data import load_train
from search.train.data import validate_data
from search.train.encoder import BiEncoder
from search.train.encoder import ModelLoadError
from search.train.klue import klue_nli_to_retrieval
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
from search.train.tiny import build_tiny_replica
from search.train.tiny import tiny_info
from search.train.tiny import tiny_replica_dir

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
