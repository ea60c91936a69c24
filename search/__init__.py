"""Hyperparameter search for Korean bi-encoder retrieval models, on Optuna."""

from search.config import TrialConfig
from search.models import MODELS
from search.models import ModelInfo

__all__ = ["MODELS", "ModelInfo", "TrialConfig"]
__version__ = "0.1.0"
