"""The bi-encoder on tiny replicas: pooling, normalisation, prefixes, order, checkpointing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from _factories import KLUE_JSON
from _factories import SENTENCES
from _factories import trial_config

from search.record.config import TrialConfig
from search.record.models import MODELS
from search.train.encoder import BiEncoder
from search.train.encoder import ModelLoadError
from search.train.tiny import build_tiny_replica


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """ko-simcse (RoBERTa, CLS) and multilingual-e5-small (BERT, mean, normalised, prefixes)."""
    texts = SENTENCES * 5
    if KLUE_JSON.is_file():
        records = json.loads(KLUE_JSON.read_text(encoding="utf-8"))[:1000]
        texts = [r["premise"] for r in records] + [r["hypothesis"] for r in records]
    cache = tmp_path_factory.mktemp("tiny")
    names = ("ko-simcse", "multilingual-e5-small")
    return {name: build_tiny_replica(MODELS[name], cache, texts) for name in names}


def make_config(name: str, path: Path | str, **overrides: Any) -> TrialConfig:
    """The trial config of ``name`` with its pooling and prefixes, loading ``path``."""
    base = dict(batch_size=4, warmup_ratio=0.1, weight_decay=0.01)
    return trial_config(model=name, model_path=str(path), **(base | overrides))


@pytest.fixture(scope="module")
def simcse(replicas: dict[str, Path]) -> BiEncoder:
    return BiEncoder.from_config(make_config("ko-simcse", replicas["ko-simcse"]))


@pytest.fixture(scope="module")
def e5(replicas: dict[str, Path]) -> BiEncoder:
    name = "multilingual-e5-small"
    return BiEncoder.from_config(make_config(name, replicas[name]))


def test_cls_pooling_is_the_first_hidden_state(simcse: BiEncoder) -> None:
    assert simcse.pooling == "cls" and not simcse.normalize
    batch = simcse.tokenize(SENTENCES[:3], kind="passage", max_len=64)
    with torch.no_grad():
        hidden = simcse.model(**batch).last_hidden_state
        pooled = simcse(batch["input_ids"], batch["attention_mask"])
    assert pooled.shape == (3, 64)
    torch.testing.assert_close(pooled, hidden[:, 0])


def test_mean_pooling_averages_the_real_tokens_only(replicas: dict[str, Path]) -> None:
    path = replicas["multilingual-e5-small"]
    cfg = make_config("multilingual-e5-small", path, normalize=False)
    encoder = BiEncoder.from_config(cfg)
    batch = encoder.tokenize([SENTENCES[1], SENTENCES[5]], kind="passage", max_len=64)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert lengths[0] < lengths[1]  # the first row is padded
    with torch.no_grad():
        hidden = encoder.model(**batch).last_hidden_state
        pooled = encoder(batch["input_ids"], batch["attention_mask"])
        alone = encoder.encode([SENTENCES[1]], kind="passage", max_len=64)
    by_hand = torch.stack([hidden[i, :n].sum(dim=0) / n for i, n in enumerate(lengths)])
    torch.testing.assert_close(pooled, by_hand)
    torch.testing.assert_close(pooled[0], alone[0], atol=1e-5, rtol=1e-4)  # padding ignored
    assert not torch.allclose(pooled[0], hidden[0].mean(dim=0))  # not the unmasked mean


def test_normalize_gives_unit_norms(e5: BiEncoder, simcse: BiEncoder) -> None:
    assert e5.normalize
    norms = e5.encode(SENTENCES, kind="query", max_len=32).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(len(SENTENCES)))
    raw = simcse.encode(SENTENCES, kind="query", max_len=32).norm(dim=-1)
    assert (raw - 1).abs().max() > 0.1


def test_e5_prefixes_are_applied(e5: BiEncoder) -> None:
    assert (e5.query_prefix, e5.passage_prefix) == ("query: ", "passage: ")
    text = SENTENCES[2]
    query = e5.tokenize([text], kind="query", max_len=64)["input_ids"][0].tolist()
    passage = e5.tokenize([text], kind="passage", max_len=64)["input_ids"][0].tolist()
    assert query == e5.tokenizer("query: " + text)["input_ids"]
    assert passage == e5.tokenizer("passage: " + text)["input_ids"]
    bare = e5.tokenizer(text)["input_ids"]
    assert len(query) > len(bare) and query[-len(bare) + 1 :] == bare[1:]
    embeddings = e5.encode([text, text], kind="query", max_len=64)
    assert not torch.allclose(embeddings[0], e5.encode([text], kind="passage", max_len=64)[0])


def test_tokenize_truncates_and_pads(simcse: BiEncoder) -> None:
    batch = simcse.tokenize(SENTENCES[:2], kind="query", max_len=8)
    assert batch["input_ids"].shape == (2, 8)  # both longer than 8 tokens
    assert set(batch) == {"input_ids", "attention_mask"}
    short = simcse.tokenize(["흡연", "도서관은 월요일마다 휴관합니다."], kind="query", max_len=64)
    mask = short["attention_mask"]
    assert short["input_ids"].shape[1] == int(mask.sum(dim=1).max()) < 64  # to the longest
    assert mask[0, 0] == 1 and mask[0, -1] == 0  # padded on the right
    padded = simcse.tokenize(["흡연"], kind="query", max_len=64, pad_to_max_length=True)
    assert padded["input_ids"].shape == (1, 64)
    assert padded["input_ids"][0, -1] == simcse.tokenizer.pad_token_id
    with pytest.raises(ValueError, match="max_len"):
        simcse.tokenize(["흡연"], kind="query", max_len=513)  # 514 positions: 512 tokens
    assert simcse.max_tokens == 512


def test_encode_returns_the_input_order_and_restores_the_mode(e5: BiEncoder) -> None:
    texts = [SENTENCES[i] for i in (3, 0, 9, 5, 1, 7, 2)]  # lengths out of order
    e5.train()
    embeddings = e5.encode(texts, kind="passage", max_len=64, batch_size=3)
    assert e5.training and e5.model.training
    one_by_one = torch.cat([e5.encode([t], kind="passage", max_len=64) for t in texts])
    torch.testing.assert_close(embeddings, one_by_one, atol=1e-5, rtol=1e-4)
    e5.eval()
    assert e5.encode([], kind="query", max_len=16).shape == (0, 64)
    assert not e5.training


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(
    replicas: dict[str, Path],
) -> None:
    path = replicas["ko-simcse"]
    queries, passages = SENTENCES[:4], SENTENCES[4:8]

    def loss_and_grads(checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # transformers' forward, whose layer modules the hook sees (the padding-free forward's
        # checkpointing: tests/test_fast_step.py)
        cfg = make_config(
            "ko-simcse", path, gradient_checkpointing=checkpointing, padding_free=False
        )
        encoder = BiEncoder.from_config(cfg)
        model = encoder.model
        flag = getattr(model, "is_activation_checkpointing", None)
        if flag is None:  # transformers < 5.24
            flag = model.is_gradient_checkpointing
        assert flag == checkpointing
        encoder.train()  # dropout on: the recomputation must replay the same masks
        calls: list[int] = []
        attention = model.get_submodule("encoder.layer.0.attention")  # inside the checkpoint
        attention.register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(0)
        q = encoder(**encoder.tokenize(queries, kind="query", max_len=32))  # (4, hidden)
        p = encoder(**encoder.tokenize(passages, kind="passage", max_len=32))  # (4, hidden)
        loss = F.cross_entropy(q @ p.T / 0.05, torch.arange(4))
        loss.backward()
        assert len(calls) == (4 if checkpointing else 2)  # recomputed in the backward pass
        grads = {n: w.grad for n, w in encoder.named_parameters() if w.grad is not None}
        return loss.detach(), grads

    loss, grads = loss_and_grads(False)
    loss_ckpt, grads_ckpt = loss_and_grads(True)
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_missing_path_raises_a_one_line_fix(tmp_path: Path) -> None:
    cfg = make_config("ko-simcse", tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError) as caught:
        BiEncoder.from_config(cfg)
    message = str(caught.value)
    assert "\n" not in message
    assert "no such directory" in message and str(tmp_path / "no-such-model") in message
    assert "hf download BM-K/KoSimCSE-roberta" in message
    assert "models.ko-simcse.path" in message and "--tiny" in message


def test_empty_directory_raises_a_one_line_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no complete model") as caught:
        BiEncoder.from_config(make_config("multilingual-e5-small", tmp_path))
    assert "\n" not in str(caught.value)
    assert "hf download intfloat/multilingual-e5-small" in str(caught.value)


def test_undownloaded_hub_id_offline_raises_a_one_line_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub_id = "search-tests/never-downloaded-encoder"
    with pytest.raises(ModelLoadError) as caught:
        BiEncoder.from_config(make_config("bge-m3-ko", hub_id))
    message = str(caught.value)
    assert "\n" not in message
    assert "not in the local Hugging Face cache" in message
    assert f"hf download {hub_id}" in message
    assert "models.bge-m3-ko.path" in message and "--tiny" in message


def test_rejects_unknown_pooling(simcse: BiEncoder) -> None:
    with pytest.raises(ValueError, match="pooling"):
        BiEncoder(simcse.model, simcse.tokenizer, pooling="max")


def test_last_token_pooling_takes_the_last_real_token(replicas: dict[str, Path]) -> None:
    path = replicas["multilingual-e5-small"]
    encoder = BiEncoder.from_config(make_config("e5-last", path, pooling="last-token")).eval()
    assert encoder.pooling == "last-token"
    batch = encoder.tokenize([SENTENCES[1], SENTENCES[5]], kind="passage", max_len=64)
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert lengths[0] < lengths[1]  # the first row is padded on the right
    with torch.no_grad():
        hidden = encoder.model(**batch).last_hidden_state
        pooled = encoder(batch["input_ids"], batch["attention_mask"])
        alone = encoder.encode([SENTENCES[1]], kind="passage", max_len=64)
    by_hand = torch.stack([hidden[i, n - 1] for i, n in enumerate(lengths)])
    torch.testing.assert_close(pooled, by_hand)
    torch.testing.assert_close(pooled[0], alone[0], atol=1e-5, rtol=1e-4)  # padding ignored
    assert not torch.allclose(pooled[0], hidden[0, -1])  # not the padded last position
    # Left padding (decoder tokenizers): the last position is the last real token.
    ids, mask = batch["input_ids"][0], batch["attention_mask"][0]
    n = int(mask.sum())
    left_ids = torch.cat([ids[n:], ids[:n]]).unsqueeze(0)
    left_mask = torch.cat([mask[n:], mask[:n]]).unsqueeze(0)
    with torch.no_grad():
        left = encoder(left_ids, left_mask)
        left_hidden = encoder.model(input_ids=left_ids, attention_mask=left_mask)
    torch.testing.assert_close(left[0], left_hidden.last_hidden_state[0, -1].float())


def test_the_specs_attention_reaches_the_encoder(replicas: dict[str, Path]) -> None:
    from search.sampling.space import SampledParams
    from search.sampling.space import build_config
    from search.spec.load import load_spec
    from search.spec.study_spec import shipped_spec_path

    spec = load_spec(shipped_spec_path("ko-retrieval"))
    params = SampledParams("ko-simcse", 32, 128, 5e-5, 0.05, 0.1, 0.01)
    path = str(replicas["ko-simcse"])
    default = build_config(spec, params, model_path=path)
    assert default.attn_implementation is None
    loaded = BiEncoder.from_config(default).model.config._attn_implementation
    assert loaded == "sdpa"  # RobertaModel has SDPA: the default where the class has it
    entry = spec.models["ko-simcse"].model_copy(update={"attn_implementation": "eager"})
    eager_spec = spec.model_copy(update={"models": {**spec.models, "ko-simcse": entry}})
    eager = build_config(eager_spec, params, model_path=path)
    assert eager.attn_implementation == "eager"
    assert TrialConfig.from_json(eager.to_json()) == eager  # recorded, and so retrained alike
    assert BiEncoder.from_config(eager).model.config._attn_implementation == "eager"
