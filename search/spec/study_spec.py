"""The study spec: a YAML file declaring the study, models, conditional space, training and data.

The spec's model (``StudySpec`` and its sections) and where the shipped specs are; reading a
file into it is ``search.spec.load``.

Example:
    >>> from search.spec.load import load_spec
    >>> spec = load_spec(shipped_spec_path("ko-retrieval"))
    >>> spec.study.name, sorted(spec.space.choices_for("bge-m3-ko")["batch_size"])
    ('ko-retrieval', [32, 64])
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated
from typing import Any
from typing import Literal

from pydantic import BaseModel
from pydantic import BeforeValidator
from pydantic import ConfigDict
from pydantic import Field
from pydantic import field_validator
from pydantic import model_validator

from search.record.models import MODELS

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # search/
STUDIES_DIR = PACKAGE_DIR / "studies"
PACKAGE_PREFIX = "package:"  # a path inside the installed package: package:studies/data/ko-demo
METRICS = ("ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10")


class SpecError(ValueError):
    """A bad study spec; the message is one line naming the file, the field and the value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _gradient_cache(value: object) -> object:
    """``off`` (YAML reads a bare off as false), ``auto`` or a mini-batch of at least 1 row."""
    if value is False or value == "off":
        return "off"
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"expected off, auto or a mini-batch size >= 1, but got {value!r}")


# ``training.gradient_cache`` / ``models.<name>.gradient_cache`` (search.train.losses).
GradientCache = Annotated[Literal["off", "auto"] | int, BeforeValidator(_gradient_cache)]


class StudySection(_Strict):
    """Name, direction and objective metric of the Optuna study."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
    direction: Literal["maximize", "minimize"] = "maximize"
    metric: Literal["ndcg@10", "mrr@10", "recall@1", "recall@5", "recall@10"] = "ndcg@10"
    n_trials: int = Field(default=32, ge=1)  # budget of a new study when --n-trials is not given
    # Preflight skips (predicted / frontier OOM) do not spend the budget; past this many per
    # budgeted trial the run stops: the space does not fit the device (search.worker.budget).
    max_skips_per_trial: int = Field(default=10, ge=1)


MODEL_NAME_PATTERN = r"^[A-Za-z0-9._-]+$"


class ModelEntry(_Strict):
    """One encoder of the study (``models.<name>``): where its weights are and how it embeds.

    ``id`` (a Hugging Face id) or ``path`` (a local directory), at most one; an entry named
    like a model of the shipped table (``search.record.models``) may give neither (its id is used).
    ``pooling`` / ``normalize`` / prefixes default to the table's, else to the model's own
    sentence-transformers files, else mean pooling without normalisation. ``amp``,
    ``gradient_checkpointing`` and ``gradient_cache`` override ``training``. The architecture
    facts (``num_layers`` ... ``architecture``) come from the model's ``config.json``
    (``search.spec.model_facts``); set one here only to override what was read.
    """

    id: str | None = Field(default=None, min_length=1)
    path: str | None = Field(default=None, min_length=1)
    pooling: Literal["cls", "mean", "last-token"] | None = None
    normalize: bool | None = None
    query_prefix: str | None = None
    passage_prefix: str | None = None
    amp: bool | None = None
    gradient_checkpointing: bool | None = None
    gradient_cache: GradientCache | None = None
    num_layers: int | None = Field(default=None, ge=1)
    hidden: int | None = Field(default=None, ge=1)
    heads: int | None = Field(default=None, ge=1)
    ffn: int | None = Field(default=None, ge=1)
    vocab: int | None = Field(default=None, ge=1)
    max_positions: int | None = Field(default=None, ge=1)
    attn_implementation: Literal["eager", "sdpa"] | None = None
    architecture: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> ModelEntry:
        if self.id is not None and self.path is not None:
            raise ValueError(
                f"give id or path, not both, but got id={self.id!r}, path={self.path!r}"
            )
        return self


class FloatRange(_Strict):
    """A continuous parameter: ``low`` to ``high``, optionally on a log scale."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> FloatRange:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"must be finite, but got low={self.low}, high={self.high}")
        if not self.low < self.high:
            raise ValueError(f"low must be below high, but got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, but got low={self.low}")
        return self


