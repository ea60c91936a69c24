"""Builders shared by the tests."""

from __future__ import annotations

from typing import Any

from search.config import TrialConfig
from search.models import MODELS


def trial_config(**over: Any) -> TrialConfig:
    """A small CPU TrialConfig (ko-simcse unless ``model`` says otherwise), fields overridable.

    Pooling, normalisation and prefixes follow the model's facts unless given.
    """
    model = over.get("model", "ko-simcse")
    info = MODELS.get(model)
    base: dict[str, Any] = dict(
        model=model,
        model_path="unused",
        batch_size=8,
        max_len=32,
        lr=1e-4,
        temperature=0.05,
        warmup_ratio=0.0,
        weight_decay=0.0,
        epochs=1,
        amp=False,
        gradient_checkpointing=False,
        hard_negatives=0,
        seed=0,
        device="cpu",
        train_path="unused",
        eval_dir="unused",
    )
    if info is not None:
        base.update(
            pooling=info.pooling,
            normalize=info.normalize,
            query_prefix=info.query_prefix,
            passage_prefix=info.passage_prefix,
        )
    base.update(over)
    return TrialConfig(**base)


def bge_cuda_config(**over: Any) -> TrialConfig:
    """A bge-m3-ko CUDA config (32 x 256, AMP) whose weights path is never loaded."""
    base: dict[str, Any] = dict(
        model="bge-m3-ko",
        model_path="/nonexistent/bge-m3-ko",
        batch_size=32,
        max_len=256,
        lr=2e-5,
        warmup_ratio=0.1,
        weight_decay=0.01,
        amp=True,
        device="cuda",
        train_path="t.jsonl",
        eval_dir="eval",
    )
    return trial_config(**(base | over))
