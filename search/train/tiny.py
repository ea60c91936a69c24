"""Tiny, randomly initialised replicas of the four encoders, built offline.

Model weights cannot be downloaded everywhere (CI, air-gapped machines). With ``--tiny`` the
service swaps each model for a replica of the same architecture class and tokenizer class, with
a tokenizer trained locally on Korean text, saved with ``save_pretrained`` and loaded through the
very same ``AutoModel/AutoTokenizer.from_pretrained`` path as real weights.

Example:
    >>> import tempfile
    >>> from search.record.models import MODELS
    >>> texts = ["한국어 문장입니다.", "검색 모델을 학습합니다."] * 20
    >>> with tempfile.TemporaryDirectory() as cache:
    ...     path = build_tiny_replica(MODELS["ko-simcse"], cache, texts, vocab_size=300)
    ...     path.name, (path / "config.json").is_file()
    ('ko-simcse-tiny-L2-H64-V300', True)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from filelock import FileLock
from tokenizers import Tokenizer
from tokenizers import models as tok_models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import trainers
from transformers import BertConfig
from transformers import BertModel
from transformers import BertTokenizer
from transformers import RobertaConfig
from transformers import RobertaModel
from transformers import XLMRobertaConfig
from transformers import XLMRobertaModel
from transformers import XLMRobertaTokenizer

from search.record.models import ModelInfo
from search.train.tiny_layout import MARKER
from search.train.tiny_layout import TINY_DIMS
from search.train.tiny_layout import tiny_info  # noqa: F401 - re-exported
from search.train.tiny_layout import tiny_replica_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers import PreTrainedTokenizerBase

# Tokenizers train on at most this many texts (the first ones): plenty for a 4000-piece vocabulary,
# and it keeps a build to about a second whatever the size of the training data.
MAX_TOKENIZER_TEXTS = 10_000

# Special tokens in the order of the real tokenizers' first ids.
_WORDPIECE_SPECIALS = ["[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"]  # klue/roberta-base order
_SENTENCEPIECE_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # XLM-R; <mask> is the last id
# Every printable ASCII character gets a piece, so prefixes like "query: " never become <unk>.
_ASCII_ALPHABET = list(string.ascii_letters + string.digits + string.punctuation)


def build_tiny_replica(
    info: ModelInfo,
    cache_dir: str | Path,
    texts: Sequence[str],
    *,
    num_layers: int = TINY_DIMS["num_layers"],
    hidden: int = TINY_DIMS["hidden"],
    heads: int = TINY_DIMS["heads"],
    ffn: int = TINY_DIMS["ffn"],
    vocab_size: int = TINY_DIMS["vocab_size"],
    seed: int = 0,
) -> Path:
    """Build (or reuse) a tiny random replica of ``info`` that ``from_pretrained`` can load.

    The replica has the real model's architecture class (``RobertaModel``, ``XLMRobertaModel``
    or ``BertModel``), its tokenizer class (BERT WordPiece for ko-simcse, XLM-R SentencePiece
    unigram for the others) trained on ``texts``, its special-token ids and its positions
    (``max_position_embeddings = info.max_positions``: RoBERTa-family positions start after the
    padding id, so every replica takes 512 tokens). Weights are drawn from ``seed`` without
    touching the caller's random state, so a build is deterministic.

    A finished replica is reused whatever ``texts`` are given. Concurrent builders (threads or
    processes) serialise on a file lock; each build is written to a temporary folder that is
    renamed into place only when complete, so readers never see half a replica.

    Args:
        info: The real model to mimic.
        cache_dir: Folder holding the replicas (created if missing).
        texts: Korean texts to train the tokenizer on (the first ``MAX_TOKENIZER_TEXTS``
            non-blank ones are used).
        num_layers: Replica layers.
        hidden: Replica hidden size.
        heads: Replica attention heads.
        ffn: Replica feed-forward size.
        vocab_size: Embedding rows; the tokenizer is trained up to this size.
        seed: Seed of the weights' initialisation.

    Returns:
        The replica's directory (``config.json``, ``model.safetensors``, tokenizer files).

    Raises:
        ValueError: On bad dimensions, no usable text, or a vocabulary too small for the
            characters of ``texts``.
    """
    final = tiny_replica_dir(
        info,
        cache_dir,
        num_layers=num_layers,
        hidden=hidden,
        heads=heads,
        ffn=ffn,
        vocab_size=vocab_size,
        seed=seed,
    )
    if (final / MARKER).is_file():
        return final
    corpus = [t for t in texts if t.strip()][:MAX_TOKENIZER_TEXTS]
    if not corpus:
        raise ValueError(f"build_tiny_replica needs non-empty texts, but got {len(texts)=}.")
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{final.name}.lock")):
        if (final / MARKER).is_file():  # another process built it while we waited
            return final
        tokenizer = _train_tokenizer(info, corpus, vocab_size)
        model = _init_model(info, tokenizer, num_layers, hidden, heads, ffn, vocab_size, seed)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            marker = {
                "hf_id": info.hf_id,
                "architecture": type(model).__name__,
                "tokenizer": type(tokenizer).__name__,
                "num_layers": num_layers,
                "hidden": hidden,
                "heads": heads,
                "ffn": ffn,
                "vocab_size": vocab_size,
                "tokenizer_vocab": len(tokenizer),
                "seed": seed,
                "n_texts": len(corpus),
                "texts_sha256": hashlib.sha256(
                    "\n".join(corpus).encode(errors="replace")
                ).hexdigest(),
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            for file in tmp.iterdir():
                file.chmod(0o644)  # safetensors writes 0600
            if final.exists():  # a leftover without its marker: never complete, replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _train_tokenizer(
    info: ModelInfo, corpus: list[str], vocab_size: int
) -> PreTrainedTokenizerBase:
    """Train the model's kind of tokenizer on ``corpus`` and wrap it in its transformers class.

    The transformers class rebuilds the real tokenizer's pipeline (normaliser, pre-tokeniser,
    post-processor, special ids) from the vocabulary, exactly as when loading real weights.
    """
    # Rare characters give way when there are too many for the vocabulary (SentencePiece's
    # character coverage, BERT's limit_alphabet): a quarter of it stays for longer pieces.
    room = vocab_size * 3 // 4 - len(_ASCII_ALPHABET)
    if info.tokenizer == "wordpiece":  # each character twice: "c" and "##c"
        corpus = _keep_frequent_chars(corpus, (room - len(_ASCII_ALPHABET)) // 2)
    else:
        corpus = _keep_frequent_chars(corpus, room)
    # Prefixes such as e5's "query: " must be tokenizable as pieces rather than <unk>.
    corpus = corpus + [p for p in (info.query_prefix, info.passage_prefix) if p]
    if info.tokenizer == "wordpiece":
        wordpieces = _wordpiece_vocab(corpus, vocab_size)
        _check_vocab_size(info, len(wordpieces), vocab_size)
        # transformers 5: the tokenizers-backed class (BertTokenizerFast is an alias of it).
        return BertTokenizer(
            vocab=wordpieces, do_lower_case=False, model_max_length=info.max_tokens
        )
    pieces = _unigram_pieces(
        corpus,
        vocab_size - len(_SENTENCEPIECE_SPECIALS) - 1,  # <mask> is the last id, as in XLM-R
        pre_tokenizers.WhitespaceSplit(),
        None,
    )
    vocab = [(token, 0.0) for token in _SENTENCEPIECE_SPECIALS] + pieces + [("<mask>", 0.0)]
    _check_vocab_size(info, len(vocab), vocab_size)
    # transformers 5: the tokenizers-backed class (XLMRobertaTokenizerFast is an alias of it).
    return XLMRobertaTokenizer(vocab=vocab, model_max_length=info.max_tokens)


def _keep_frequent_chars(corpus: list[str], max_chars: int) -> list[str]:
    """Blank out all but the ``max_chars`` most frequent non-ASCII characters of ``corpus``.

    Printable ASCII always stays. Ties go to the lower code point, so the result is
    deterministic. The blanked characters become unknown to the trained tokenizer.
    """
    counts = Counter(c for text in corpus for c in text if not c.isspace() and c > "~")
    if len(counts) <= max_chars:
        return corpus
    ranked = sorted(counts, key=lambda c: (-counts[c], c))
    dropped = "".join(ranked[max(max_chars, 0) :])
    blank = str.maketrans(dropped, " " * len(dropped))
    return [text.translate(blank) for text in corpus]


def _unigram_pieces(
    corpus: list[str],
    n_pieces: int,
    split: pre_tokenizers.PreTokenizer,
    normalizer: normalizers.Normalizer | None,
) -> list[tuple[str, float]]:
    """Train a SentencePiece unigram model; its pieces (specials excluded), in a canonical order.

    The Rust trainer works in parallel, so scores can differ in the last bits between runs;
    rounding them and sorting by (score, piece) makes the result deterministic.
    """
    backend = Tokenizer(tok_models.Unigram())
    if normalizer is not None:
        backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=n_pieces + 1,  # + <unk>
        special_tokens=["<unk>"],
        unk_token="<unk>",
        initial_alphabet=_ASCII_ALPHABET,
        show_progress=False,
    )
    try:
        backend.train_from_iterator(corpus, trainer)
    except Exception as exc:  # the Rust trainer raises a bare Exception
        raise ValueError(
            f"Cannot train a tokenizer of {n_pieces} pieces ({exc}); raise vocab_size."
        ) from exc
    trained = json.loads(backend.to_str())["model"]["vocab"]
    pieces = [(str(p), round(float(s), 6)) for p, s in trained if p != "<unk>"]
    # Characters that the EM pruned but that must stay to spell every word come last, with
    # made-up scores in hash-set order: give them all one score below every longer piece.
    lowest = min((s for p, s in pieces if len(p.removeprefix("▁")) > 1), default=0.0)
    pieces = [
        (p, s) if len(p.removeprefix("▁")) > 1 or s > lowest else (p, lowest - 1.0)
        for p, s in pieces
    ]
    return sorted(pieces, key=lambda item: (-item[1], item[0]))


def _check_vocab_size(info: ModelInfo, trained: int, vocab_size: int) -> None:
    """Raise when the trained tokenizer has more pieces than the embedding has rows."""
    if trained > vocab_size:
        raise ValueError(
            f"The tokenizer of {info.name}'s replica needs {trained} pieces for the characters "
            f"of the texts, but got {vocab_size=}; raise vocab_size."
        )


def _wordpiece_vocab(corpus: list[str], vocab_size: int) -> dict[str, int]:
    """A BERT WordPiece vocabulary (klue/roberta-base special ids) learnt from ``corpus``.

    The ``tokenizers`` WordPiece trainer breaks frequency ties in hash-map order, so its
    vocabulary changes from run to run. The pieces are therefore chosen by a unigram model
    trained on BERT-pre-tokenised words: a word-initial piece ``▁word`` becomes ``word``, any
    other piece ``##piece``. Every character seen at the start of a word is a token, and every
    character seen inside one a ``##`` token (all printable ASCII both ways), as the WordPiece
    trainer's alphabet would have them; the most likely longer pieces fill the rest.
    """
    normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    split = pre_tokenizers.BertPreTokenizer()
    words = [
        w for text in corpus for w, _ in split.pre_tokenize_str(normalizer.normalize_str(text))
    ]
    initial = {w[0] for w in words} | set(_ASCII_ALPHABET)
    inside = {c for w in words for c in w[1:]} | set(_ASCII_ALPHABET)
    singles = sorted(initial) + [f"##{c}" for c in sorted(inside)]
    budget = vocab_size - len(_WORDPIECE_SPECIALS) - len(singles)
    if budget < 0:
        raise ValueError(
            f"A WordPiece vocabulary of these texts needs {vocab_size - budget} tokens for its "
            f"characters alone, but got {vocab_size=}; raise vocab_size."
        )
    # The unigram model also spends pieces on single characters: ask for enough longer ones.
    n_pieces = budget + len(initial | inside) + len(initial) + 1
    longer: list[str] = []
    for piece, _ in _unigram_pieces(corpus, n_pieces, split, normalizer):
        token = piece[1:] if piece.startswith("▁") else f"##{piece}"
        if len(token.removeprefix("##")) > 1:
            longer.append(token)
    tokens = _WORDPIECE_SPECIALS + singles + longer[:budget]
    return {token: i for i, token in enumerate(tokens)}


def _init_model(
    info: ModelInfo,
    tokenizer: PreTrainedTokenizerBase,
    num_layers: int,
    hidden: int,
    heads: int,
    ffn: int,
    vocab_size: int,
    seed: int,
) -> PreTrainedModel:
    """A randomly initialised model of ``info``'s architecture class with the tiny dimensions."""
    common = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "intermediate_size": ffn,
        "max_position_embeddings": info.max_positions,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        if info.architecture == "roberta":
            roberta = RobertaConfig(
                **common,
                type_vocab_size=1,
                layer_norm_eps=1e-5,
                bos_token_id=tokenizer.cls_token_id,
                eos_token_id=tokenizer.sep_token_id,
            )
            return RobertaModel(roberta)
        if info.architecture == "xlm-roberta":
            xlmr = XLMRobertaConfig(
                **common,
                type_vocab_size=1,
                layer_norm_eps=1e-5,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            return XLMRobertaModel(xlmr)
        return BertModel(BertConfig(**common, type_vocab_size=2, layer_norm_eps=1e-12))
