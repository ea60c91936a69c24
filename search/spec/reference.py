"""The spec reference (markdown), generated from the spec's JSON Schema (``search.spec.schema``).

Each section of a spec (``study``, ``models.<name>``, ``space``...) is one table: its fields,
what each takes, its default and whether it is required, with the section's own docstring. The
documentation site builds its *Spec reference* page from it (``docs/hooks.py``), so the page
is the pydantic models that load a spec, never a copy that could drift.

Example:
    >>> text = spec_reference()
    >>> text.splitlines()[0], "| `name` |" in text
    ('# Spec reference', True)
"""

from __future__ import annotations

import json
from typing import Any

from search.spec.schema import spec_schema

__all__ = ["spec_reference"]

# Where each section's model appears in a spec file (its JSON Schema definition name).
_SECTIONS = (
    ("study", "StudySection"),
    ("models.<name>", "ModelEntry"),
    ("space", "SpaceSection"),
    ("space.lr, space.temperature, ... (a float range)", "FloatRange"),
    ("space.conditions[]", "Condition"),
    ("training", "TrainingSection"),
    ("data", "DataSection"),
    ("sampler", "SamplerSection"),
    ("pruner", "PrunerSection"),
    ("tracking", "TrackingSection"),
    ("artifacts", "ArtifactsSection"),
    ("stages[]", "StageSection"),
)


def _type(prop: dict[str, Any]) -> str:
    """What a property takes, in a few words."""
    if "$ref" in prop:
        return "section: " + prop["$ref"].rsplit("/", 1)[-1]
    if "enum" in prop:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in prop["enum"])
    if "const" in prop:
        return f"`{json.dumps(prop['const'])}`"
    if "anyOf" in prop:
        return " or ".join(_type(p) for p in prop["anyOf"])
    kind = prop.get("type", "any")
    if kind == "array":
        return f"list of {_type(prop.get('items', {}))}"
    if kind == "object" and isinstance(prop.get("additionalProperties"), dict):
        return f"mapping of name to {_type(prop['additionalProperties'])}"
    limits = [
        f"{sign} {prop[key]}"
        for key, sign in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"))
        if key in prop
    ]
    if "minLength" in prop and prop["minLength"] > 0:
        limits.append("not empty")
    return str(kind) + (f" ({', '.join(limits)})" if limits else "")


def _default(prop: dict[str, Any], required: bool) -> str:
    if required:
        return "required"
    if "default" not in prop:
        return ""
    value = prop["default"]
    text = json.dumps(value, ensure_ascii=False)
    return f"`{text}`" if len(text) <= 40 else "(a section, see below)"


def spec_reference() -> str:
    """The reference page: one table per spec section."""
    schema = spec_schema()
    defs = schema["$defs"]
    out = [
        "# Spec reference",
        "",
        "Every field a study spec may set, generated from the pydantic models that load it "
        "(`search/spec/study_spec.py`), so this page is what `search run` accepts. The same "
        "as a JSON Schema for editors: `search spec schema`. A field not listed is refused.",
        "",
        "## The top level",
        "",
        *_table(schema),
    ]
    for where, name in _SECTIONS:
        section = defs[name]
        out += ["", f"## `{where}`", ""]
        if section.get("description"):
            out += [" ".join(section["description"].split()), ""]
        out += _table(section)
    return "\n".join(out) + "\n"


def _table(section: dict[str, Any]) -> list[str]:
    required = set(section.get("required", []))
    rows = ["| field | takes | default |", "|---|---|---|"]
    for field, prop in section.get("properties", {}).items():
        rows.append(f"| `{field}` | {_type(prop)} | {_default(prop, field in required)} |")
    return rows
