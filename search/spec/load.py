"""Loading a spec file: YAML (a key given twice is an error), validation, and the checks that
need more than the spec itself: the models' position embeddings (``search.spec.model_facts``),
the stages (``search.spec.stage_check``) and the data files (``search.train.data``).

Example:
    >>> spec = load_spec(shipped_spec_path("ko-retrieval"))
    >>> spec.study.name, sorted(spec.space.choices_for("bge-m3-ko")["batch_size"])
    ('ko-retrieval', [32, 64])
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from search.spec.model_facts import config_max_tokens
from search.spec.model_facts import local_dir
from search.spec.model_facts import resolve_facts
from search.spec.stage_check import DEVICE
from search.spec.stage_check import StageError
from search.spec.stage_check import check_stages
from search.spec.stage_check import stage_models
from search.spec.study_spec import SpecError
from search.spec.study_spec import StudySpec
from search.spec.study_spec import shipped_spec_path
from search.spec.study_spec import shipped_specs
from search.spec.weights_check import weights_problem
from search.train.data import validate_data

__all__ = ["check_spec_data", "load_spec", "resolve_spec"]


def _format_error(path: Path, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if not loc:  # a check across fields: its message leads with the field (``space.x: ...``)
        named = re.match(r"([a-z_]+(?:\.[\w.-]+)*): (.+)", msg)
        if named is None:
            return f"{path}: {msg}"
        loc, msg = named.groups()
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (value: {value!r})"
    return f"{path}: field {loc}{shown}: {msg}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_document(self, node: yaml.Node) -> Any:
        _reject_duplicate_keys(node, ())
        return super().construct_document(node)


class _DuplicateKeyError(ValueError):
    def __init__(self, field: str, line: int, first: int) -> None:
        super().__init__(
            f"line {line}: field {field} is given twice (first on line {first}); YAML would keep "
            "only the last one: remove or rename one"
        )


def _reject_duplicate_keys(node: yaml.Node, path: tuple[str, ...]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            line = key_node.start_mark.line + 1
            if key in seen and key != "<<":
                raise _DuplicateKeyError(".".join((*path, key)), line, seen[key])
            seen[key] = line
            _reject_duplicate_keys(value_node, (*path, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _reject_duplicate_keys(item, (*path, str(i)))


def _check_positions(spec: StudySpec, path: Path) -> None:
    """Every model's effective ``max_len`` choices fit its position embeddings.

    The positions are the model's own (its ``config.json``, when the directory or the local
    Hugging Face cache holds one), else the shipped table's; a model with neither is checked
    when its weights are (``search.spec.model_resolve``).
    """
    for model in spec.models:
        try:
            limit = config_max_tokens(spec, model)  # plain JSON: no transformers, no torch
            if limit is None:
                limit = resolve_facts(spec, model, attention=False).max_tokens
        except LookupError:
            continue
        except (OSError, ValueError) as exc:
            where = spec.models[model].path or spec.models[model].id or model
            first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise SpecError(
                f"{path}: field models.{model} (value: {where!r}): cannot read its config.json: "
                f"{first.strip()[:200]}"
            ) from None
        cond = spec.space.conditions.get(model)
        if cond is not None and cond.max_len:
            field, choices, fix = f"space.conditions.{model}.max_len", cond.max_len, "drop it"
        else:
            field, choices = "space.max_len", spec.space.max_len
            fix = f"drop it, or give {model} its own space.conditions.{model}.max_len"
        over = [x for x in choices if x > limit]
        wide = [i for i, s in enumerate(spec.stages) if s.conditions == DEVICE]
        wide = [i for i in wide if model in stage_models(spec, spec.stages[i])]
        long = [x for x in spec.space.max_len if x > limit]
        if not over and wide and long:  # a ``conditions: device`` stage draws any space.max_len
            raise SpecError(
                f"{path}: field stages.{wide[0]}.conditions (value: {DEVICE!r}): widens {model} "
                f"to space.max_len {long[0]}, but it takes at most {limit} tokens (its position "
                f"embeddings); leave {model} out of that stage's models, or drop {long[0]} from "
                "space.max_len"
            )
        if over:
            raise SpecError(
                f"{path}: field {field} (value: {over[0]}): {model} takes at most {limit} tokens "
                f"(its position embeddings); {fix}"
            )


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a spec file; raise SpecError with a one-line message on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc.strerror or exc}") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKeyError as exc:
        raise SpecError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise SpecError(f"{path}:{where}: invalid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a YAML mapping, but got {type(raw).__name__}")
    if "source" in raw:
        raise SpecError(f"{path}: field source: not a spec field")
    if raw.get("stages") == []:
        raise SpecError(
            f"{path}: field stages (value: []): an empty list; leave stages out for one stage "
            "over the whole space, or list at least one stage"
        )
    try:
        spec = StudySpec.model_validate({**raw, "source": str(path.resolve())})
    except ValidationError as exc:
        raise SpecError(_format_error(path, exc)) from None
    _check_positions(spec, path)
    try:
        check_stages(spec)
    except StageError as exc:
        raise SpecError(f"{path}: {exc}") from None
    return spec


def check_spec_data(
    spec: StudySpec, *, model_paths: bool = True, weights: bool | None = None
) -> None:
    """Check the spec's data (and, with ``model_paths``, local model directories) up front.

    A missing path is a SpecError naming the spec field to change; a malformed file is a
    DataError naming the file and line (``search.train.data``). With ``weights`` (default:
    ``model_paths``) each local model's safetensors weights are checked against its config
    (``search.spec.weights_check``): a mismatch or a truncated file is a SpecError.
    """
    where = spec.source or "the spec"
    demo = "search spec init FILE writes a spec that uses the shipped demo data"
    train = spec.resolve_path(spec.data.train)
    if not train.is_file():
        state = "is a directory, not a file" if train.is_dir() else "file not found"
        raise SpecError(
            f"{where}: field data.train (value: {spec.data.train!r}): {state} at {train}; "
            f"point data.train at your training JSONL ({demo})"
        )
    eval_dir = spec.resolve_path(spec.data.eval)
    if not eval_dir.is_dir():
        raise SpecError(
            f"{where}: field data.eval (value: {spec.data.eval!r}): directory not found at "
            f"{eval_dir}; point data.eval at your BEIR directory (corpus.jsonl, queries.jsonl, "
            f"qrels/{spec.data.split}.tsv; {demo})"
        )
    for name, entry in spec.models.items():
        if model_paths and entry.path and not spec.resolve_path(entry.path).exists():
            raise SpecError(
                f"{where}: field models.{name}.path (value: {entry.path!r}): not found at "
                f"{spec.resolve_path(entry.path)}; point it at the model's local directory"
            )
    if model_paths if weights is None else weights:
        for name in spec.models:
            directory = local_dir(spec, name)
            problem = weights_problem(directory) if directory is not None else ""
            if problem:
                raise SpecError(f"{where}: field models.{name}: {problem}")
    validate_data(train, eval_dir, spec.data.split)


def resolve_spec(study: str | None, spec_file: str | None) -> StudySpec:
    """The spec named by ``--study`` (shipped) or ``--spec FILE``; SpecError when neither fits."""
    if spec_file:
        return load_spec(spec_file)
    if not study:
        raise SpecError("no study given: pass --study NAME (shipped) or --spec FILE")
    path = shipped_spec_path(study)
    if not path.is_file():
        known = ", ".join(shipped_specs()) or "none"
        raise SpecError(
            f"--study {study!r}: no shipped spec of that name (shipped: {known}); "
            "use --spec FILE for your own"
        )
    return load_spec(path)
