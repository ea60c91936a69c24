"""What every trial of a worker reads and tokenises alike, computed once and cached by content.

Three kinds of entries, each keyed on the digests of what it was computed from (the data
files' bytes, the texts, the tokenizer's serialised state), never on paths or times:

- the parsed and validated data (``load_train_cached``, ``load_eval_cached``): keyed on the
  files' bytes (and ``max_samples``); a :class:`~search.train.data.DataError` is
  raised again on each call, never cached;
- the training set's token tables (``cached_tensors``, from ``search.train.loop``): keyed on
  the texts, the tokenizer, ``max_len``, the prefixes and the hard negatives kept;
- an eval set's token ids (``cached_eval_tokens``): keyed likewise; the encoding itself runs
  at every evaluation, since the model changes.

The cache and its settings are ``search.train.cache``'s (``SEARCH_DATA_CACHE``, its bounds, and
``SEARCH_DATA_CACHE=off``); with the cache off each function computes afresh.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

import tokenizers
import torch
import transformers
from torch import Tensor

from search.train.cache import Payload
from search.train.cache import shared_cache
from search.train.data import EvalSet
from search.train.data import TrainExample
from search.train.data import load_eval
from search.train.data import load_train
from search.train.metrics import EvalTokens
from search.train.metrics import eval_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from search.train.encoder import BiEncoder

_CHUNK = 2**20  # bytes hashed at once


def file_digest(*paths: Path) -> str:
    """blake2b of the files' bytes, in order (each file's length first, so that no two
    different lists of files give the same stream)."""
    h = hashlib.blake2b(digest_size=20)
    for path in paths:
        with path.open("rb") as f:
            h.update(path.stat().st_size.to_bytes(8, "little"))
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def texts_digest(texts: Iterable[str]) -> str:
    """blake2b of texts in order (each one's UTF-8 length first).

    Example:
        >>> texts_digest(["ab", "c"]) == texts_digest(["a", "bc"])
        False
    """
    h = hashlib.blake2b(digest_size=20)
    for text in texts:
        raw = text.encode("utf-8", errors="surrogatepass")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """blake2b of what decides a tokenizer's output: its serialised state (a fast tokenizer's
    JSON, without the truncation and padding that each call sets anew; a slow one's pickle),
    its class, its padding and truncation sides and padding token, and the library versions.
    None when the state cannot be serialised (then nothing it made is cached)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        raw = _backend_state(backend) if backend is not None else pickle.dumps(tokenizer, 5)
    except Exception:  # noqa: BLE001 - any failure to serialise: do not cache, do not fail
        return None
    facts = {
        "class": type(tokenizer).__qualname__,
        "padding_side": tokenizer.padding_side,
        "truncation_side": tokenizer.truncation_side,
        "pad_token_id": tokenizer.pad_token_id,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    h = hashlib.blake2b(json.dumps(facts, sort_keys=True).encode(), digest_size=20)
    h.update(raw)
    return h.hexdigest()


def _backend_state(backend: tokenizers.Tokenizer) -> bytes:
    """A fast tokenizer's JSON with truncation and padding off, its settings put back after.

    transformers sets both before every call from the call's arguments, so what the last call
    left there says nothing about the next one's output; serialising without them costs one
    ``to_str`` (parsing and rewriting the JSON would cost ten times more).
    """
    truncation, padding = backend.truncation, backend.padding
    backend.no_truncation()
    backend.no_padding()
    try:
        return backend.to_str().encode()
    finally:
        if truncation is not None:
            backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**padding)


def encoder_key(encoder: BiEncoder, max_len: int) -> dict[str, object] | None:
    """The part of a token entry's key that the encoder decides (None: not cacheable, or the
    cache is off: then nothing is hashed)."""
    if shared_cache() is None:
        return None
    digest = tokenizer_digest(encoder.tokenizer)
    if digest is None:
        return None
    return {
        "tokenizer": digest,
        "max_len": max_len,
        "query_prefix": encoder.query_prefix,
        "passage_prefix": encoder.passage_prefix,
    }


def cached_tensors(
    key: Mapping[str, object] | None, compute: Callable[[], dict[str, Tensor]]
) -> dict[str, Tensor]:
    """``compute()``'s tensors, cached under ``key`` (None, or the cache off: computed)."""
    cache = shared_cache()
    if cache is None or key is None:
        return compute()
    tensors, _ = cache.get_or_compute(key, lambda: (compute(), {}))
    return tensors


def cached_eval_tokens(
    encoder: BiEncoder,
    eval_set: EvalSet,
    *,
    max_len: int,
    encoder_part: Mapping[str, object] | None = None,
) -> EvalTokens:
    """``eval_tokens(encoder, eval_set, max_len=max_len)``, cached by the eval set's texts
    and qrels, the tokenizer, ``max_len`` and the prefixes.

    Args:
        encoder: The bi-encoder.
        eval_set: The eval set (or a sample of it).
        max_len: Longest tokenised input.
        encoder_part: ``encoder_key(encoder, max_len)`` when the caller has it already.
    """
    part = encoder_part if encoder_part is not None else encoder_key(encoder, max_len)
    key = None if part is None else {"kind": "eval-tokens", "eval": eval_digest(eval_set), **part}

    def compute() -> dict[str, Tensor]:
        tokens = eval_tokens(encoder, eval_set, max_len=max_len)
        return {
            **{f"queries.{k}": v for k, v in tokens.queries.items()},
            **{f"corpus.{k}": v for k, v in tokens.corpus.items()},
        }

    tensors = cached_tensors(key, compute)
    return EvalTokens(
        queries={k.removeprefix("queries."): v for k, v in tensors.items() if k[0] == "q"},
        corpus={k.removeprefix("corpus."): v for k, v in tensors.items() if k[0] == "c"},
    )


def eval_digest(eval_set: EvalSet) -> str:
    """blake2b of an eval set's content, in its order (what evaluation tokenises and ranks)."""
    parts: list[str] = []
    for mapping in (eval_set.corpus, eval_set.queries):
        parts.append(str(len(mapping)))
        for item_id, text in mapping.items():
            parts += (item_id, text)
    parts.append(json.dumps(eval_set.qrels, sort_keys=False, ensure_ascii=False))
    return texts_digest(parts)


def examples_digest(examples: Iterable[TrainExample]) -> str:
    """blake2b of training examples' texts, in order."""
    parts: list[str] = []
    for e in examples:
        parts += (e.query, e.positive, str(len(e.negatives)), *e.negatives)
    return texts_digest(parts)


def load_train_cached(path: str | Path, *, max_samples: int | None = None) -> list[TrainExample]:
    """``load_train(path, max_samples=...)``, parsed and checked once per file content.

    Raises:
        DataError: As ``load_train`` (each time: errors are not cached).
    """
    path = Path(path)
    cache = shared_cache()
    if cache is None or not path.is_file():
        return load_train(path, max_samples=max_samples)
    key = {"kind": "train-data", "file": file_digest(path), "max_samples": max_samples}

    def compute() -> Payload:
        examples = load_train(path, max_samples=max_samples)
        return {
            "json": _json_tensor([[e.query, e.positive, list(e.negatives)] for e in examples])
        }, {}

    tensors, _ = cache.get_or_compute(key, compute)
    return [TrainExample(q, p, tuple(n)) for q, p, n in _from_json_tensor(tensors["json"])]


def load_eval_cached(directory: str | Path, split: str = "test") -> EvalSet:
    """``load_eval(directory, split)``, parsed and checked once per content of its files.

    Raises:
        DataError: As ``load_eval`` (each time: errors are not cached).
    """
    directory = Path(directory)
    files = [directory / "corpus.jsonl", directory / "queries.jsonl"]
    files.append(directory / "qrels" / f"{split}.tsv")
    cache = shared_cache()
    if cache is None or not all(f.is_file() for f in files):
        return load_eval(directory, split)
    key = {"kind": "eval-data", "files": file_digest(*files)}

    def compute() -> Payload:
        eval_set = load_eval(directory, split)
        fields = [eval_set.corpus, eval_set.queries, eval_set.qrels]
        return {"json": _json_tensor(fields)}, {}

    tensors, _ = cache.get_or_compute(key, compute)
    corpus, queries, qrels = _from_json_tensor(tensors["json"])
    return EvalSet(corpus=corpus, queries=queries, qrels=qrels)


def _json_tensor(value: object) -> Tensor:
    """``value`` as UTF-8 JSON in a uint8 tensor (a tensor, unlike safetensors' metadata,
    has no size limit)."""
    raw = json.dumps(value, ensure_ascii=False).encode()
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _from_json_tensor(tensor: Tensor) -> Any:
    """The value :func:`_json_tensor` stored."""
    return json.loads(tensor.numpy().tobytes())
