"""The gradient cache: the plain step's loss and gradients, in the memory of a mini-batch."""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Any

import pytest
import torch
from _cli import run_search
from _factories import trial_config

from search.record.config import TrialConfig
from search.record.models import MODELS
from search.train.encoder import BiEncoder
from search.train.loop import StepBatch
from search.train.loop import make_scaler
from search.train.loop import train_step
from search.train.losses import CachedInfoNCELoss
from search.train.losses import InfoNCELoss
from search.train.losses.cached_infonce import mini_batches
from search.train.tiny import build_tiny_replica
from search.worker.isolation import MALLOC_MMAP_THRESHOLD
from search.worker.isolation import run_isolated

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytestmark = pytest.mark.train

MODEL = "multilingual-minilm"  # mean pooling: every token's activations reach the loss
MIB = 2**20
BATCH = 12  # queries of the in-process checks (12 positives + 12 hard negatives)
ROWS = 5  # mini-batch of the in-process checks: uneven on purpose (5, 5, 2)
HERE = "test_gradient_cache"  # the trial process imports one_thread_train by this name


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread: None) -> None:
    """Every test of this module on one torch thread (conftest)."""


def one_thread_train(cfg: TrialConfig, **kwargs: Any) -> Any:
    """The real objective on one thread (two busy-waiting threads crawl on a loaded machine)."""
    from search.train.loop import train

    torch.set_num_threads(1)
    return train(cfg, **kwargs)