class Condition(_Strict):
    """Per-model restriction of the categorical choices."""

    batch_size: list[int] | None = None
    max_len: list[int] | None = None


class SpaceSection(_Strict):
    """The search space: categorical batch size and length, four continuous parameters."""

    batch_size: list[int] = Field(min_length=1)
    max_len: list[int] = Field(min_length=1)
    lr: FloatRange
    temperature: FloatRange
    warmup_ratio: FloatRange
    weight_decay: FloatRange
    conditions: dict[str, Condition] = Field(default_factory=dict)

    @field_validator("conditions", mode="before")
    @classmethod
    def _not_device(cls, v: object) -> object:
        if v == "device":  # a stage's opt-in (stages.N.conditions), not the space's default
            raise ValueError(
                "device is for a stage's conditions (stages.N.conditions: device); "
                "space.conditions maps models to their batch_size / max_len"
            )
        return v

    @field_validator("lr", "temperature")
    @classmethod
    def _positive_range(cls, v: FloatRange) -> FloatRange:
        # AdamW needs lr > 0 to learn; InfoNCE divides the scores by the temperature.
        if v.low <= 0:
            raise ValueError(f"must stay above 0, but got low={v.low}")
        return v

    @field_validator("warmup_ratio")
    @classmethod
    def _share_range(cls, v: FloatRange) -> FloatRange:
        # The share of the optimiser steps spent warming up (search/train/loop.py).
        if v.low < 0 or v.high > 1:
            raise ValueError(f"must lie within [0, 1], but got low={v.low}, high={v.high}")
        return v

    @field_validator("weight_decay")
    @classmethod
    def _non_negative_range(cls, v: FloatRange) -> FloatRange:
        # AdamW rejects a negative weight decay.
        if v.low < 0:
            raise ValueError(f"must be >= 0, but got low={v.low}")
        return v

    @field_validator("batch_size", "max_len")
    @classmethod
    def _positive_unique(cls, v: list[int]) -> list[int]:
        if any(x <= 0 for x in v) or len(set(v)) != len(v):
            raise ValueError(f"choices must be distinct positive integers, but got {v}")
        return v

    @model_validator(mode="after")
    def _conditions_are_subsets(self) -> SpaceSection:
        for model, cond in self.conditions.items():
            for field in ("batch_size", "max_len"):
                sub = getattr(cond, field)
                if sub is None:
                    continue
                outside = [x for x in sub if x not in getattr(self, field)]
                if not sub or outside:
                    raise ValueError(
                        f"conditions.{model}.{field} must be a non-empty subset of "
                        f"space.{field} {getattr(self, field)}, but got {sub}"
                    )
        return self

    def choices_for(self, model: str) -> dict[str, list[int]]:
        """The effective ``batch_size`` and ``max_len`` choices of one model, in spec order."""
        cond = self.conditions.get(model, Condition())
        return {
            "batch_size": cond.batch_size or list(self.batch_size),
            "max_len": cond.max_len or list(self.max_len),
        }


class TrainingSection(_Strict):
    """Training settings shared by every trial (models may override the memory savers)."""

    epochs: int = Field(default=2, ge=1, le=100)
    amp: bool = True
    gradient_checkpointing: bool = False
    # Embed each batch in mini-batches of N rows (or the largest that fits: auto); off: plain.
    gradient_cache: GradientCache = "off"
    hard_negatives: int = Field(default=1, ge=0, le=16)
    seed: int = 42
    max_train_samples: int | None = Field(default=None, ge=1)
    # Prune sooner: every this many training examples seen, score a fixed sample of the eval
    # set and report it to the pruner (the full eval set still scores each epoch). None: off.
    eval_every_steps: int | None = Field(default=None, ge=1)
    eval_sample_queries: int = Field(default=200, ge=1)  # queries in that fixed sample


class DataSection(_Strict):
    """Training JSONL and BEIR evaluation directory (relative paths: to the spec file)."""

    train: str
    eval: str
    split: str = "test"


