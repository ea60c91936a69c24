"""The effective configuration of one trial: what the objective trains and the estimate reads."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_OBJECTIVE = "search.train.loop:train"
"""The training objective a trial runs (``module:function``; ``--objective`` overrides it)."""
GRADIENT_CACHE_AUTO = -1
"""``TrialConfig.gradient_cache`` of ``auto``: resolved by the preflight before the trial runs."""
GRADIENT_CACHE_FALLBACK = 32
"""Mini-batch rows of an ``auto`` gradient cache that no preflight resolved."""


@dataclass(frozen=True)
class SaveBar:
    """What a trial's final value must reach for its saved model to have a chance of being kept.

    The worker sets it (``TrialConfig.save_bar``) to the K-th best kept model's value when it
    has K of them: a trial that ends worse cannot enter the top K, so it writes no model.

    Args:
        metric: The study's metric (a key of the run's final metrics).
        value: The K-th best kept value when the trial started (later ones only rise).
        maximize: The study's direction.
    """

    metric: str
    value: float
    maximize: bool = True

    def passes(self, metrics: Mapping[str, float]) -> bool:
        """Whether ``metrics`` could still enter the top K (a tie could: worth the save)."""
        got = metrics.get(self.metric)
        if got is None or not math.isfinite(got):
            return False  # told FAIL or without the metric: never kept
        return got >= self.value if self.maximize else got <= self.value


@dataclass(frozen=True)
class TrialConfig:
    """Everything one training run needs, resolved from the study spec and the sampled params.

    It is recorded on each trial as the user attribute ``config`` (``to_json``).

    Args:
        model: Short model name (a key of ``search.record.models.MODELS``).
        model_path: What ``from_pretrained`` loads: a Hugging Face id, a local directory, or
            the directory of a tiny replica.
        batch_size: Queries per training batch (each with one positive, plus hard negatives).
        max_len: Longest tokenised input; longer texts are truncated.
        lr: Peak learning rate of AdamW.
        temperature: Softmax temperature of the InfoNCE loss (scores are divided by it).
        warmup_ratio: Share of the optimiser steps spent warming the learning rate up linearly.
        weight_decay: AdamW weight decay.
        epochs: Passes over the training data; evaluation runs after each.
        amp: Mixed precision with ``torch.autocast`` (bf16 where supported, else fp16 on CUDA).
        gradient_checkpointing: Recompute activations in the backward pass.
        hard_negatives: Hard negatives per query taken from the data (0: in-batch only).
        seed: Seed of this trial's training (data order, initialisation of replicas).
        device: ``cuda``, ``cuda:N``, ``cpu`` or ``auto``.
        train_path: Training JSONL (``query``, ``positive``, optional ``negatives``).
        eval_dir: BEIR directory (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``).
        eval_split: Which qrels split to evaluate on.
        pooling: ``cls`` or ``mean``.
        normalize: L2-normalise the embeddings.
        query_prefix: Prepended to each query.
        passage_prefix: Prepended to each passage.
        max_train_samples: Cap on training examples (None: all).
        fail_fast: Run the worst-case shape (full batch at ``max_len``) as the first step.
        gradient_cache: Mini-batch size of the gradient cache (``CachedInfoNCELoss``): the
            batch is embedded this many rows at a time; 0 off, ``GRADIENT_CACHE_AUTO`` (-1)
            until the preflight picks the largest mini-batch the memory estimate fits.
        eval_every_steps: Every this many training examples seen, score the eval sample and
            report it to the pruner (``training.eval_every_steps``); None: per epoch only.
        eval_sample_queries: Queries in that fixed eval sample (the same for every trial).
        attn_implementation: The attention the encoder runs (``sdpa`` or ``eager``: the
            spec's ``models.<name>.attn_implementation``); None: SDPA where the architecture
            has it, else eager.
        save_dir: Save the trained encoder there as a sentence-transformers model (with
            ``search.json``) after the last evaluation (``search.train.export``); None: not saved.
            Set by the worker for one run only, never recorded in the trial's config.
        save_bar: Save only when the final metrics pass it (:class:`SaveBar`); None: always.
            Set with ``save_dir``, for one run only.
        padding_free: Run the encoder's token-wise layers on real tokens only
            (``search.train.unpadded``) where the architecture is BERT, RoBERTa or XLM-R and
            the attention is SDPA (the default); False: transformers' forward on padded batches.
    """

    model: str
    model_path: str
    batch_size: int
    max_len: int
    lr: float
    temperature: float
    warmup_ratio: float
    weight_decay: float
    epochs: int
    amp: bool
    gradient_checkpointing: bool
    hard_negatives: int
    seed: int
    device: str
    train_path: str
    eval_dir: str
    eval_split: str = "test"
    pooling: str = "cls"
    normalize: bool = False
    query_prefix: str = ""
    passage_prefix: str = ""
    max_train_samples: int | None = None
    fail_fast: bool = True
    gradient_cache: int = 0
    eval_every_steps: int | None = None
    eval_sample_queries: int = 200
    attn_implementation: str | None = None
    save_dir: str | None = None
    padding_free: bool = True
    save_bar: SaveBar | None = None

    @property
    def gradient_cache_rows(self) -> int:
        """Rows per mini-batch of the gradient cache, 0 when off (auto unresolved: 32)."""
        if self.gradient_cache == GRADIENT_CACHE_AUTO:
            return GRADIENT_CACHE_FALLBACK
        return max(self.gradient_cache, 0)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrialConfig:
        """Rebuild a config from ``to_json`` output, ignoring unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in data.items() if k in names}
        if isinstance(fields.get("save_bar"), dict):
            fields["save_bar"] = SaveBar(**fields["save_bar"])
        return cls(**fields)