def _sentences(n: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    syllables = [chr(0xAC00 + i * 37) for i in range(300)]
    return [
        " ".join(
            "".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
            for _ in range(rng.randint(words // 2, words))
        )
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """256 Korean-syllable training examples (one hard negative), a BEIR split, a replica."""
    root = tmp_path_factory.mktemp("gradcache")
    queries, positives, negatives = (_sentences(256, w, s) for w, s in ((8, 1), (30, 2), (30, 3)))
    with open(root / "train.jsonl", "w", encoding="utf-8") as f:
        for q, p, n in zip(queries, positives, negatives, strict=True):
            row = {"query": q, "positive": p, "negatives": [n]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (root / "eval" / "qrels").mkdir(parents=True)
    docs = _sentences(20, 20, 4)
    with open(root / "eval" / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"_id": f"d{i}", "text": text}, ensure_ascii=False) + "\n")
    with open(root / "eval" / "queries.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(_sentences(5, 6, 5)):
            f.write(json.dumps({"_id": f"q{i}", "text": text}, ensure_ascii=False) + "\n")
    qrels = "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(5))
    (root / "eval" / "qrels" / "test.tsv").write_text(qrels, encoding="utf-8")
    replica = build_tiny_replica(MODELS[MODEL], root / "replicas", queries + positives + docs)
    return {
        "model_path": str(replica),
        "train_path": str(root / "train.jsonl"),
        "eval_dir": str(root / "eval"),
        "texts": (queries, positives, negatives),
    }


def _cfg(setup: dict[str, Any], **changes: Any) -> TrialConfig:
    paths = {k: setup[k] for k in ("model_path", "train_path", "eval_dir")}
    base = dict(model=MODEL, batch_size=BATCH, lr=1e-3, hard_negatives=1, **paths)
    return trial_config(**(base | changes))


def _model_and_batch(
    setup: dict[str, Any], *, checkpointing: bool = False
) -> tuple[BiEncoder, StepBatch]:
    cfg = _cfg(setup, gradient_checkpointing=checkpointing)
    model = BiEncoder.from_config(cfg)
    model.train()  # dropout on: the two passes must draw the same masks
    queries, positives, negatives = (t[:BATCH] for t in setup["texts"])
    q = model.tokenize(queries, kind="query", max_len=cfg.max_len)
    p = model.tokenize(positives + negatives, kind="passage", max_len=cfg.max_len)
    batch = StepBatch((q["input_ids"], q["attention_mask"]), (p["input_ids"], p["attention_mask"]))
    return model, batch


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _plain(model: BiEncoder, batch: StepBatch, *, rows: int | None = None) -> torch.Tensor:
    """The loss with every activation kept; with ``rows``, embedded in those mini-batches."""
    if rows is None:
        q_emb, p_emb = model(*batch.queries), model(*batch.passages)
    else:
        q_emb, p_emb = (
            torch.cat([model(ids, mask) for ids, mask in mini_batches(tokens, rows)])
            for tokens in (batch.queries, batch.passages)
        )
    loss = InfoNCELoss(0.05)(q_emb, p_emb[: batch.size], p_emb[batch.size :])
    loss.backward()
    return loss.detach()


def _cached(model: BiEncoder, batch: StepBatch, rows: int) -> torch.Tensor:
    loss = CachedInfoNCELoss(model, 0.05, mini_batch_size=rows)(batch.queries, batch.passages)
    loss.backward()
    return loss.detach()


def _assert_same(
    loss: torch.Tensor, grads: dict[str, torch.Tensor], ref: torch.Tensor, ref_grads: dict
) -> None:
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, grad in grads.items():  # atol: sums over every token, added in another order
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-3 * scale + 1e-8)


def test_dropout_is_on_so_the_masks_matter(setup: dict[str, Any]) -> None:
    model, batch = _model_and_batch(setup)
    with torch.no_grad():
        assert not torch.allclose(model(*batch.queries), model(*batch.queries))


def test_one_mini_batch_is_the_plain_step(setup: dict[str, Any]) -> None:
    model, batch = _model_and_batch(setup)
    torch.manual_seed(7)
    ref, ref_grads = _plain(model, batch), _grads(model)
    torch.manual_seed(7)
    loss = _cached(model, batch, rows=3 * BATCH)
    _assert_same(loss, _grads(model), ref, ref_grads)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_mini_batches_give_the_gradient_of_the_same_dropout_masks(
    setup: dict[str, Any], checkpointing: bool
) -> None:
    model, batch = _model_and_batch(setup, checkpointing=checkpointing)
    torch.manual_seed(7)
    ref, ref_grads = _plain(model, batch, rows=ROWS), _grads(model)
    torch.manual_seed(7)
    loss = _cached(model, batch, rows=ROWS)
    _assert_same(loss, _grads(model), ref, ref_grads)
    # The random state after the step is the plain step's: the next step draws alike too.
    after_cached = torch.rand(3)
    torch.manual_seed(7)
    _plain(model, batch, rows=ROWS)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(torch.rand(3), after_cached)


def test_without_dropout_mini_batches_equal_the_full_batch(setup: dict[str, Any]) -> None:
    model, batch = _model_and_batch(setup)
    model.eval()
    ref, ref_grads = _plain(model, batch), _grads(model)
    loss = _cached(model, batch, rows=ROWS)
    _assert_same(loss, _grads(model), ref, ref_grads)


def test_train_step_with_the_cache_moves_the_weights_as_the_plain_step(
    setup: dict[str, Any],
) -> None:
    """The loop's step, SGD (clipped), dropout on: the same weights after two steps."""
    after = []
    for rows in (0, 3 * BATCH):
        model, batch = _model_and_batch(setup)
        cfg = _cfg(setup, gradient_cache=rows)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        torch.manual_seed(11)
        losses = [
            train_step(model, batch, cfg, optimizer, make_scaler(torch.device("cpu"), None))
            for _ in range(2)
        ]
        after.append((torch.stack(losses), dict(model.named_parameters())))
    (plain_losses, plain), (cached_losses, cached) = after
    torch.testing.assert_close(cached_losses, plain_losses, rtol=1e-5, atol=1e-6)
    start = _model_and_batch(setup)[0].state_dict()
    moved = 0
    for name, weight in cached.items():
        torch.testing.assert_close(weight, plain[name], rtol=1e-4, atol=1e-6, msg=name)
        moved += int(not torch.equal(weight, start[name]))
    assert moved > 10  # the step did move the weights


# ------------------------------------------ memory, measured in isolated trials under a limit


def test_a_cached_batch_of_256_fits_where_the_plain_one_runs_out_of_memory(
    setup: dict[str, Any],
) -> None:
    """The real trial (fail-fast worst-case step at max_len) in a child process, on CPU.

    A plain batch of 256 (256 queries + 512 passages at 64 tokens) stores about 8x the
    activations of a plain batch of 32; with the cache and mini-batches of 32 rows, the peak is
    one mini-batch's activations plus the embedding store (768 x 64 floats and their gradients,
    under 1 MiB), so it stays at or below the plain batch of 32 (which holds 96 rows at once).
    """
    paths = {k: setup[k] for k in ("model_path", "train_path", "eval_dir")}
    base = _cfg(setup, max_len=64, **paths)

    def added_mb(cfg: TrialConfig, limit: int | None) -> tuple[str, float]:
        out = run_isolated(
            cfg,
            memory_limit_bytes=limit,
            objective=f"{HERE}:one_thread_train",
            mmap_threshold=MALLOC_MMAP_THRESHOLD,  # peaks compared: the reproducible ones
        )
        if out.status != "complete":
            return out.status, float("nan")
        assert out.peak_memory_mb is not None and out.baseline_memory_mb is not None
        return out.status, out.peak_memory_mb - out.baseline_memory_mb

    _, plain_32 = added_mb(dataclasses.replace(base, batch_size=32, max_train_samples=32), None)
    store_mb = 2 * (256 + 512) * 64 * 4 / MIB  # embeddings and their gradients, fp32
    # A limit of twice the plain batch of 32 (plus 150 MiB of slack: the address-space limit
    # counts reservations, not only resident pages): the cached 256 must fit, the plain not.
    limit = int((2 * plain_32 + 150) * MIB)
    cached = dataclasses.replace(base, batch_size=256, gradient_cache=32)
    status, cached_256 = added_mb(cached, limit)
    assert status == "complete"
    assert cached_256 <= plain_32 + store_mb, (cached_256, plain_32)
    status, _ = added_mb(dataclasses.replace(base, batch_size=256), limit)
    assert status == "oom"


# ------------------------------------------------ the spec, auto, and the large-batch study


def test_spec_setting_reaches_the_trial_config_per_model() -> None:
    from search.record.config import GRADIENT_CACHE_AUTO
    from search.sampling.space import SampledParams
    from search.sampling.space import build_config
    from search.spec.load import load_spec
    from search.spec.study_spec import shipped_spec_path

    spec = load_spec(shipped_spec_path("ko-retrieval-large-batch"))
    params = SampledParams("bge-m3-ko", 256, 256, 1e-5, 0.05, 0.1, 0.0)
    assert build_config(spec, params).gradient_cache == GRADIENT_CACHE_AUTO
    other = dataclasses.replace(params, model="ko-simcse", max_len=128)
    assert build_config(spec, other).gradient_cache == 0  # training.gradient_cache: off
    plain = load_spec(shipped_spec_path("ko-retrieval"))
    assert build_config(plain, dataclasses.replace(params, batch_size=64)).gradient_cache == 0


@pytest.mark.parametrize(
    ("value", "expected"), [("off", "off"), (False, "off"), ("auto", "auto"), (16, 16)]
)
def test_spec_values(value: object, expected: object) -> None:
    from search.spec.study_spec import TrainingSection

    assert TrainingSection(gradient_cache=value).gradient_cache == expected


def test_a_bad_spec_value_is_one_line_naming_file_field_and_value(tmp_path: Any) -> None:
    from search.spec.load import load_spec
    from search.spec.study_spec import SpecError
    from search.spec.study_spec import shipped_spec_path

    text = shipped_spec_path("ko-retrieval").read_text(encoding="utf-8")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        text.replace("  hard_negatives: 1\n", "  hard_negatives: 1\n  gradient_cache: 0\n")
    )
    with pytest.raises(SpecError) as err:
        load_spec(bad)
    message = str(err.value)
    assert "\n" not in message and "bad.yaml" in message
    assert "training.gradient_cache" in message and "0" in message


def test_auto_is_off_when_the_batch_fits_else_the_largest_mini_batch_that_does() -> None:
    from search.memory.device import DeviceInfo
    from search.memory.estimate import estimate_peak_memory
    from search.memory.preflight import preflight
    from search.memory.preflight import resolve_gradient_cache
    from search.record.config import GRADIENT_CACHE_AUTO
    from search.train.tiny import tiny_info

    arch = tiny_info(MODELS[MODEL])
    cfg = trial_config(
        model=MODEL,
        model_path="replica",
        batch_size=256,
        max_len=64,
        lr=1e-5,
        hard_negatives=1,
        train_path="t",
        eval_dir="e",
        gradient_cache=GRADIENT_CACHE_AUTO,
    )

    def cpu(free_mb: float) -> DeviceInfo:
        return DeviceInfo("cpu", "cpu", int(free_mb * MIB), int(free_mb * MIB))

    def mb(rows: int) -> float:
        return estimate_peak_memory(
            arch, dataclasses.replace(cfg, gradient_cache=rows), device_type="cpu"
        ).total_mb

    assert resolve_gradient_cache(cfg, arch, cpu(10 * mb(0))).gradient_cache == 0
    # Room for a 64-row mini-batch but not for 128 rows: 64.
    free = (mb(64) + mb(128)) / 2
    assert mb(64) < free < mb(128)
    assert resolve_gradient_cache(cfg, arch, cpu(free)).gradient_cache == 64
    # The preflight runs (and records) the resolved config.
    decision = preflight(cfg, arch, cpu(free), [])
    assert not decision.skip and decision.config is not None
    assert decision.config.gradient_cache == 64
    # A given mini-batch is kept as it is.
    fixed = dataclasses.replace(cfg, gradient_cache=8)
    assert resolve_gradient_cache(fixed, arch, cpu(1)) is fixed


def test_the_large_batch_study_differs_from_ko_retrieval_only_for_bge_m3_ko() -> None:
    """Structurally: the two YAML trees are equal once the three intended changes are undone."""
    import yaml

    from search.spec.load import load_spec
    from search.spec.study_spec import shipped_spec_path

    base = yaml.safe_load(shipped_spec_path("ko-retrieval").read_text(encoding="utf-8"))
    large = yaml.safe_load(
        shipped_spec_path("ko-retrieval-large-batch").read_text(encoding="utf-8")
    )
    # ko-retrieval keeps its restriction exactly.
    assert base["space"]["conditions"]["bge-m3-ko"]["batch_size"] == [32, 64]
    assert "gradient_cache" not in base["models"]["bge-m3-ko"]
    assert "gradient_cache" not in base.get("training", {})
    # The large-batch study: bge-m3-ko also at 128 and 256, always with the cache (auto).
    assert large["study"]["name"] == "ko-retrieval-large-batch"
    assert large["space"]["conditions"]["bge-m3-ko"]["batch_size"] == [32, 64, 128, 256]
    assert large["models"]["bge-m3-ko"]["gradient_cache"] == "auto"
    large["study"]["name"] = base["study"]["name"]
    large["space"]["conditions"]["bge-m3-ko"]["batch_size"] = [32, 64]
    del large["models"]["bge-m3-ko"]["gradient_cache"]
    assert large == base
    spec = load_spec(shipped_spec_path("ko-retrieval-large-batch"))  # and it loads
    assert spec.space.choices_for("bge-m3-ko")["batch_size"] == [32, 64, 128, 256]


@pytest.mark.train
def test_search_run_resolves_auto_to_a_mini_batch_that_fits(tmp_path: Any) -> None:
    """``gradient_cache: auto`` end to end: ``search run`` under a memory limit where the plain
    batch of 128 does not fit resolves the cache in the preflight, trains, and records it."""

    import optuna

    from search.record import attrs
    from search.record.trial_record import config_of
    from search.spec.study_spec import shipped_spec_path

    demo = shipped_spec_path("ko-retrieval").parent / "data" / "ko-demo"
    spec = tmp_path / "auto.yaml"
    spec.write_text(
        f"""study: {{name: auto-cache, n_trials: 1}}
models:
  ko-simcse: {{gradient_cache: auto}}
space:
  batch_size: [128]
  max_len: [128]
  lr: {{low: 1.0e-5, high: 2.0e-4, log: true}}
  temperature: {{low: 0.01, high: 0.1, log: true}}
  warmup_ratio: {{low: 0.0, high: 0.2}}
  weight_decay: {{low: 0.0, high: 0.1}}
training: {{epochs: 1, amp: false, hard_negatives: 1, seed: 0, max_train_samples: 256}}
data: {{train: {demo / "train.jsonl"}, eval: {demo}, split: test}}
sampler: {{type: random, seed: 0}}
pruner: {{type: none}}
""",
        encoding="utf-8",
    )
    db = tmp_path / "a.db"
    args = ["--spec", str(spec), "--tiny", "--device", "cpu", "--memory-limit", "400MiB"]
    args += ["--storage", f"sqlite:///{db}"]
    done = run_search("run", *args, env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    study = optuna.load_study(study_name="auto-cache-tiny", storage=f"sqlite:///{db}")
    (trial,) = study.get_trials()
    config = config_of(trial) or {}
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get(attrs.ERROR)
    assert config["batch_size"] == 128
    rows = config["gradient_cache"]
    assert 1 <= rows < 128 and rows & (rows - 1) == 0  # a power-of-two mini-batch, not off
    assert trial.user_attrs[attrs.MEMORY_ESTIMATE_MB] <= 400  # the cached estimate fits