class SamplerSection(_Strict):
    """Optuna sampler; TPE is multivariate and grouped so conditional branches are learned.

    ``border_probability``: the share of trials whose ``batch_size`` / ``max_len`` are drawn
    (or TPE's proposal rounded) among the model's border pairs on the worker's device (they fit
    only within the memory estimate's band) instead of its sure pairs; 0 (default): border
    pairs are left to deliberate probes (``search.sampling.sampler``). Per trial, deterministic
    under ``seed``.
    """

    type: Literal["tpe", "random"] = "tpe"
    n_startup_trials: int = Field(default=8, ge=0)
    multivariate: bool = True
    group: bool = True
    seed: int | None = None
    border_probability: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)


class PrunerSection(_Strict):
    """Optuna pruner on the reported metric; steps are training examples seen
    (search.sampling.pruners).

    ``median``: ``n_startup_trials``, ``n_warmup_steps``. ``successive_halving``:
    ``min_resource``, ``reduction_factor``, ``min_early_stopping_rate``. ``hyperband``:
    ``min_resource``, ``max_resource``, ``reduction_factor``. ``peer_median``
    (search.sampling.peer_pruner): a trial is pruned at step s only past its warm-up,
    ``warmup_share`` of its own total training (``n_warmup_steps`` when it did not report its
    total), when at least ``n_startup_trials`` completed ``peers`` reported at s (``model``:
    trials of its model; ``stage``: of its stage; ``study``: all), and when it is behind their
    median by more than ``noise_z`` x its report's standard error.
    """

    type: Literal["median", "successive_halving", "hyperband", "peer_median", "none"] = "median"
    n_startup_trials: int = Field(default=4, ge=0)
    n_warmup_steps: int = Field(default=0, ge=0)
    peers: Literal["model", "stage", "study"] = "model"  # peer_median: who a trial is held to
    warmup_share: float = Field(default=0.4, ge=0.0, lt=1.0, allow_inf_nan=False)  # peer_median
    noise_z: float = Field(default=1.0, ge=0.0, allow_inf_nan=False)  # peer_median
    min_resource: int | None = Field(default=None, ge=1)  # examples seen; None: Optuna's "auto"
    max_resource: int | None = Field(default=None, ge=1)  # examples seen; None: "auto"
    reduction_factor: int = Field(default=3, ge=2)
    min_early_stopping_rate: int = Field(default=0, ge=0)


class TrackingSection(_Strict):
    """Experiment tracking: one Weights & Biases run per trial (``search.observe.tracking``)."""

    wandb: bool = False  # --wandb / --no-wandb override it
    project: str | None = Field(default=None, min_length=1)  # default: the study's name
    # W&B team or user the runs go to (--wandb-entity overrides it); default: $WANDB_ENTITY,
    # else the account's default entity
    entity: str | None = Field(default=None, min_length=1)


class ArtifactsSection(_Strict):
    """Trained models kept as Optuna artifacts (``search.observe.keep``): the top K trials'
    encoders."""

    top_k: int = Field(default=3, ge=0)  # 0: keep no model (``search best --export`` retrains)
    store: str | None = Field(default=None, min_length=1)  # a directory, file://DIR, s3://BUCKET
    # or gs://BUCKET; default --artifacts / $SEARCH_ARTIFACTS, else beside the SQLite file

    @field_validator("store")
    @classmethod
    def _known_scheme(cls, v: str | None) -> str | None:
        return check_store(v) if v is not None else None


STORE_SCHEMES = ("file", "s3", "gs")  # what ``search.observe.keep.open_store`` opens


def check_store(value: str) -> str:
    """``value`` as an artifact store: a directory, ``file://DIR``, ``s3://BUCKET`` or
    ``gs://BUCKET``; another ``scheme://`` would be taken for a local directory: refused.

    Example:
        >>> check_store("s3://bucket/models")
        's3://bucket/models'
        >>> check_store("ftp://host/x")
        Traceback (most recent call last):
        ValueError: unknown scheme 'ftp': give a directory, file://DIR, s3://BUCKET or gs://BUCKET
    """
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", value)
    if match is None:
        return value
    scheme, rest = match.group(1), match.group(2).strip("/")
    if scheme not in STORE_SCHEMES:
        raise ValueError(
            f"unknown scheme {scheme!r}: give a directory, file://DIR, s3://BUCKET or gs://BUCKET"
        )
    if not rest:
        raise ValueError(f"{scheme}:// names no {'directory' if scheme == 'file' else 'bucket'}")
    return value


