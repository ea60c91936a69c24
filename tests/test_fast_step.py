"""The padding-free forward (search.train.unpadded) against transformers' forward.

Same embeddings and gradients (fp32 tight, bf16 loose), with padding and a one-token row, for
each pooling and each architecture family; the same dropout probability; checkpointing that
replays the masks; transformers' forward kept for what it does not cover; and a tiny training
run that follows the transformers forward's losses.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _factories import SENTENCES
from _factories import trial_config
from transformers import DistilBertConfig
from transformers import DistilBertModel

from search.record.config import TrialConfig
from search.record.models import MODELS
from search.train import unpadded
from search.train.data import EvalSet
from search.train.data import TrainExample
from search.train.data import load_eval
from search.train.data import load_train
from search.train.encoder import BiEncoder
from search.train.loop import train
from search.train.nli_retrieval import klue_nli_to_retrieval
from search.train.tiny import build_tiny_replica

FAMILIES = ("ko-simcse", "multilingual-e5-small", "bge-m3-ko")  # RoBERTa, BERT, XLM-R


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Every test of this module on one torch thread (conftest)."""


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    cache = tmp_path_factory.mktemp("tiny")
    return {n: build_tiny_replica(MODELS[n], cache, SENTENCES * 5) for n in FAMILIES}


def _pair(path: Path, pooling: str, **cfg: object) -> tuple[BiEncoder, BiEncoder]:
    """The same weights behind transformers' forward and the padding-free one."""
    config = trial_config(model="ko-simcse", model_path=str(path), pooling=pooling, **cfg)
    slow = BiEncoder.from_config(TrialConfig(**(config.to_json() | {"padding_free": False})))
    fast = BiEncoder.from_config(config)
    fast.model.load_state_dict(slow.model.state_dict())
    assert fast.padding_free and not slow.padding_free
    return slow, fast


