"""Architecture facts of an encoder (``ModelInfo``) and the shipped table of the four ko-retrieval
models, the fallback when a model's own ``config.json`` is not reachable
(``search.spec.model_facts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from typing import Literal

Architecture = str  # the config's ``model_type``: "bert", "roberta", "xlm-roberta", ...
Pooling = Literal["cls", "mean", "last-token"]
POOLINGS: tuple[str, ...] = ("cls", "mean", "last-token")
# Model types whose positions start after the padding id (RoBERTa's quirk).
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert")
# Model types whose transformers model class runs SDPA (``_supports_sdpa``), the families this
# service trains: answered without importing the class (and torch), 2 s of CPU in a worker that
# has no other use for them. tests/test_model_facts.py checks it against transformers.
SDPA_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta"})


@dataclass(frozen=True)
class ModelInfo:
    """Architecture facts of one encoder (see DESIGN.md, "The models").

    Args:
        name: Short name used in study specs and reports.
        hf_id: Hugging Face id of the real weights.
        architecture: The config's ``model_type`` (``bert``, ``roberta``, ``xlm-roberta``...).
        tokenizer: ``wordpiece`` (BertTokenizer) or ``sentencepiece`` (XLM-R's unigram).
        num_layers: Transformer layers.
        hidden: Hidden size.
        heads: Attention heads.
        ffn: Feed-forward (intermediate) size.
        vocab: Vocabulary size.
        max_positions: ``max_position_embeddings`` of the config.
        pooling: ``cls``, ``mean`` or ``last-token`` pooling of the last hidden state.
        normalize: Whether embeddings are L2-normalised.
        query_prefix: Text put before every query (e5 needs ``"query: "``).
        passage_prefix: Text put before every passage (e5 needs ``"passage: "``).
        attn_implementation: The attention the encoder runs: ``sdpa`` or ``eager``.
        source: Where the facts came from: ``config.json:<path>`` (a local directory),
            ``hf-cache`` (the config in the local Hugging Face cache) or ``table`` (this file).
    """

    name: str
    hf_id: str
    architecture: Architecture
    tokenizer: Literal["wordpiece", "sentencepiece"]
    num_layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    pooling: Pooling
    normalize: bool
    query_prefix: str = ""
    passage_prefix: str = ""
    attn_implementation: str = "sdpa"
    source: str = "table"

    @property
    def max_tokens(self) -> int:
        """Longest input in tokens (RoBERTa-family positions start after the padding id)."""
        if self.architecture in OFFSET_POSITIONS:
            return self.max_positions - 2
        return self.max_positions

    @property
    def n_params(self) -> int:
        """Parameter count by the BERT-family formula (embeddings, layers, pooler)."""
        h, f = self.hidden, self.ffn
        type_vocab = 2 if self.architecture == "bert" else 1
        embeddings = (self.vocab + self.max_positions + type_vocab) * h + 2 * h  # + LayerNorm
        layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 2 * 2 * h
        pooler = h * h + h
        return embeddings + self.num_layers * layer + pooler


KNOWN_MODELS: dict[str, ModelInfo] = {
    m.name: m
    for m in (
        ModelInfo(
            name="ko-simcse",
            hf_id="BM-K/KoSimCSE-roberta",
            architecture="roberta",
            tokenizer="wordpiece",
            num_layers=12,
            hidden=768,
            heads=12,
            ffn=3072,
            vocab=32000,
            max_positions=514,
            pooling="cls",
            normalize=False,
        ),
        ModelInfo(
            name="bge-m3-ko",
            hf_id="dragonkue/BGE-m3-ko",
            architecture="xlm-roberta",
            tokenizer="sentencepiece",
            num_layers=24,
            hidden=1024,
            heads=16,
            ffn=4096,
            vocab=250002,
            max_positions=8194,
            pooling="cls",
            normalize=True,
        ),
        ModelInfo(
            name="multilingual-minilm",
            hf_id="sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2",
            architecture="bert",
            tokenizer="sentencepiece",
            num_layers=12,
            hidden=384,
            heads=12,
            ffn=1536,
            vocab=250037,
            max_positions=512,
            pooling="mean",
            normalize=False,
        ),
        ModelInfo(
            name="multilingual-e5-small",
            hf_id="intfloat/multilingual-e5-small",
            architecture="bert",
            tokenizer="sentencepiece",
            num_layers=12,
            hidden=384,
            heads=12,
            ffn=1536,
            vocab=250037,
            max_positions=512,
            pooling="mean",
            normalize=True,
            query_prefix="query: ",
            passage_prefix="passage: ",
        ),
    )
}

MODELS = KNOWN_MODELS  # the old name, kept for scripts and benches
BY_HF_ID: dict[str, ModelInfo] = {m.hf_id: m for m in KNOWN_MODELS.values()}
"""The shipped table keyed by Hugging Face id (a spec entry naming one of these ids)."""


def attention_of(config: Any) -> str:
    """The attention the encoder runs for ``config``: ``sdpa`` where the architecture has it.

    ``BiEncoder.from_config`` asks for SDPA when the model class supports it; otherwise
    transformers 5 falls back to ``eager`` (its default for a class without SDPA). The families of
    ``SDPA_MODEL_TYPES`` are answered at once; any other imports its model class (and torch).
    """
    if getattr(config, "model_type", None) in SDPA_MODEL_TYPES:
        return "sdpa"
    from transformers import MODEL_MAPPING  # lazy: transformers (and torch) is heavy

    try:
        model_class = MODEL_MAPPING.get(type(config), None)
    except (ImportError, KeyError, ValueError):
        model_class = None
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"
