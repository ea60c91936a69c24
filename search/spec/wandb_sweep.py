"""``search spec from-wandb SWEEP.yaml``: a Weights & Biases sweep configuration as a study spec.

A sweep names its settings freely and searches every combination; a spec knows the settings of
the ko-retrieval objective and adds what a sweep cannot say: per-model conditions (bge-m3-ko
only at the batch sizes and lengths that fit, ko-simcse at its trained length), the budget as
finished trials, a sampler that learns. The conversion:

- ``method``: ``random`` -> the random sampler, ``bayes`` -> TPE, ``grid`` -> TPE over the same
  values with the grid's size as the budget (a spec has no grid sampler; TPE covers the
  values the conditions allow instead of every combination). A grid with a continuous range
  (``uniform``, ``log_uniform_values``) is refused, as W&B's grid refuses it.
- The file: at most :data:`MAX_SWEEP_BYTES`, no YAML aliases, at most :data:`MAX_VALUES`
  plain values per parameter.
- ``metric``: ``name`` -> ``study.metric`` (``eval/ndcg@10``, ``ndcg_at_10``, ``val/mrr@10``
  ... -> the spec's names), ``goal`` -> ``study.direction``.
- ``parameters``: the names in :data:`PARAMETERS`, each with ``value``, ``values`` or a
  ``distribution`` (:data:`DISTRIBUTIONS`) with ``min`` / ``max``. Models may be given by
  short name or Hugging Face id.
- ``run_cap`` -> ``study.n_trials``; ``early_terminate`` -> the spec's pruner.
- What the sweep leaves out (a setting, the data, the training options) comes from the shipped
  ko-retrieval spec; the data section points at the shipped demo data.

Anything it cannot map (an unknown parameter or distribution, a fixed value for a continuous
setting, a model it does not know) is a :class:`SweepError`: one line naming the file and the
parameter. The written spec is checked with :func:`search.spec.load.load_spec` before it is kept.

Example:
    >>> sweep = {"method": "bayes", "metric": {"name": "eval/ndcg@10", "goal": "maximize"},
    ...          "parameters": {"model": {"values": ["multilingual-e5-small"]},
    ...                         "lr": {"distribution": "log_uniform_values",
    ...                                "min": 1e-5, "max": 1e-4}}}
    >>> result = convert_sweep(sweep, where="sweep.yaml")
    >>> result.spec["sampler"]["type"], result.spec["space"]["lr"]
    ('tpe', {'low': 1e-05, 'high': 0.0001, 'log': True})
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from search.record.models import MODELS
from search.spec.load import load_spec
from search.spec.study_spec import METRICS
from search.spec.study_spec import SpecError
from search.spec.study_spec import StudySpec
from search.spec.study_spec import shipped_spec_path

# The sweep's parameter names and the spec setting each one becomes.
PARAMETERS: dict[str, str] = {
    "model": "model",
    "model_name": "model",
    "model_name_or_path": "model",
    "batch_size": "batch_size",
    "per_device_train_batch_size": "batch_size",
    "max_len": "max_len",
    "max_seq_length": "max_len",
    "max_length": "max_len",
    "lr": "lr",
    "learning_rate": "lr",
    "temperature": "temperature",
    "warmup_ratio": "warmup_ratio",
    "weight_decay": "weight_decay",
    "epochs": "epochs",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
}
DISTRIBUTIONS = ("uniform", "log_uniform_values", "int_uniform", "q_uniform", "categorical")
METHODS = {"random": "random", "bayes": "tpe", "grid": "tpe"}
SWEEP_KEYS = (
    "program",
    "name",
    "description",
    "project",
    "entity",
    "command",
    "method",
    "metric",
    "parameters",
    "run_cap",
    "early_terminate",
)
_PARAM_KEYS = ("value", "values", "distribution", "min", "max", "q", "probabilities")
_CATEGORICAL = ("batch_size", "max_len")
_CONTINUOUS = ("lr", "temperature", "warmup_ratio", "weight_decay")
_MAX_CHOICES = 64  # an int_uniform / q_uniform range listed as choices, at most this long
MAX_SWEEP_BYTES = 2**20  # a sweep configuration is a few KiB; a bigger file is not one
MAX_VALUES = 64  # values of one parameter (models, sizes, rates)
_CONTINUOUS_KINDS = ("uniform", "log_uniform_values")  # what W&B's grid refuses
_BASE = "ko-retrieval"  # the shipped spec that fills in what the sweep leaves out


class SweepError(SpecError):
    """A sweep the converter cannot map; the message is one line naming file and parameter."""


@dataclass(frozen=True)
class _Param:
    """One sweep parameter, read: a fixed value, a list of values or a range."""

    name: str
    kind: str  # "value", "values" or the distribution of a range
    values: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    q: float | None = None


@dataclass
class Conversion:
    """The spec a sweep became, and what the conversion changed or added, one line each."""

    spec: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    source: str = ""

    def to_yaml(self) -> str:
        """The spec as YAML, the notes as comments at the top and the data section explained."""
        lines = [
            f"# Written by `search spec from-wandb` from the W&B sweep {self.source}.",
            "# Check it with `search spec check FILE`, run it with `search run --spec FILE`",
            "# (add --tiny for offline tiny replicas).",
            "#",
            "# What the conversion did:",
            *(f"#   - {note}" for note in self.notes),
        ]
        for section, value in self.spec.items():
            lines.append("")
            if section == "data":
                lines += [
                    "# The data: the sweep names none, so this is the shipped demo data (package:",
                    "# paths inside the installed search package). Point `train` at your JSONL",
                    "# and `eval` at your BEIR directory.",
                ]
            dumped = yaml.dump(
                {section: value}, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=99
            )
            lines.append(dumped.rstrip("\n"))
        return "\n".join(lines) + "\n"


class _Dumper(yaml.SafeDumper):
    """Block style, except lists of scalars and mappings of numbers: ``{low: 0.0, high: 0.1}``."""

    def represent_sequence(self, tag: str, sequence: Any, flow_style: Any = None) -> Any:
        flat = all(not isinstance(x, dict | list) for x in sequence)
        return super().represent_sequence(tag, sequence, flow_style=flat)

    def represent_mapping(self, tag: str, mapping: Any, flow_style: Any = None) -> Any:
        values = mapping.values() if isinstance(mapping, dict) else []
        flat = isinstance(mapping, dict) and bool(mapping)
        flat = flat and all(isinstance(x, int | float) for x in values)
        return super().represent_mapping(tag, mapping, flow_style=flat)


def _error(where: str, what: str, message: str) -> SweepError:
    return SweepError(f"{where}: {what}: {message}")


def _number(value: Any, where: str, what: str) -> float | int:
    """A YAML number; a string such as ``1e-5`` (PyYAML reads it as text) counts too."""
    number: float | int
    if isinstance(value, bool):
        raise _error(where, what, f"expected a number, but got {value!r}")
    if isinstance(value, int | float):
        number = value
    else:
        try:
            number = int(str(value))
        except ValueError:
            try:
                number = float(str(value))
            except ValueError:
                raise _error(where, what, f"expected a number, but got {value!r}") from None
    if not math.isfinite(number):
        raise _error(where, what, f"expected a finite number, but got {value!r}")
    return number


def _read_param(name: str, body: Any, where: str, notes: list[str]) -> _Param:
    what = f"parameters.{name}"
    if not isinstance(body, Mapping):
        raise _error(
            where, what, f"expected a mapping (value, values or distribution), got {body!r}"
        )
    distribution = body.get("distribution")
    if distribution is not None and distribution not in DISTRIBUTIONS:
        raise _error(
            where,
            f"{what}.distribution",
            f"{distribution!r} cannot be mapped (supported: {', '.join(DISTRIBUTIONS)})",
        )
    unknown = [k for k in body if k not in _PARAM_KEYS]
    if unknown:
        raise _error(
            where, f"{what}.{unknown[0]}", f"cannot be mapped (known: {', '.join(_PARAM_KEYS)})"
        )
    if "probabilities" in body:
        notes.append(f"{name}: the sweep's probabilities dropped (the sampler weighs the values)")
    if "value" in body:
        if isinstance(body["value"], list | dict):
            raise _error(where, f"{what}.value", "expected one plain value (text or a number)")
        return _Param(name, "value", (body["value"],))
    if "values" in body:
        values = body["values"]
        if not isinstance(values, list) or not values:
            raise _error(where, f"{what}.values", f"expected a non-empty list, but got {values!r}")
        if len(values) > MAX_VALUES:
            why = f"{len(values)} values; a sweep lists at most {MAX_VALUES}"
            raise _error(where, f"{what}.values", why)
        if any(isinstance(v, list | dict) for v in values):
            raise _error(where, f"{what}.values", "expected plain values (text or numbers)")
        if distribution not in (None, "categorical"):
            raise _error(where, what, f"values with distribution {distribution!r}: give min/max")
        return _Param(name, "values", tuple(values))
    if "min" not in body or "max" not in body:
        raise _error(where, what, "give value, values, or a distribution with min and max")
    if distribution == "categorical":
        raise _error(where, what, "a categorical distribution needs values, not min/max")
    low = _number(body["min"], where, f"{what}.min")
    high = _number(body["max"], where, f"{what}.max")
    if not low < high:
        raise _error(where, what, f"min must be below max, but got min={low}, max={high}")
    if distribution is None:  # W&B's default: int_uniform for integer bounds, else uniform
        distribution = (
            "int_uniform" if isinstance(low, int) and isinstance(high, int) else "uniform"
        )
    q = _number(body["q"], where, f"{what}.q") if "q" in body else None
    if q is not None and q <= 0:
        raise _error(where, f"{what}.q", f"must be above 0, but got {q}")
    return _Param(name, distribution, low=low, high=high, q=q)


def _model(value: Any, base: StudySpec, where: str, what: str) -> tuple[str, dict[str, Any]]:
    """A model's spec name and entry, from its short name or Hugging Face id (any case).

    The shipped table's and the base spec's models are known by both; another Hugging Face
    id (``org/name``) is declared with ``id:`` (its facts come from its ``config.json``).
    """
    text = str(value).strip()
    known = {info.name: info.hf_id for info in MODELS.values()}
    known.update({name: entry.id or "" for name, entry in base.models.items()})
    entries = base.model_dump(mode="json", exclude_unset=True)["models"]
    for name, hf_id in known.items():
        if text.lower() in (name.lower(), hf_id.lower()):
            return name, dict(entries.get(name, {}))
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        name = re.sub(r"[^a-z0-9._-]+", "-", text.rsplit("/", 1)[-1].lower()).strip("-._")
        return name or "model", {"id": text}
    raise _error(
        where,
        what,
        f"unknown model {text!r}: give a Hugging Face id (org/name) or one of {', '.join(known)}",
    )


def _choices(p: _Param, where: str) -> list[int]:
    """A categorical setting (batch size, length) as a sorted list of distinct integers."""
    what = f"parameters.{p.name}"
    if p.kind in ("value", "values"):
        raw = [_number(v, where, what) for v in p.values]
    elif p.kind in ("int_uniform", "q_uniform"):
        step = p.q if p.kind == "q_uniform" and p.q else 1
        count = int((p.high - p.low) // step) + 1
        if count > _MAX_CHOICES:
            raise _error(
                where,
                what,
                f"{p.kind} from {p.low} to {p.high} gives {count} choices; "
                "list the sizes to try with values",
            )
        raw = [p.low + i * step for i in range(count)]
    else:
        raise _error(
            where,
            what,
            f"distribution {p.kind!r} is continuous, but {PARAMETERS[p.name]} is a list of "
            "sizes: give values",
        )
    if any(not float(v).is_integer() or v <= 0 for v in raw):
        raise _error(
            where, what, f"expected positive whole numbers, but got {list(p.values) or raw}"
        )
    return sorted({int(v) for v in raw})


def _float_range(p: _Param, where: str, notes: list[str]) -> dict[str, Any]:
    """A continuous setting as the spec's ``{low, high[, log]}``."""
    what = f"parameters.{p.name}"
    target = PARAMETERS[p.name]
    if p.kind == "value" or (p.kind == "values" and len(set(p.values)) == 1):
        raise _error(
            where,
            what,
            f"a fixed {target} ({p.values[0]!r}) cannot be mapped: the spec searches {target} "
            "over a range; give min and max, or drop it to use the shipped range",
        )
    if p.kind == "values":
        values = sorted(float(_number(v, where, what)) for v in p.values)
        low, high = values[0], values[-1]
        log = low > 0 and high / low >= 10
        notes.append(
            f"{p.name}: the sweep's values {values} became the range {low:g} to {high:g}"
            + (" on a log scale" if log else "")
        )
        return {"low": low, "high": high, **({"log": True} if log else {})}
    if p.kind == "int_uniform":
        raise _error(
            where,
            what,
            f"int_uniform draws whole numbers, but {target} is continuous: use uniform",
        )
    if p.kind == "q_uniform":
        notes.append(f"{p.name}: q_uniform became uniform (the spec does not round to q={p.q:g})")
    log = p.kind == "log_uniform_values"
    return {"low": float(p.low), "high": float(p.high), **({"log": True} if log else {})}


