"""How one worker runs a study (``RunOptions``), importable without torch.

The CLI builds ``RunOptions`` from its options and validates the user's input before the
training stack is imported; the runner reads it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING

from search.record.config import DEFAULT_OBJECTIVE

if TYPE_CHECKING:
    from search.spec.study_spec import StudySpec

DEFAULT_CACHE = Path(os.environ.get("SEARCH_CACHE", Path.home() / ".cache" / "search"))


@dataclass
class RunOptions:
    """How one worker runs a study (everything that is not in the spec)."""

    storage_url: str
    n_trials: int | None = None
    set_n_trials: bool = False
    timeout: float | None = None
    seed: int | None = None
    tiny: bool = False
    skip_unavailable: bool = False  # search only the models whose weights are here
    device: str = "auto"
    gpu: str | None = None
    memory_limit: int | None = None
    use_estimate: bool = True
    use_frontier: bool = True
    objective: str = DEFAULT_OBJECTIVE
    cache_dir: Path = DEFAULT_CACHE
    study_name: str | None = None
    wandb: bool | None = None  # one W&B run per trial; None: the spec's tracking.wandb
    wandb_project: str | None = None  # None: the spec's tracking.project, else the study's name
    wandb_entity: str | None = None  # None: the spec's tracking.entity, else W&B's default
    worker: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


def study_name_for(spec: StudySpec, opts: RunOptions) -> str:
    """The Optuna study name: ``--study-name``, else the spec's (``-tiny`` for tiny replicas).

    Tiny-replica trials live in their own study so they never mix with real-weights results.
    """
    if opts.study_name:
        return opts.study_name
    return f"{spec.study.name}-tiny" if opts.tiny else spec.study.name
