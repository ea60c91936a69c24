"""Training losses of the bi-encoder objective."""

from search.train.losses._info_nce import InfoNCELoss
from search.train.losses.cached_infonce import CachedInfoNCELoss

__all__ = ["CachedInfoNCELoss", "InfoNCELoss"]