def _epochs(p: _Param, where: str, notes: list[str]) -> int:
    what = f"parameters.{p.name}"
    if p.kind in ("value", "values", "int_uniform", "q_uniform"):
        choices = _choices(p, where)
        if len(choices) > 1:
            notes.append(
                f"{p.name}: the sweep tried {choices} epochs; the spec trains {choices[-1]} and "
                "its pruner stops the trials that fall behind after each epoch"
            )
        return choices[-1]
    raise _error(
        where, what, f"distribution {p.kind!r} is continuous, but epochs is a whole number"
    )


def _metric(sweep: Mapping[str, Any], where: str, notes: list[str]) -> tuple[str, str]:
    metric = sweep.get("metric")
    if metric is None:
        notes.append("metric: none given; the study maximizes ndcg@10")
        return "ndcg@10", "maximize"
    if not isinstance(metric, Mapping) or "name" not in metric:
        raise _error(where, "metric", f"expected a mapping with name and goal, but got {metric!r}")
    name = str(metric["name"])
    key = name.lower().rsplit("/", 1)[-1]
    key = re.sub(r"^(?:eval|val|valid|validation|test|dev)[_.-]", "", key)
    key = re.sub(r"[_.-]?(?:at[_.-]?|@)?(\d+)$", r"@\1", key)
    if key not in METRICS:
        raise _error(
            where, "metric.name", f"{name!r} cannot be mapped (known: {', '.join(METRICS)})"
        )
    goal = metric.get("goal", "maximize")
    if goal not in ("maximize", "minimize"):
        raise _error(where, "metric.goal", f"expected maximize or minimize, but got {goal!r}")
    if key != name:
        notes.append(f"metric: {name} is the spec's {key}")
    return key, str(goal)


