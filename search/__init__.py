"""Hyperparameter search for Korean bi-encoder retrieval models, on Optuna."""

from search.record.config import TrialConfig
from search.record.models import MODELS
from search.record.models import ModelInfo

__all__ = ["MODELS", "ModelInfo", "TrialConfig"]
__version__ = "0.1.0"