def _batch(encoder: BiEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths, right-padded, the last row a single token."""
    batch = encoder.tokenize(SENTENCES[:5], kind="passage", max_len=24)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert len(set(mask.sum(dim=1).tolist())) > 1  # padding in some rows
    mask[-1] = 0
    mask[-1, 0] = 1  # one real token
    ids = torch.where(mask.bool(), ids, encoder.tokenizer.pad_token_id)
    return ids, mask


def _embed_and_grads(
    encoder: BiEncoder, ids: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    encoder.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        emb = encoder(ids, mask)  # (rows, hidden)
    weights = torch.linspace(-1.0, 1.0, emb.numel()).view_as(emb)
    (emb * weights).sum().backward()
    grads = {n: p.grad for n, p in encoder.named_parameters() if p.grad is not None}
    return emb.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pooling", ["cls", "mean", "last-token"])
@pytest.mark.parametrize("block_rows", [1, 3, 8])  # attention blocks of sorted rows
def test_same_embeddings_and_gradients_in_fp32(
    replicas: dict[str, Path],
    family: str,
    pooling: str,
    block_rows: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(unpadded, "ATTENTION_BLOCK_ROWS", block_rows)
    slow, fast = _pair(replicas[family], pooling)
    slow.eval(), fast.eval()  # dropout off: the same function
    ids, mask = _batch(slow)
    emb, grads = _embed_and_grads(slow, ids, mask, None)
    emb_fast, grads_fast = _embed_and_grads(fast, ids, mask, None)
    torch.testing.assert_close(emb_fast, emb, atol=1e-5, rtol=1e-4)
    assert set(grads_fast) == {n for n in grads if ".pooler." not in n}  # the pooler is unused
    assert len(grads_fast) > 10
    for name, grad in grads_fast.items():
        torch.testing.assert_close(grad, grads[name], atol=1e-5, rtol=1e-3, msg=name)


def _backward_nodes(output: torch.Tensor) -> list[str]:
    """The names of the autograd nodes behind ``output``."""
    seen: set[object] = set()
    names: list[str] = []
    todo = [output.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_the_backward_does_not_zero_fill_the_tokens_once_per_attention_block(
    replicas: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each block's queries, keys and values are a split of the packed tensor: its backward is
    one concatenation. A slice per block would fill a zero gradient of all the tokens per
    block and add them up (found in a profile: 9-10% of a step at max_len 64 and 128)."""
    _, fast = _pair(replicas["ko-simcse"], "mean")
    ids, mask = _batch(fast)
    slices = {}
    for block_rows in (1, 8):  # 5 blocks a layer, then 1
        monkeypatch.setattr(unpadded, "ATTENTION_BLOCK_ROWS", block_rows)
        packed = unpadded.pack([(ids, mask)])
        assert len(packed.blocks) == (5 if block_rows == 1 else 1)
        names = _backward_nodes(unpadded.packed_forward(fast.model, packed).sum())
        slices[block_rows] = names.count("SliceBackward0")
        assert names.count("SplitWithSizesBackward0") == len(fast.model.encoder.layer)
    assert slices[1] == slices[8], slices


def test_same_embeddings_and_gradients_in_bf16(replicas: dict[str, Path]) -> None:
    slow, fast = _pair(replicas["multilingual-e5-small"], "mean")
    slow.eval(), fast.eval()
    ids, mask = _batch(slow)
    emb, grads = _embed_and_grads(slow, ids, mask, torch.bfloat16)
    emb_fast, grads_fast = _embed_and_grads(fast, ids, mask, torch.bfloat16)
    torch.testing.assert_close(emb_fast, emb, atol=3e-2, rtol=3e-2)
    names = sorted(grads_fast)
    flat, flat_fast = (torch.cat([g[n].flatten() for n in names]) for g in (grads, grads_fast))
    assert float(torch.cosine_similarity(flat, flat_fast, dim=0)) > 0.999
    for name in names:  # each tensor, bar those whose gradient is rounding noise (key bias)
        reference = float(grads[name].norm())
        if reference > 1e-3 * float(flat.norm()):
            assert float((grads_fast[name] - grads[name]).norm()) < 0.05 * reference, name


def test_packed_batches_of_different_widths_embed_as_each_alone(
    replicas: dict[str, Path],
) -> None:
    _, fast = _pair(replicas["ko-simcse"], "cls")
    fast.eval()
    q = fast.tokenize(SENTENCES[:3], kind="query", max_len=8)
    p = fast.tokenize(SENTENCES[3:8], kind="passage", max_len=32)
    with torch.no_grad():
        together = fast.embed_batches(
            [(q["input_ids"], q["attention_mask"]), (p["input_ids"], p["attention_mask"])]
        )
        apart = [fast(**q), fast(**p)]
    assert q["input_ids"].shape[1] != p["input_ids"].shape[1]
    for a, b in zip(together, apart, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_token_counts_round_up_to_few_sizes() -> None:
    sizes = [unpadded.bucketed(n) for n in range(1, 20_000)]
    assert all(b >= n for n, b in enumerate(sizes, start=1))
    assert sizes == sorted(sizes)
    assert all(b <= n * (1 + 1 / 16) for n, b in enumerate(sizes, start=1) if n >= 128)
    assert len({unpadded.bucketed(n) for n in range(2049, 4097)}) == 16  # one octave
    assert [unpadded.bucketed(n) for n in (64, 1536, 4096)] == [64, 1536, 4096]  # exact stay


def test_no_buckets_when_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(unpadded, "BUCKETS_PER_OCTAVE", 0)
    assert [unpadded.bucketed(n) for n in (5, 100, 3001)] == [5, 100, 3001]
    ids = torch.tensor([[2, 5, 7, 3], [2, 9, 3, 0]])
    assert unpadded.pack([(ids, (ids != 0).long())]).padding == 0


def _eval_encoder(
    replicas: dict[str, Path], family: str, pooling: str
) -> tuple[BiEncoder, torch.Tensor, torch.Tensor]:
    """A padding-free encoder in eval mode (dropout off: extra tokens would draw masks of their
    own) and a batch of it."""
    _, fast = _pair(replicas[family], pooling)
    fast.eval()
    return (fast, *_batch(fast))


def _assert_same_result(
    fast: BiEncoder, exact: unpadded.Packed, other: unpadded.Packed, pooling: str
) -> None:
    """The embeddings and every gradient of ``other`` are ``exact``'s (its extra tokens aside)."""

    def run(packed: unpadded.Packed) -> tuple[torch.Tensor, list[torch.Tensor]]:
        fast.zero_grad(set_to_none=True)
        hidden = unpadded.packed_forward(fast.model, packed)
        assert hidden.shape[0] == packed.n_tokens
        (emb,) = unpadded.pool(hidden, packed, pooling)
        (emb * torch.linspace(-1.0, 1.0, emb.numel()).view_as(emb)).sum().backward()
        return emb.detach(), [p.grad.clone() for p in fast.parameters() if p.grad is not None]

    emb, grads = run(exact)
    emb_other, grads_other = run(other)
    torch.testing.assert_close(emb_other, emb, atol=1e-6, rtol=1e-5)
    assert len(grads_other) == len(grads) > 10
    for grad, grad_other in zip(grads, grads_other, strict=True):
        torch.testing.assert_close(grad_other, grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pooling", ["cls", "mean", "last-token"])
def test_full_width_costs_the_padding_and_changes_no_embedding_or_gradient(
    replicas: dict[str, Path], family: str, pooling: str
) -> None:
    """The fail-fast step's pack: every row at the batch's width, the same result."""
    fast, ids, mask = _eval_encoder(replicas, family, pooling)
    pad = int(fast.tokenizer.pad_token_id)
    ids, mask = F.pad(ids, (0, 8), value=pad), F.pad(mask, (0, 8))  # as padded to max_len
    rows, width = ids.shape
    exact = unpadded.pack([(ids, mask)], bucket=False)
    full = unpadded.pack([(ids, mask)], full_width=True)
    assert full.n_tokens == exact.n_tokens == int(mask.sum()) < rows * width
    assert full.input_ids.shape[0] == rows * width  # the padding counts as tokens
    assert all(w == width for _, w, _ in full.blocks)  # and attention blocks are full width
    assert any(w < width for _, w, _ in exact.blocks)
    _assert_same_result(fast, exact, full, pooling)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pooling", ["cls", "mean", "last-token"])
def test_bucket_padding_rows_change_no_embedding_or_gradient(
    replicas: dict[str, Path], family: str, pooling: str
) -> None:
    fast, ids, mask = _eval_encoder(replicas, family, pooling)
    exact = unpadded.pack([(ids, mask)], bucket=False)
    padded = unpadded.pack([(ids, mask)], bucket=True)
    assert padded.n_tokens == exact.n_tokens == int(mask.sum())
    assert (
        exact.padding == 0 and padded.padding == unpadded.bucketed(exact.n_tokens) - exact.n_tokens
    )
    assert padded.padding > 0 and padded.input_ids.shape[0] % 8 == 0
    assert unpadded.pack([(ids, mask)]).padding == padded.padding  # on by default on a CPU
    _assert_same_result(fast, exact, padded, pooling)


@pytest.mark.parametrize("bits", [16, 32])
def test_dropout_keeps_the_probability_and_the_mean(
    bits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(unpadded, "MASK_BITS", bits)
    torch.manual_seed(0)
    x = torch.ones(3, 401, 167)  # an odd number of elements: not a whole number of draws
    for p in (0.1, 0.5):
        out = unpadded.dropout(x, p, True)
        assert out.shape == x.shape
        assert abs(float((out == 0).float().mean()) - p) < 0.005
        assert abs(float(out.mean()) - 1.0) < 0.01
        dropped, kept = out.unique().tolist()  # zeros and the scaled ones, nothing else
        assert dropped == 0.0 and kept == pytest.approx(1 / (1 - p))
    assert torch.equal(unpadded.dropout(x, 0.1, False), x)
    # Probabilities at the ends of the mask's resolution: all dropped, or all kept.
    assert float(unpadded.dropout(x, 1 - 2.0 ** -(bits + 2), True).abs().sum()) == 0.0
    assert torch.equal(
        unpadded.dropout(x, 2.0 ** -(bits + 2), True), x * (1 / (1 - 2.0 ** -(bits + 2)))
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dropout_is_the_masked_scale_and_its_backward_keeps_only_the_bool_mask(
    dtype: torch.dtype,
) -> None:
    """The same values and gradients as ``where(keep, x / (1 - p), 0)`` from the same mask, bit
    for bit, and the backward holds the one-byte mask only (what the memory estimate counts)."""
    x = torch.randn(64, 48, dtype=dtype, requires_grad=True)
    grad = torch.randn(64, 48, dtype=dtype)
    torch.manual_seed(3)
    out = unpadded.dropout(x, 0.3, True)
    (saved,) = out.grad_fn.saved_tensors
    assert saved.dtype == torch.bool and saved.shape == x.shape
    out.backward(grad)
    torch.manual_seed(3)
    keep = unpadded._keep(x.shape, 0.3, x.device)
    assert torch.equal(keep, saved)
    twin = x.detach().requires_grad_()
    expected = torch.where(keep, twin * (1 / 0.7), 0.0)
    expected.backward(grad)
    assert torch.equal(out, expected) and torch.equal(x.grad, twin.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_math_attention_path_is_sdpa_when_nothing_is_dropped(dtype: torch.dtype) -> None:
    """Training on a CPU takes the math path (scores, key bias, softmax, dropout); with a
    dropout that keeps everything it is SDPA's function, values and gradients."""
    torch.manual_seed(0)
    heads, head_dim = 4, 16
    lengths = [9, 3, 7, 1, 12, 5]
    width = max(lengths)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    packed = unpadded.pack([(mask * 5, mask)], block_rows=4, bucket=False)
    qkv = torch.randn(packed.n_tokens, 3, heads, head_dim, dtype=dtype)
    p = 2.0**-20  # under the masks' resolution: every element kept, scaled by 1 / (1 - p)

    def run(drop: float, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = qkv.clone().requires_grad_(True)
        out = unpadded._real_attention(x, packed, heads, drop, training, head_dim**-0.5)
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        assert x.grad is not None
        return out.detach().float(), x.grad.float()

    math_out, math_grad = run(p, True)
    sdpa_out, sdpa_grad = run(0.0, False)
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(math_out, sdpa_out, **tol)
    torch.testing.assert_close(math_grad, sdpa_grad, **tol)


def test_train_mode_drops_out_at_the_configured_places(replicas: dict[str, Path]) -> None:
    slow, fast = _pair(replicas["multilingual-e5-small"], "mean")
    ids, mask = _batch(slow)
    fast.train()
    with torch.no_grad():
        a, b = fast(ids, mask), fast(ids, mask)
        fast.eval()
        c, d = fast(ids, mask), fast(ids, mask)
    assert not torch.allclose(a, b)  # different masks each call
    torch.testing.assert_close(c, d)
    for p in (0.0, 0.3):  # dropout off in the config: train mode is the eval function
        for module in fast.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = p
        fast.train()
        with torch.no_grad():
            e = fast(ids, mask)
        assert torch.allclose(e, c, atol=1e-5) == (p == 0.0)


def test_checkpointing_recomputes_each_layer_with_the_same_masks(
    replicas: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = replicas["ko-simcse"]
    calls: list[int] = []
    layer = unpadded._layer

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return layer(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(unpadded, "_layer", counted)
    results = []
    for checkpointing in (False, True):
        config = trial_config(model="ko-simcse", model_path=str(path))
        encoder = BiEncoder.from_config(
            TrialConfig(**(config.to_json() | {"gradient_checkpointing": checkpointing}))
        ).train()
        assert encoder.padding_free
        ids, mask = _batch(encoder)
        calls.clear()
        torch.manual_seed(3)
        results.append(_embed_and_grads(encoder, ids, mask, None))
        layers = encoder.model.config.num_hidden_layers
        assert len(calls) == layers * (2 if checkpointing else 1)
    (emb, grads), (emb_ckpt, grads_ckpt) = results
    torch.testing.assert_close(emb_ckpt, emb)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_other_architectures_and_eager_attention_run_transformers_forward(
    replicas: dict[str, Path],
) -> None:
    config = DistilBertConfig(vocab_size=50, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    assert not unpadded.supports(DistilBertModel(config))
    path = replicas["ko-simcse"]
    base = trial_config(model="ko-simcse", model_path=str(path)).to_json()
    assert not BiEncoder.from_config(TrialConfig(**(base | {"padding_free": False}))).padding_free
    eager = BiEncoder.from_config(TrialConfig(**(base | {"attn_implementation": "eager"})))
    assert not eager.padding_free  # the spec chose another attention: honour it


@pytest.fixture(scope="module")
def klue(
    tmp_path_factory: pytest.TempPathFactory, klue_json: Path
) -> tuple[list[TrainExample], EvalSet, Path]:
    """KLUE-NLI as retrieval and a tiny MiniLM replica with dropout off (a deterministic run)."""
    work = tmp_path_factory.mktemp("klue")
    train_path, eval_dir = klue_nli_to_retrieval(klue_json, work / "data", eval_fraction=0.2)
    examples = [e for e in load_train(train_path) if e.negatives][:192]
    texts = [t for e in examples for t in (e.query, e.positive, *e.negatives)]
    built = build_tiny_replica(MODELS["multilingual-minilm"], work / "replicas", texts)
    replica = work / "no-dropout"
    shutil.copytree(built, replica)
    config = json.loads((replica / "config.json").read_text())
    config |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    (replica / "config.json").write_text(json.dumps(config))
    full = load_eval(eval_dir)
    qids = list(full.queries)[:16]
    qrels = {q: full.qrels[q] for q in qids}
    docs = {d for q in qids for d in qrels[q]} | set(list(full.corpus)[:32])
    small = EvalSet({d: full.corpus[d] for d in docs}, {q: full.queries[q] for q in qids}, qrels)
    return examples, small, replica


@pytest.mark.train
def test_training_follows_the_transformers_forward(
    klue: tuple[list[TrainExample], EvalSet, Path],
) -> None:
    examples, eval_set, replica = klue
    losses = {}
    for padding_free in (False, True):
        cfg = trial_config(
            model="multilingual-minilm",
            model_path=str(replica),
            batch_size=16,
            max_len=48,
            lr=1e-3,
            epochs=2,
            hard_negatives=1,
            padding_free=padding_free,
        )
        result = train(cfg, train_examples=examples, eval_set=eval_set)
        assert result.padding_free == padding_free  # what ran, for the trial's record
        losses[padding_free] = [h["loss"] for h in result.history]
    assert losses[True][-1] < losses[True][0]  # it learns
    torch.testing.assert_close(
        torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-3, atol=1e-4
    )


@pytest.mark.parametrize("amx", [False, True])
def test_cpu_bf16_from_hidden_128_with_amx_else_256(
    monkeypatch: pytest.MonkeyPatch, amx: bool
) -> None:
    from search.record import precision

    monkeypatch.setattr(precision, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.uses_autocast("cpu", True, hidden=128) == amx
    assert precision.uses_autocast("cpu", True, hidden=256)
    assert not precision.uses_autocast("cpu", True, hidden=64)
    assert not precision.uses_autocast("cpu", False, hidden=1024)


@pytest.mark.train
def test_fail_fast_step_costs_every_row_at_max_len_padding_free(
    klue: tuple[list[TrainExample], EvalSet, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Padding-free, a batch padded to max_len would cost only its real tokens: the fail-fast
    step counts every row at max_len (its memory's worst case), the other steps their tokens;
    transformers' padded forward does not run at all."""
    examples, eval_set, replica = klue
    packs: list[tuple[bool, int, set[int]]] = []
    pack = unpadded.pack

    def recording(batches: Any, **kwargs: Any) -> unpadded.Packed:
        packed = pack(batches, **kwargs)
        widths = {w for _, w, _ in packed.blocks}
        packs.append((bool(kwargs.get("full_width")), int(packed.input_ids.shape[0]), widths))
        return packed

    def no_padded_forward(self: BiEncoder, ids: torch.Tensor, mask: torch.Tensor) -> Any:
        raise AssertionError("transformers' padded forward ran")

    monkeypatch.setattr(unpadded, "pack", recording)
    monkeypatch.setattr(BiEncoder, "_hf_pooled", no_padded_forward)
    cfg = trial_config(
        model="multilingual-minilm",
        model_path=str(replica),
        batch_size=8,
        max_len=40,
        hard_negatives=1,
        fail_fast=True,
    )
    result = train(cfg, train_examples=examples[:32], eval_set=eval_set)
    assert result.padding_free
    # The first step's packs: 8 queries, then 16 passages, each at 40 tokens, blocks 40 wide.
    assert packs[:2] == [(True, 8 * 40, {40}), (True, 16 * 40, {40})]
    assert not any(full for full, _, _ in packs[2:])  # the other steps and the evaluations
    assert any(tokens < 16 * 40 for _, tokens, _ in packs[3:8:2])  # KLUE rows are short
