"""The study spec's JSON Schema, from its pydantic models (``search spec schema``).

Editors validate and complete a spec with it (the YAML language server: a first line
``# yaml-language-server: $schema=search-spec.schema.json``). It is generated from the same
models that load a spec, so it cannot drift from what ``search run`` accepts; the file's own
``source`` (where a loaded spec came from) is not a field a spec may set and is left out.

Example:
    >>> schema = spec_schema()
    >>> schema["title"], "source" in schema["properties"], "models" in schema["required"]
    ('search study spec', False, True)
"""

from __future__ import annotations

from typing import Any

from search.spec.study_spec import StudySpec

__all__ = ["SCHEMA_DIALECT", "spec_schema"]

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def spec_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a study spec file."""
    schema = StudySpec.model_json_schema()
    schema["properties"].pop("source", None)
    if "source" in schema.get("required", []):
        schema["required"].remove("source")
    return {
        "$schema": SCHEMA_DIALECT,
        "title": "search study spec",
        "description": (
            "A study spec of `search` (search run --spec FILE): models, search space, "
            "training, data, sampler, pruner, tracking, artifacts, stages."
        ),
        **{k: v for k, v in schema.items() if k not in ("title", "description")},
    }