class StageSection(_Strict):
    """One stage of a staged search (``stages:``), run in order on one study
    (search.sampling.stages).

    ``models``: the models it samples (default: all); ``conditions``: its own restriction of
    ``batch_size`` / ``max_len`` per model (subsets of the space's conditions), or ``device``:
    its models may draw any of the space's ``batch_size`` / ``max_len`` (beyond
    ``space.conditions``) that the worker's device fits (search.spec.stage_check); ``n_trials``:
    its share of the study's budget (the last stage may leave it out: it runs until the study's
    budget is spent); ``seed``: what is enqueued when it starts: ``none``, ``frontier`` (per
    model, its largest config that no real OOM of the study rules out), ``top_k`` (before each
    of its trials, the next config around the study's ``top_k`` best trials so far,
    ``search.sampling.refine``); ``seeds``: a ``frontier`` stage's learning-rate rungs per model
    (at most its share); ``give_back``: the stage ends once it has ``seeds`` finished trials per
    model and its best is not better than the earlier stages' best, its unspent share going to
    the next stage (unset: on for ``frontier`` stages, off for the others).
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    models: list[str] | None = Field(default=None, min_length=1)
    conditions: dict[str, Condition] | Literal["device"] = Field(default_factory=dict)
    n_trials: int | None = Field(default=None, ge=1)
    seed: Literal["none", "frontier", "top_k"] = "none"
    top_k: int = Field(default=3, ge=1)
    seeds: int = Field(default=3, ge=1)
    give_back: bool | None = None

    @field_validator("conditions", mode="before")
    @classmethod
    def _device_or_mapping(cls, v: object) -> object:
        if isinstance(v, str) and v != "device":
            raise ValueError(
                "expected device (widen to what each worker's device fits) or a mapping of "
                "models to their batch_size / max_len"
            )
        return v


class StudySpec(_Strict):
    """A whole study spec. ``source`` is the file it came from (for messages and paths)."""

    study: StudySection
    models: dict[str, ModelEntry] = Field(min_length=1)
    space: SpaceSection
    training: TrainingSection = TrainingSection()
    data: DataSection
    sampler: SamplerSection = SamplerSection()
    pruner: PrunerSection = PrunerSection()
    tracking: TrackingSection = TrackingSection()
    artifacts: ArtifactsSection = ArtifactsSection()
    stages: list[StageSection] = Field(default_factory=list)  # none: one implicit stage
    source: str = ""

    @field_validator("models")
    @classmethod
    def _known_models(cls, v: dict[str, ModelEntry]) -> dict[str, ModelEntry]:
        for name, entry in v.items():
            if not re.fullmatch(MODEL_NAME_PATTERN, name):
                raise ValueError(f"model name {name!r} may only hold A-Z a-z 0-9 . _ -")
            if entry.id is None and entry.path is None and name not in MODELS:
                raise ValueError(
                    f"model {name!r} needs `id: HF_ID` or `path: DIR` (only the shipped "
                    f"models {', '.join(MODELS)} may give neither)"
                )
        return v

    @model_validator(mode="after")
    def _conditions_name_models(self) -> StudySpec:
        for model in self.space.conditions:
            if model not in self.models:
                raise ValueError(f"space.conditions.{model}: {model!r} is not one of models")
        return self

    def resolve_path(self, value: str) -> Path:
        """A data or model path: relative to the spec file's directory, or ``package:REL``.

        ``package:studies/data/ko-demo`` is a path inside the installed ``search`` package
        (the shipped demo data), so a copied spec still finds it.
        """
        if value.startswith(PACKAGE_PREFIX):
            return PACKAGE_DIR / value.removeprefix(PACKAGE_PREFIX)
        path = Path(value).expanduser()
        if path.is_absolute() or not self.source:
            return path
        return Path(self.source).parent / path

    def public_dict(self) -> dict[str, Any]:
        """The spec as plain data, for the study's user attributes (holds no secrets)."""
        return self.model_dump(mode="json")


def shipped_spec_path(name: str) -> Path:
    """The shipped spec called ``name`` (``search/studies/<name>.yaml``)."""
    return STUDIES_DIR / f"{name}.yaml"


def shipped_specs() -> list[str]:
    """Names of the specs shipped with the package."""
    return sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))