def _study_name(sweep: Mapping[str, Any], where: str) -> str:
    raw = str(sweep.get("name") or Path(where).stem or "wandb-sweep")
    name = re.sub(r"[^A-Za-z0-9_.:-]+", "-", raw).strip("-_.:") or "wandb-sweep"
    return name if name[0].isalnum() else f"s{name}"


def _conditions(
    models: list[str],
    space: dict[str, Any],
    base: StudySpec,
    where: str,
    notes: list[str],
    length_name: str = "max_len",
) -> dict[str, dict[str, list[int]]]:
    """The shipped per-model conditions for these models, within the sweep's choices, and
    every model's lengths limited to its position embeddings."""
    conditions: dict[str, dict[str, list[int]]] = {}
    for model in models:
        shipped = base.space.conditions.get(model)
        cond: dict[str, list[int]] = {}
        for setting in _CATEGORICAL:
            allowed = list(space[setting])
            info = MODELS.get(model)
            if setting == "max_len" and info is not None:
                allowed = [n for n in allowed if n <= info.max_tokens]
                if not allowed:
                    raise _error(
                        where,
                        f"parameters.{length_name}",
                        f"no length fits {model} (at most {info.max_tokens} tokens)",
                    )
            safe = getattr(shipped, setting, None) if shipped is not None else None
            if safe:
                inside = [n for n in allowed if n in safe]
                if inside:
                    allowed = inside
                else:
                    notes.append(
                        f"{model}: none of the sweep's {setting} choices is in its shipped set "
                        f"{safe}; the memory preflight skips those that do not fit"
                    )
            if allowed != list(space[setting]):
                cond[setting] = allowed
        if cond:
            conditions[model] = cond
            said = ", ".join(f"{k} {v}" for k, v in cond.items())
            notes.append(f"added the condition {model}: {said} (the sweep cannot express it)")
    return conditions


