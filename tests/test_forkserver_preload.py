"""A trial starts with transformers' checkpoint conversion table already built by the
forkserver's preload (``search.worker.preload_tables``), not building it in its first
``from_pretrained``."""

from __future__ import annotations

from typing import Any

from _factories import trial_config

from search.record.config import TrialConfig
from search.worker.isolation import run_isolated

HERE = "test_forkserver_preload"  # the child imports the objective below by this module name


def table_state(cfg: TrialConfig, *, report: Any = None, on_phase: Any = None) -> Any:
    import transformers.conversion_mapping as mapping

    built = mapping._checkpoint_conversion_mapping_cache is not None  # noqa: SLF001 - observed
    return {"metrics": {"built": float(built)}}


def test_trials_inherit_the_conversion_table() -> None:
    out = run_isolated(trial_config(), objective=f"{HERE}:table_state")
    assert out.status == "complete", out.error
    assert out.metrics["built"] == 1.0


def test_a_fresh_interpreter_has_not_built_it() -> None:
    """The observation can fail: without the preload the table is built lazily."""
    import subprocess
    import sys

    code = (
        "import transformers.conversion_mapping as m; "
        "print(m._checkpoint_conversion_mapping_cache is None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
