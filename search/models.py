"""The four retrieval models of the ko-retrieval study and the facts the service builds on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Architecture = Literal["roberta", "xlm-roberta", "bert"]
Pooling = Literal["cls", "mean"]


@dataclass(frozen=True)
class ModelInfo:
    """Architecture facts of one encoder (see DESIGN.md, "The models").

    Args:
        name: Short name used in study specs and reports.
        hf_id: Hugging Face id of the real weights.
        architecture: Transformers model family of the replica and the real model.
        tokenizer: ``wordpiece`` (BertTokenizer) or ``sentencepiece`` (XLM-R's unigram).
        num_layers: Transformer layers.
        hidden: Hidden size.
        heads: Attention heads.
        ffn: Feed-forward (intermediate) size.
        vocab: Vocabulary size.
        max_positions: ``max_position_embeddings`` of the config.
        pooling: ``cls`` or ``mean`` pooling of the last hidden state.
        normalize: Whether embeddings are L2-normalised.
        query_prefix: Text put before every query (e5 needs ``"query: "``).
        passage_prefix: Text put before every passage (e5 needs ``"passage: "``).
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

    @property
    def max_tokens(self) -> int:
        """Longest input in tokens (RoBERTa-family positions start after the padding id)."""
        if self.architecture in ("roberta", "xlm-roberta"):
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


MODELS: dict[str, ModelInfo] = {
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