def convert_sweep(
    sweep: Mapping[str, Any], *, where: str, base: StudySpec | None = None
) -> Conversion:
    """The study spec (as plain data) that the W&B sweep ``sweep`` becomes.

    Args:
        sweep: The sweep configuration, as read from its YAML.
        where: The sweep's file, for messages.
        base: The spec that fills in what the sweep leaves out (default: the shipped
            ko-retrieval spec).

    Returns:
        The spec, not yet validated (:func:`convert_file` validates it), and the notes.

    Raises:
        SweepError: A key, parameter, distribution, model or metric that cannot be mapped.
    """
    base = base if base is not None else load_spec(shipped_spec_path(_BASE))
    notes: list[str] = []
    unknown = [k for k in sweep if k not in SWEEP_KEYS]
    if unknown:
        raise _error(
            where,
            unknown[0],
            f"not a W&B sweep key this converter maps (known: {', '.join(SWEEP_KEYS)})",
        )
    method = sweep.get("method", "random")
    if method not in METHODS:
        raise _error(where, "method", f"{method!r} cannot be mapped (known: {', '.join(METHODS)})")
    parameters = sweep.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise _error(where, "parameters", f"expected a mapping, but got {parameters!r}")

    read: dict[str, _Param] = {}
    for name, body in parameters.items():
        target = PARAMETERS.get(str(name))
        if target is None:
            raise _error(
                where, f"parameters.{name}", f"unknown parameter; known: {', '.join(PARAMETERS)}"
            )
        if target in read:
            raise _error(
                where, f"parameters.{name}", f"names {target} again (as {read[target].name})"
            )
        read[target] = _read_param(str(name), body, where, notes)

    if method == "grid":
        ranged = [p for p in read.values() if p.kind in _CONTINUOUS_KINDS]
        if ranged:
            raise _error(
                where,
                f"parameters.{ranged[0].name}",
                f"method grid needs listed values, but this is a {ranged[0].kind} range (W&B's "
                "grid refuses it too): list the values to try, or use method bayes or random",
            )
    base_dump = base.model_dump(mode="json", exclude_unset=True)
    space: dict[str, Any] = {}
    from_base: list[str] = []
    for setting in (*_CATEGORICAL, *_CONTINUOUS):
        p = read.get(setting)
        if p is None:
            space[setting] = base_dump["space"][setting]
            from_base.append(setting)
        elif setting in _CATEGORICAL:
            space[setting] = _choices(p, where)
        else:
            space[setting] = _float_range(p, where, notes)

    models: dict[str, dict[str, Any]] = {}
    if "model" in read:
        p = read["model"]
        if p.kind not in ("value", "values"):
            raise _error(
                where, f"parameters.{p.name}", "a model is chosen from values, not a range"
            )
        for value in p.values:
            name, entry = _model(value, base, where, f"parameters.{p.name}")
            if name not in models and "id" in entry and len(entry) == 1:
                notes.append(f"{name}: declared by its Hugging Face id {entry['id']}")
            models.setdefault(name, entry)
    else:
        models = dict(base.model_dump(mode="json", exclude_unset=True)["models"])
        from_base.append("model")
    if from_base:
        notes.append(f"not in the sweep, from the shipped {_BASE} spec: {', '.join(from_base)}")
    length_name = read["max_len"].name if "max_len" in read else "max_len"
    space["conditions"] = _conditions(list(models), space, base, where, notes, length_name)
    if not space["conditions"]:
        del space["conditions"]

    training = dict(base_dump.get("training", {}))
    if "epochs" in read:
        training["epochs"] = _epochs(read["epochs"], where, notes)

    metric, direction = _metric(sweep, where, notes)
    sampler = dict(base_dump.get("sampler", {}), type=METHODS[method])
    if method == "grid":
        notes.append("method grid: TPE over the same values (a spec has no grid sampler)")
    else:
        notes.append(f"method {method}: the {METHODS[method]} sampler, within the conditions")
    study: dict[str, Any] = {
        "name": _study_name(sweep, where),
        "direction": direction,
        "metric": metric,
        "n_trials": base.study.n_trials,
    }
    if "run_cap" in sweep:
        study["n_trials"] = int(_number(sweep["run_cap"], where, "run_cap"))
        notes.append(f"run_cap {study['n_trials']}: the budget of finished trials")
    elif method == "grid":
        # Every combination of the sweep's listed values (a grid needs values for all).
        study["n_trials"] = math.prod(_grid_size(p) for p in read.values())
        notes.append(f"the budget is the grid's size, {study['n_trials']} trials")
    if "early_terminate" in sweep:
        kind = (sweep["early_terminate"] or {}).get("type", "?")
        notes.append(f"early_terminate ({kind}): the spec's {base.pruner.type} pruner instead")

    spec: dict[str, Any] = {
        "study": study,
        "models": models,
        "space": space,
        "training": training,
        "data": base_dump["data"],
        "sampler": sampler,
        "pruner": base_dump.get("pruner", {}),
    }
    if sweep.get("project"):
        spec["tracking"] = {"wandb": False, "project": str(sweep["project"])}
        notes.append(f"W&B project {sweep['project']}: pass --wandb to log each trial there")
    return Conversion(spec=spec, notes=notes, source=str(where))


