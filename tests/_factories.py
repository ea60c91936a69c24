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
