"""The memory estimate against the DESIGN.md formulas, worked out by hand."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from _factories import trial_config

from search.memory.estimate import ATTENTION_BLOCK_ROWS
from search.memory.estimate import CPU_CALIBRATION
from search.memory.estimate import CUDA_CONTEXT_BYTES
from search.memory.estimate import MMAP_THRESHOLD
from search.memory.estimate import PADDING_FREE_TYPES
from search.memory.estimate import estimate_peak_memory
from search.memory.estimate import layer_activation_bytes
from search.memory.estimate import runs_padding_free
from search.memory.preflight import ESTIMATE_BAND
from search.record.config import TrialConfig
from search.record.models import MODELS
from search.record.models import ModelInfo

# The preflight skips a CPU config only when estimate x (1 - band) exceeds the free memory, so
# a config that fits is never skipped while estimate / measured <= 1 / (1 - band).
NO_WRONG_SKIP = 1 / (1 - ESTIMATE_BAND["cpu"])
# Issue 10's target: the estimate within 15% of the measured peak. Below it the estimate lets
# a config run that does not fit (an OOM not prevented: its first step finds out in seconds).
TARGET_LOW = 0.85

GIB = 1024**3
# A small architecture whose numbers are easy to follow by hand: 2 layers, h=64, a=4, f=4h.
SMALL = ModelInfo(
    name="small",
    hf_id="none",
    architecture="roberta",
    tokenizer="wordpiece",
    num_layers=2,
    hidden=64,
    heads=4,
    ffn=256,
    vocab=1000,
    max_positions=514,
    pooling="cls",
    normalize=False,
)


def _cfg(**over: Any) -> TrialConfig:
    return trial_config(
        **{
            **dict(
                model="small",
                model_path="none",
                batch_size=4,
                amp=True,
                hard_negatives=1,
                device="cuda",
                train_path="t",
                eval_dir="e",
                pooling="cls",
                normalize=False,
            ),
            **over,
        }
    )


def test_layer_formula_is_korthikanti_at_16_bits() -> None:
    # s=512, b=8, h=1024, a=16: 34*s*b*h = 142,606,336 and 5*a*s^2*b = 167,772,160.
    got = layer_activation_bytes(
        512, 8, 1024, 16, 4096, elem_bytes=2, mask_bytes=1, attention_matrix=True
    )
    assert got == 142_606_336 + 167_772_160
    # Fused attention drops the 5*a*s^2*b term and keeps a fp32 logsumexp (a*s*b*4 bytes).
    fused = layer_activation_bytes(
        512, 8, 1024, 16, 4096, elem_bytes=2, mask_bytes=1, attention_matrix=False
    )
    assert fused == 142_606_336 + 16 * 512 * 8 * 4


def test_model_states_are_16_bytes_per_parameter_and_18_with_amp() -> None:
    bge = MODELS["bge-m3-ko"]
    assert bge.n_params == 567_754_752  # DESIGN.md
    fp32 = estimate_peak_memory(bge, _cfg(model="bge-m3-ko", amp=False))
    assert (fp32.params_bytes, fp32.grads_bytes, fp32.optimizer_bytes) == (
        4 * 567_754_752,
        4 * 567_754_752,
        8 * 567_754_752,
    )
    amp = estimate_peak_memory(bge, _cfg(model="bge-m3-ko", amp=True))
    states = amp.params_bytes + amp.grads_bytes + amp.optimizer_bytes
    assert states == 18 * 567_754_752


def test_components_by_hand_on_cuda_with_amp() -> None:
    est = estimate_peak_memory(SMALL, _cfg())
    p = SMALL.n_params
    assert (est.params_bytes, est.grads_bytes, est.optimizer_bytes) == (6 * p, 4 * p, 8 * p)
    # Per token of one layer: (8h + 2f)*2 + 2h*1 + a*4 (logsumexp) = 2048 + 128 + 16 = 2192.
    # Embeddings per token: h*(4 + 1) + 8 = 328. Encoder per token: 328 + 2*2192 = 4712.
    # 4 queries x 32 tokens and 4*(1+1) passages x 32 tokens: (128 + 256) * 4712.
    assert est.activations_bytes == (128 + 256) * 4712 == 1_809_408
    # The 4 x 8 score matrix: scores, softmax and gradient in fp32.
    assert est.scores_bytes == 3 * 4 * 4 * 8
    # Overhead: CUDA context, one layer (the passages') as working set, 5% fragmentation.
    assert est.overhead_bytes == int(CUDA_CONTEXT_BYTES + 256 * 2192 + 0.05 * (1_809_408 + 384))
    parts = est.as_dict()
    assert parts.pop("total_bytes") == sum(parts.values())


def test_checkpointing_keeps_layer_inputs_plus_one_layer() -> None:
    est = estimate_peak_memory(SMALL, _cfg(gradient_checkpointing=True))
    # Per token: embeddings 328 + 2 layers x h*2 bytes kept + one layer 2192 recomputed.
    assert est.activations_bytes == (128 + 256) * (328 + 2 * 64 * 2 + 2192)


def test_query_and_passage_lengths_are_separate() -> None:
    short_queries = estimate_peak_memory(SMALL, _cfg(), query_len=8)
    assert short_queries.activations_bytes == (4 * 8 + 256) * 4712


def test_bigger_or_fewer_savers_never_needs_less() -> None:
    bge = MODELS["bge-m3-ko"]
    base = _cfg(model="bge-m3-ko", batch_size=32, max_len=256, gradient_checkpointing=True)
    small = estimate_peak_memory(bge, base).total_bytes
    for change in (
        {"batch_size": 64},
        {"max_len": 384},
        {"hard_negatives": 3},
        {"gradient_checkpointing": False},
    ):
        bigger = estimate_peak_memory(bge, dataclasses.replace(base, **change)).total_bytes
        assert bigger > small, change
    no_amp = dataclasses.replace(base, amp=False, gradient_checkpointing=False)
    with_amp = dataclasses.replace(base, gradient_checkpointing=False)
    assert (
        estimate_peak_memory(bge, no_amp).activations_bytes
        > estimate_peak_memory(bge, with_amp).activations_bytes
    )


def test_old_sweep_claims_are_in_the_estimates_range() -> None:
    # The old notes: bge-m3-ko at 256 x 512 needed ~100 GB, ~88 GB with AMP, ~78 GB with AMP
    # and checkpointing. Only the checkpointed figure is of the same order in our model;
    # without checkpointing the formulas give several hundred GiB (DESIGN.md: measure it).
    bge = MODELS["bge-m3-ko"]
    cfg = _cfg(model="bge-m3-ko", batch_size=256, max_len=512, hard_negatives=0)
    ckpt = estimate_peak_memory(bge, dataclasses.replace(cfg, gradient_checkpointing=True))
    assert 20 * GIB < ckpt.total_bytes < 100 * GIB
    full = estimate_peak_memory(bge, cfg)
    assert full.total_bytes > 100 * GIB


def test_max_len_is_capped_by_the_positions() -> None:
    long = estimate_peak_memory(SMALL, _cfg(max_len=4096))
    capped = estimate_peak_memory(SMALL, _cfg(max_len=512))
    assert long == capped


def test_cpu_fp32_counts_the_attention_matrix() -> None:
    cfg = _cfg(device="cpu", amp=False, padding_free=False)
    cpu = estimate_peak_memory(SMALL, cfg, device_type="cpu")
    p = SMALL.n_params
    assert cpu.params_bytes == 4 * p
    # Per token of one layer: (9h + 2f)*4 + 2h*4 = 4864; per attention element 12 bytes.
    layer_q = 128 * 4864 + 4 * 32 * 32 * 4 * 12
    layer_p = 256 * 4864 + 4 * 32 * 32 * 8 * 12
    embeddings = (128 + 256) * (64 * 8 + 8)
    assert cpu.activations_bytes == embeddings + 2 * (layer_q + layer_p)


def test_cpu_padding_free_counts_its_own_layer() -> None:
    cfg = _cfg(device="cpu", amp=False, fail_fast=False)
    assert runs_padding_free(SMALL, cfg)
    cpu = estimate_peak_memory(SMALL, cfg, device_type="cpu")

    # Per token of one layer: (11h + 2f)*4 + 2h*1 (bool masks) = 4992; 9 bytes per attention
    # element. Each pass is one block (4 and 8 rows of 32): every per-block tensor is under
    # the mmap threshold and counted again: 3 of rows*32*h*4, 2 of rows*a*32^2*4, 1 bool.
    def layer(rows: int) -> int:
        small = 3 * rows * 32 * 64 * 4 + 2 * rows * 4 * 32 * 32 * 4 + rows * 4 * 32 * 32
        return rows * 32 * 4992 + rows * 4 * 32 * 32 * 9 + small

    embeddings = (128 + 256) * (64 * 5 + 16)  # LN input, bool mask, ids and positions
    assert cpu.activations_bytes == embeddings + 2 * (layer(4) + layer(8))
    # Without the padding-free forward (eager attention, or off) the padded count is back.
    for other in (
        dataclasses.replace(cfg, attn_implementation="eager"),
        _cfg(device="cpu", amp=False, fail_fast=False, padding_free=False),
    ):
        assert not runs_padding_free(SMALL, other)
        padded = estimate_peak_memory(SMALL, other, device_type="cpu")
        assert padded.activations_bytes != cpu.activations_bytes


def test_cpu_padding_free_fail_fast_step_is_inside_the_padding_free_worst_case() -> None:
    # The fail-fast step runs padding-free with every row at max_len, before AdamW's moments
    # exist: the steady step's worst case (with them) covers it, at any length.
    for max_len in (16, 512):
        cfg = _cfg(device="cpu", amp=False, max_len=max_len, fail_fast=False)
        steady = estimate_peak_memory(SMALL, cfg, device_type="cpu")
        first = estimate_peak_memory(
            SMALL, dataclasses.replace(cfg, fail_fast=True), device_type="cpu"
        )
        assert first == steady and steady.optimizer_bytes > 0


def test_padding_free_facts_follow_the_product() -> None:
    from search.train import unpadded
    from search.worker.isolation import MALLOC_MMAP_THRESHOLD

    assert PADDING_FREE_TYPES == unpadded.SUPPORTED_MODEL_TYPES
    assert ATTENTION_BLOCK_ROWS == unpadded.ATTENTION_BLOCK_ROWS
    assert MMAP_THRESHOLD == MALLOC_MMAP_THRESHOLD


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_padding_free_constants_are_what_its_layer_saves(amp: bool) -> None:
    # Counted again, as the calibration did: saved_tensors_hooks on a tiny BERT run through
    # search.train.unpadded's forward (bench/count_saved_tensors.py), bf16 under CPU autocast.
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import count_saved_tensors as count

    precision = "bf16" if amp else "fp32"
    hidden, attention, _ = count.constants(padding_free=True, amp=amp)
    assert round(hidden) == CPU_CALIBRATION[f"hidden_elements_padding_free_{precision}"]
    assert round(attention) == CPU_CALIBRATION[f"attention_bytes_padding_free_{precision}"]


def test_unknown_device_type() -> None:
    with pytest.raises(ValueError, match="device_type"):
        estimate_peak_memory(SMALL, _cfg(), device_type="tpu")


@pytest.mark.train
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
def test_cpu_estimate_is_near_a_measured_tiny_replica_peak(
    tmp_path_factory: pytest.TempPathFactory, checkpointing: bool
) -> None:
    # Bounds: above NO_WRONG_SKIP the preflight would skip this config at a free memory it fits
    # in (the error that removes configs from the search for good); below TARGET_LOW the
    # estimate misses the 15% target on the low side. The measurement is stable since
    # this calibration fixes the child's malloc mmap threshold (search.worker.isolation; a
    # user's trial keeps glibc's own): glibc's dynamic threshold keeps a history-dependent part
    # of the freed activations resident, and one checkpointed config measured 264-375 MiB over
    # identical runs (0.83 in CI).
    import json
    import os

    from test_isolation import _write_tiny_data  # the tiny Korean data set of those tests

    from search.train.tiny import build_tiny_replica
    from search.train.tiny import tiny_info
    from search.worker.isolation import MALLOC_MMAP_THRESHOLD
    from search.worker.isolation import run_isolated

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root = tmp_path_factory.mktemp("estimate")
    train_path, eval_dir = _write_tiny_data(root)
    rows = [json.loads(line) for line in train_path.read_text(encoding="utf-8").splitlines()]
    texts = [t for r in rows for t in (r["query"], r["positive"], *r["negatives"])]
    info = MODELS["multilingual-e5-small"]
    path = build_tiny_replica(info, root / "cache", texts)
    cfg = _cfg(
        model=info.name,
        model_path=str(path),
        batch_size=32,
        max_len=128,
        amp=False,
        gradient_checkpointing=checkpointing,
        # Padded steps: this data's rows are short, so its padding-free steps stay far below
        # their worst case (every row at max_len), which the estimate covers; that case is
        # measured on the real MiniLM by bench/bench_estimate_real.py (BENCHMARKS.md).
        padding_free=False,
        device="cpu",
        train_path=str(train_path),
        eval_dir=str(eval_dir),
        pooling="mean",
    )
    out = run_isolated(cfg, mmap_threshold=MALLOC_MMAP_THRESHOLD)
    assert out.status == "complete", out.error
    assert out.peak_memory_mb is not None and out.baseline_memory_mb is not None
    measured = (out.peak_memory_mb - out.baseline_memory_mb) * 2**20
    estimate = estimate_peak_memory(tiny_info(info), cfg, device_type="cpu").total_bytes
    ratio = estimate / measured
    print(f"estimate {estimate / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB: {ratio:.3f}")
    assert TARGET_LOW <= ratio <= NO_WRONG_SKIP, (estimate / 2**20, measured / 2**20, ratio)