def _grid_size(p: _Param) -> int:
    """How many values W&B's grid tries for ``p``: its distinct values, or its whole numbers."""
    if p.kind in ("int_uniform", "q_uniform"):
        step = p.q if p.kind == "q_uniform" and p.q else 1
        return int((p.high - p.low) // step) + 1
    return len(set(map(str, p.values))) or 1


class _SweepLoader(yaml.SafeLoader):
    """A SafeLoader without aliases: a sweep needs none, and a few nested ones expand to
    billions of values (the file's size bounds nothing then)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"an alias (*{event.anchor}): a sweep is read without aliases",
                event.start_mark,
            )  # fmt: skip
        return super().compose_node(parent, index)


def read_sweep(path: Path) -> dict[str, Any]:
    """The sweep configuration in ``path`` (YAML or JSON), at most :data:`MAX_SWEEP_BYTES`."""
    try:
        size = path.stat().st_size
        if size > MAX_SWEEP_BYTES:
            raise SweepError(
                f"{path}: {size} bytes; a W&B sweep configuration is a few KiB (at most "
                f"{MAX_SWEEP_BYTES} bytes read): is it the sweep file?"
            )
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_SweepLoader)  # noqa: S506
    except OSError as exc:
        raise SweepError(f"{path}: cannot read the sweep: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise SweepError(
            f"{path}:{line}: invalid YAML: {getattr(exc, 'problem', None) or exc}"
        ) from None
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep must be a YAML mapping, but got {type(raw).__name__}")
    return raw


def convert_file(
    sweep_path: Path, output: Path | None = None, *, force: bool = False
) -> Conversion:
    """Convert ``sweep_path``, check the spec loads, and write it to ``output`` (if given).

    Raises:
        SweepError: The sweep cannot be mapped.
        SpecError: The converted spec does not validate (named as the converted sweep), or
            ``output`` exists (without ``force``) or cannot be written there.
    """
    sweep_path = Path(sweep_path)
    result = convert_sweep(read_sweep(sweep_path), where=str(sweep_path))
    text = result.to_yaml()
    if output is not None:
        output = Path(output)
        if output.is_dir():
            raise SpecError(f"{output}: is a directory; name the spec file to write")
        if output.exists() and not force:
            raise SpecError(f"{output}: already exists; pass --force to overwrite it")
        if not output.parent.is_dir():
            raise SpecError(f"{output}: directory {output.parent} does not exist")
        partial = output.with_name(f".{output.name}.{os.getpid()}.tmp")
        _checked_write(partial, text, sweep_path)
        os.replace(partial, output)
        return result
    with tempfile.TemporaryDirectory() as tmp:
        _checked_write(Path(tmp) / "spec.yaml", text, sweep_path)
    return result


def _checked_write(path: Path, text: str, sweep_path: Path) -> None:
    """Write ``text`` to ``path`` and load it as a spec; remove it and say so if it fails."""
    path.write_text(text, encoding="utf-8")
    try:
        load_spec(path)
    except SpecError as exc:
        path.unlink()
        raise SweepError(str(exc).replace(str(path), f"{sweep_path} (converted)", 1)) from None
