"""Training losses of the bi-encoder objective."""

from search.train.losses._info_nce import InfoNCELoss

__all__ = ["InfoNCELoss"]
