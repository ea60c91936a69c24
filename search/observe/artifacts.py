"""The study's artifact store: where it is (beside a SQLite file, ``--artifacts DIR`` or
``$SEARCH_ARTIFACTS``) and Optuna's file-system store on it. Used by ``search report
--publish`` (``search.observe.publish``), the kept models (``search.observe.keep``) and the
dashboard.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from optuna.artifacts import FileSystemArtifactStore

from storage import sqlite_file

if TYPE_CHECKING:
    from storage import ArtifactStore

__all__ = ["ENV_ARTIFACTS", "artifact_dir", "artifact_store"]

ENV_ARTIFACTS = "SEARCH_ARTIFACTS"


def artifact_dir(url: str, option: str | Path | None = None) -> Path | None:
    """The study storage's artifact directory: ``option``, ``$SEARCH_ARTIFACTS``, else beside
    a SQLite file (``search.db`` -> ``search.db.artifacts``); None for a server database.

    Example:
        >>> str(artifact_dir("sqlite:///runs/search.db", None))
        'runs/search.db.artifacts'
    """
    chosen = str(option) if option else os.environ.get(ENV_ARTIFACTS, "").strip()
    if chosen:
        return Path(chosen.removeprefix("file://")).expanduser()
    database = sqlite_file(url)
    return Path(f"{database}.artifacts") if database else None


def artifact_store(directory: Path, *, create: bool = False) -> ArtifactStore:
    """Optuna's file-system artifact store on ``directory``."""
    if create:
        directory.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(directory))
