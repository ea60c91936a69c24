"""The bi-encoder: one transformer encoding queries and passages into pooled embeddings.

Example:
    >>> import tempfile
    >>> from search.record.models import MODELS
    >>> from search.train.tiny import build_tiny_replica
    >>> from transformers import AutoModel, AutoTokenizer
    >>> texts = ["한국어 문장입니다.", "검색 모델을 학습합니다."] * 20
    >>> info = MODELS["multilingual-e5-small"]
    >>> with tempfile.TemporaryDirectory() as cache:
    ...     path = build_tiny_replica(info, cache, texts, vocab_size=300)
    ...     model = AutoModel.from_pretrained(path)
    ...     tokenizer = AutoTokenizer.from_pretrained(path)
    >>> encoder = BiEncoder(model, tokenizer, pooling="mean", normalize=True)
    >>> encoder.encode(["검색 모델", "한국어"], kind="query", max_len=32).shape
    torch.Size([2, 64])
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import Tensor
from transformers import AutoConfig
from transformers import AutoModel
from transformers import AutoTokenizer

from search.record.models import KNOWN_MODELS
from search.record.models import OFFSET_POSITIONS
from search.record.models import POOLINGS
from search.record.models import attention_of
from search.train import unpadded

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers import PreTrainedTokenizerBase

    from search.record.config import TrialConfig


class ModelLoadError(RuntimeError):
    """A model or tokenizer that ``from_pretrained`` could not load, with how to fix it.

    The message is one line: which model and path, why, and the three ways out (download the
    weights, point the spec's ``models.<name>.path`` at a local directory, or use ``--tiny``).
    """


class BiEncoder(torch.nn.Module):
    """A shared encoder for queries and passages: last hidden state, pooled, optionally normed.

    Queries and passages go through the same weights; each kind gets its prefix (e5 needs
    ``"query: "`` and ``"passage: "``). The embedding is the first token's hidden state
    (``cls``), the attention-masked mean of all tokens (``mean``) or the last non-padding
    token's hidden state (``last-token``, decoder-style embedders), then optionally
    L2-normalised. Pooling runs in float32, so embeddings are float32 under autocast too.

    Args:
        model: A transformers encoder (``BertModel``, ``RobertaModel``, ``XLMRobertaModel``...).
        tokenizer: Its tokenizer; set here to pad and truncate on the right (CLS stays first).
            One without a padding token pads with its end-of-sequence token.
        pooling: ``cls``, ``mean`` or ``last-token``.
        normalize: L2-normalise the embeddings.
        query_prefix: Put before every query.
        passage_prefix: Put before every passage.
        padding_free: Run the encoder on the real tokens only (``search.train.unpadded``)
            where the architecture allows it (``unpadded.supports``); else, or when False,
            transformers' own forward on the padded batch. The same embeddings either way.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        pooling: str = "cls",
        normalize: bool = False,
        query_prefix: str = "",
        passage_prefix: str = "",
        padding_free: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, but got {pooling=}.")
        if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # decoder tokenizers (Qwen, Llama...)
        if tokenizer.pad_token_id is None:
            raise ValueError(f"The tokenizer needs a padding token, but got {tokenizer=}.")
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "right"
        self.model = model
        self.tokenizer = tokenizer
        self._pooling = pooling
        self._normalize = normalize
        self._prefixes = {"query": query_prefix, "passage": passage_prefix}
        self._padding_free = padding_free and unpadded.supports(model)
        self._full_width = False

    @classmethod
    def from_config(cls, cfg: TrialConfig) -> BiEncoder:
        """Load ``cfg.model_path`` with ``from_pretrained`` and set up the trial's encoder.

        The weights load in float32 (AMP casts per operation), with the attention ``cfg``
        names (``attn_implementation``; by default SDPA where the architecture has it),
        non-reentrant gradient checkpointing when ``cfg`` asks, and the padding-free forward
        (``cfg.padding_free``) where the architecture has it. The
        model comes back in eval mode, as ``from_pretrained`` leaves it, and on the CPU.

        Args:
            cfg: The trial's config (``model``, ``model_path``, ``pooling``, ``normalize``,
                prefixes, ``gradient_checkpointing``, ``padding_free``).

        Returns:
            The encoder.

        Raises:
            ModelLoadError: The path or hub id cannot be loaded (missing, not downloaded while
                offline, incomplete).
        """
        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
            config = AutoConfig.from_pretrained(cfg.model_path)
            # The spec's choice (transformers checks it), else the one the facts report.
            attention = cfg.attn_implementation or attention_of(config)
            # Mismatched shapes come back in the loading info (transformers' own error only
            # points at a report it logs, which the trial's quiet logging hides): said below.
            model, info = AutoModel.from_pretrained(
                cfg.model_path,
                config=config,
                dtype=torch.float32,
                attn_implementation=attention,
                ignore_mismatched_sizes=True,
                output_loading_info=True,
            )
        except (OSError, ValueError, KeyError, ImportError, SafetensorError) as exc:
            raise ModelLoadError(_load_error_message(cfg.model, cfg.model_path, exc)) from exc
        mismatched = sorted(info.get("mismatched_keys") or ())
        if mismatched:
            raise ModelLoadError(_mismatch_message(cfg.model, cfg.model_path, mismatched))
        if cfg.gradient_checkpointing:
            _enable_checkpointing(model)
        return cls(
            model,
            tokenizer,
            pooling=cfg.pooling,
            normalize=cfg.normalize,
            query_prefix=cfg.query_prefix,
            passage_prefix=cfg.passage_prefix,
            padding_free=cfg.padding_free and attention == "sdpa",
        )

    @property
    def padding_free(self) -> bool:
        """Whether the forward runs on real tokens only (``search.train.unpadded``)."""
        return self._padding_free

    @contextmanager
    def worst_case_forward(self) -> Iterator[None]:
        """Inside the block, cost every row at its batch's full width, for the same result.

        The fail-fast step's batch is padded to ``max_len``. Padding-free, that padding would
        not be computed, and the step would not test the memory it is there to: here every
        row counts at full width (``unpadded.pack(..., full_width=True)``), the most memory a
        padding-free step of that shape can take. Padded, transformers' forward computes it.
        """
        was = self._full_width
        self._full_width = True
        try:
            yield
        finally:
            self._full_width = was

    @property
    def pooling(self) -> str:
        """``cls``, ``mean`` or ``last-token``."""
        return self._pooling

    @property
    def normalize(self) -> bool:
        """Whether embeddings are L2-normalised."""
        return self._normalize

    @property
    def query_prefix(self) -> str:
        """Text put before every query."""
        return self._prefixes["query"]

    @property
    def passage_prefix(self) -> str:
        """Text put before every passage."""
        return self._prefixes["passage"]

    @property
    def embedding_dim(self) -> int:
        """Size of one embedding (the encoder's hidden size)."""
        return int(self.model.config.hidden_size)

    @property
    def max_tokens(self) -> int:
        """Longest input the position embeddings allow, special tokens included."""
        config = self.model.config
        positions = int(config.max_position_embeddings)
        if config.model_type in OFFSET_POSITIONS:
            return positions - int(config.pad_token_id) - 1
        return positions

    @property
    def device(self) -> torch.device:
        """Where the encoder's weights are."""
        return next(self.model.parameters()).device

    def tokenize(
        self,
        texts: Sequence[str],
        *,
        kind: Literal["query", "passage"],
        max_len: int,
        pad_to_max_length: bool = False,
    ) -> dict[str, Tensor]:
        """Prefix, truncate and pad texts (on the CPU).

        Args:
            texts: Queries or passages.
            kind: ``query`` or ``passage`` (which prefix).
            max_len: Longest output in tokens, special tokens and prefix included.
            pad_to_max_length: Pad every row to ``max_len`` instead of to the longest text.

        Returns:
            ``input_ids`` and ``attention_mask``, each ``(len(texts), width)``.
        """
        if kind not in self._prefixes:
            raise ValueError(f"kind must be 'query' or 'passage', but got {kind=}.")
        if not 1 <= max_len <= self.max_tokens:
            raise ValueError(f"max_len must be in [1, {self.max_tokens}], but got {max_len=}.")
        prefix = self._prefixes[kind]
        batch = self.tokenizer(
            [prefix + text for text in texts],
            max_length=max_len,
            truncation=True,
            padding="max_length" if pad_to_max_length else "longest",
            return_attention_mask=True,
            return_token_type_ids=False,
            return_tensors="pt",
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Embed a tokenised batch.

        Args:
            input_ids: ``(batch, seq)`` token ids.
            attention_mask: ``(batch, seq)``, 1 for tokens and 0 for padding.

        Returns:
            ``(batch, hidden)`` float32 embeddings.
        """
        return self.embed_batches([(input_ids, attention_mask)])[0]

    def embed_batches(self, batches: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """Embed several tokenised batches (queries, passages...), in one pass where it can.

        Padding-free, the batches' real tokens go through the encoder together (one matmul
        per weight instead of one per batch); otherwise each batch runs transformers' forward.

        Args:
            batches: ``(input_ids, attention_mask)`` pairs, ``(rows, seq)`` each, right-padded.

        Returns:
            One ``(rows, hidden)`` float32 embedding tensor per batch.
        """
        if self._padding_free:
            packed = unpadded.pack(batches, full_width=self._full_width)
            hidden = unpadded.packed_forward(self.model, packed)  # (n_tokens, hidden)
            pooled = unpadded.pool(hidden, packed, self._pooling)
        else:
            pooled = [self._hf_pooled(ids, mask) for ids, mask in batches]
        if self._normalize:
            pooled = [F.normalize(p, p=2.0, dim=-1) for p in pooled]
        return pooled

    def _hf_pooled(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """transformers' forward on the padded batch, pooled in float32: ``(batch, hidden)``."""
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state  # (batch, seq, hidden)
        if self._pooling == "cls":
            return hidden[:, 0].float()  # (batch, hidden)
        if self._pooling == "last-token":
            # The last position whose mask is 1, whichever side the padding is on.
            positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
            last = (attention_mask.long() * positions).argmax(dim=1)  # (batch,)
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
        mask = attention_mask.unsqueeze(-1).float()  # (batch, seq, 1)
        return (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        *,
        kind: Literal["query", "passage"],
        max_len: int,
        batch_size: int = 64,
        tokens: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Embed many texts in eval mode, longest first, and return them in input order.

        Sorting by length keeps padding (wasted compute) low and runs the largest batch first:
        by token count when ``tokens`` gives it, else by character count (a proxy: a text's
        tokens per character vary, with all-MiniLM-L6-v2 on KLUE-NLI sorting by characters
        pads the corpus 26% more). The module's train/eval mode is restored afterwards.

        Args:
            texts: Queries or passages.
            kind: ``query`` or ``passage``.
            max_len: Truncation length in tokens.
            batch_size: Texts per forward pass.
            tokens: ``tokenize(texts, kind=kind, max_len=max_len)``, computed once for many
                calls (None: each batch is tokenised here). Each batch is cut to its longest
                row; the embeddings are the same either way up to float rounding (the batches
                group other texts).

        Returns:
            ``(len(texts), hidden)`` embeddings on the encoder's device.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, but got {batch_size=}.")
        if tokens is not None and len(tokens["input_ids"]) != len(texts):
            raise ValueError(
                f"tokens must have one row per text, but got {len(tokens['input_ids'])} rows "
                f"for {len(texts)} texts."
            )
        device = self.device
        if not texts:
            return torch.empty((0, self.embedding_dim), device=device)
        lengths = tokens["attention_mask"].sum(dim=1) if tokens is not None else None
        if lengths is None:
            order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        else:
            order = torch.sort(lengths, descending=True, stable=True).indices.tolist()
        was_training = self.training
        self.eval()
        try:
            chunks = []
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                if tokens is None or lengths is None:
                    batch = self.tokenize([texts[i] for i in rows], kind=kind, max_len=max_len)
                    ids, mask = batch["input_ids"], batch["attention_mask"]
                else:  # right-padded rows cut to the batch's longest: what tokenize gives
                    index = torch.tensor(rows)
                    width = int(lengths[index].max())
                    ids = tokens["input_ids"][index, :width]
                    mask = tokens["attention_mask"][index, :width]
                chunks.append(self(ids.to(device), mask.to(device)))
        finally:
            self.train(was_training)
        sorted_embeddings = torch.cat(chunks)  # (n, hidden), longest text first
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return sorted_embeddings[inverse.to(device)]


def _enable_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each layer's activations in the backward pass (non-reentrant checkpoints).

    transformers 5.24 renamed ``gradient_checkpointing_enable`` (deprecated, a FutureWarning)
    to ``activation_checkpointing_enable``; older versions only have the former.
    """
    kwargs = {"use_reentrant": False}  # PyTorch's recommended variant; reentrant is legacy
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _mismatch_message(
    name: str, path: str, mismatched: Sequence[tuple[str, Sequence[int], Sequence[int]]]
) -> str:
    """One line: the weights' shapes do not match the model's ``config.json``.

    >>> _mismatch_message("m", "/w", [("embeddings.word_embeddings.weight", (4000, 64),
    ...                                (4000, 128))])  # doctest: +ELLIPSIS
    "Cannot load model 'm' from '/w': its weights do not match its config.json: 1 tensor ...
    """
    # The largest tensor as the example: the embeddings, which show the hidden size.
    key, stored, expected = max(mismatched, key=lambda m: (math.prod(m[1]), m[0]))
    count = len(mismatched)
    return (
        f"Cannot load model {name!r} from {path!r}: its weights do not match its config.json: "
        f"{count} tensor{'' if count == 1 else 's'} differ{'s' if count == 1 else ''} in shape, "
        f"e.g. {key} is {list(stored)} in the weights but {list(expected)} by the config. Fix: "
        f"point the spec's `models.{name}.path` at a directory whose config.json and weights "
        "belong together."
    )


def _load_error_message(name: str, path: str, exc: BaseException) -> str:
    """One line: what failed to load, why, and the ways to fix it."""
    info = KNOWN_MODELS.get(name)
    local = Path(path).expanduser()
    first_line = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    detail = f"{type(exc).__name__}: {first_line}"[:300]
    hub_id = info.hf_id if info is not None else path
    if local.is_dir() and isinstance(exc, SafetensorError):
        why = f"its weights file cannot be read, truncated or corrupt ({detail})"
    elif local.is_dir():
        why = f"the directory holds no complete model and tokenizer ({detail})"
    elif local.exists():
        why = "the path is a file, not a model directory"
    elif path.startswith(("/", "./", "../", "~")) or path.count("/") > 1:
        why = "no such directory"
    else:
        hub_id = path
        why = f"the hub id is not in the local Hugging Face cache and cannot be fetched ({detail})"
    return (
        f"Cannot load model {name!r} from {path!r}: {why}. Fix: download the weights with "
        f"`hf download {hub_id}`, or point the spec's `models.{name}.path` at a "
        "local directory holding them, or use --tiny for offline replicas."
    )
