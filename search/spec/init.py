"""``search spec init FILE``: a spec of your own to edit, that still finds the shipped demo data.

The shipped specs point at their data with ``package:`` paths (inside the installed package),
so the copy runs as it is, wherever it is written; change ``data.train`` / ``data.eval`` to
use your own data.
"""

from __future__ import annotations

import os
from pathlib import Path

from search.spec.load import check_spec_data
from search.spec.load import load_spec
from search.spec.study_spec import SpecError
from search.spec.study_spec import shipped_spec_path
from search.spec.study_spec import shipped_specs


def init_spec(target: str | Path, source: str = "ko-retrieval", *, force: bool = False) -> Path:
    """Write the shipped spec ``source`` to ``target`` and check that it loads with its data.

    Args:
        target: The file to write.
        source: Name of a shipped spec (``search/studies/<source>.yaml``).
        force: Overwrite an existing ``target``.

    Returns:
        The written file.

    Raises:
        SpecError: Unknown ``source``, ``target`` exists (without ``force``), is a directory, or
            its directory does not exist.
    """
    target = Path(target)
    shipped = shipped_spec_path(source)
    if not shipped.is_file():
        known = ", ".join(shipped_specs()) or "none"
        raise SpecError(f"--from {source!r}: no shipped spec of that name (shipped: {known})")
    if target.is_dir():
        raise SpecError(f"{target}: is a directory; name the spec file to write")
    if target.exists() and not force:
        raise SpecError(f"{target}: already exists; pass --force to overwrite it")
    if not target.parent.is_dir():
        raise SpecError(f"{target}: directory {target.parent} does not exist")
    header = (
        f"# Written by `search spec init` from the shipped {source} spec: edit it, then run\n"
        f"# `search run --spec {target.name}` (add --tiny for offline tiny replicas).\n"
    )
    partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    partial.write_text(header + shipped.read_text(encoding="utf-8"), encoding="utf-8")
    try:
        check_spec_data(load_spec(partial), model_paths=False)
    except Exception:
        partial.unlink()
        raise
    os.replace(partial, target)
    return target
