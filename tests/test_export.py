"""A trial's saved model is a sentence-transformers model that scores like the service's encoder.

Each case trains a tiny replica for real (``train`` with ``save_dir``: the hook the worker
uses), loads the directory with the installed sentence-transformers, and compares its
embeddings and cosine scores of Korean queries and passages with ``BiEncoder.encode`` on the
same weights: a CLS-pooled model without prefixes (ko-simcse) and a mean-pooled, normalised
model with e5's ``query: `` / ``passage: `` prefixes as prompts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from _factories import SENTENCES
from _factories import trial_config

from search.record.models import MODELS
from search.spec.study_spec import PACKAGE_DIR
from search.train.data import load_train
from search.train.encoder import BiEncoder
from search.train.export import SEARCH_JSON
from search.train.export import read_search_json
from search.train.loop import train
from search.train.tiny import build_tiny_replica

DEMO = PACKAGE_DIR / "studies/data/ko-demo"
QUERIES = [
    "GPS는 누가 만들었나요?",
    "전주에 가면 어디를 구경하면 좋을까요?",
    "도서관은 언제 쉬나요?",
]
PASSAGES = SENTENCES[:6]
# float32 through the same weights; only summation order differs between the two pipelines.
ATOL = 1e-5


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    cache = tmp_path_factory.mktemp("tiny")
    texts = [t for ex in load_train(DEMO / "train.jsonl") for t in (ex.query, ex.positive)]
    return {
        name: build_tiny_replica(MODELS[name], cache, texts)
        for name in ("ko-simcse", "multilingual-e5-small")
    }


@pytest.mark.train
@pytest.mark.parametrize("model", ["ko-simcse", "multilingual-e5-small"])
def test_saved_model_loads_and_scores_like_the_service(
    model: str, replicas: dict[str, Path], tmp_path: Path
) -> None:
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "model"
    cfg = trial_config(
        model=model,
        model_path=str(replicas[model]),
        max_len=48,
        lr=1e-3,
        train_path=str(DEMO / "train.jsonl"),
        eval_dir=str(DEMO),
        max_train_samples=16,
        save_dir=str(out),
    )
    result = train(cfg)

    # search.json: the effective config (no save_dir), the metrics of each epoch.
    meta = read_search_json(out)
    assert meta is not None
    assert meta["config"]["model"] == model and "save_dir" not in meta["config"]
    assert meta["history"] == json.loads(json.dumps(result.history))
    assert (out / SEARCH_JSON).is_file()

    st = SentenceTransformer(str(out), device="cpu")
    service = BiEncoder.from_config(dataclasses.replace(cfg, model_path=str(out), save_dir=None))
    info = MODELS[model]
    assert st.max_seq_length == cfg.max_len
    assert st.default_prompt_name is None
    if info.query_prefix:
        assert st.prompts == {"query": info.query_prefix, "document": info.passage_prefix}

    q_st = st.encode_query(QUERIES, convert_to_tensor=True).cpu()
    p_st = st.encode_document(PASSAGES, convert_to_tensor=True).cpu()
    q_svc = service.encode(QUERIES, kind="query", max_len=cfg.max_len)
    p_svc = service.encode(PASSAGES, kind="passage", max_len=cfg.max_len)
    assert q_st.shape == (len(QUERIES), service.embedding_dim)
    assert p_st.shape == (len(PASSAGES), service.embedding_dim)
    torch.testing.assert_close(q_st, q_svc, atol=ATOL, rtol=0)
    torch.testing.assert_close(p_st, p_svc, atol=ATOL, rtol=0)
    torch.testing.assert_close(
        st.similarity(q_st, p_st),
        torch.nn.functional.cosine_similarity(q_svc[:, None], p_svc[None], dim=-1),
        atol=ATOL,
        rtol=0,
    )
    if info.query_prefix:  # the prompts matter: without them the embeddings differ
        plain = st.encode(QUERIES, convert_to_tensor=True).cpu()
        assert not torch.allclose(plain, q_svc, atol=1e-3)


def test_a_failed_save_leaves_the_trial_and_no_model(
    replicas: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A save that fails (here: save_dir is a file) prints one line and returns False."""
    from search.train.export import save_trial_model

    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    cfg = trial_config(model_path=str(replicas["ko-simcse"]), save_dir=str(blocked))
    encoder = BiEncoder.from_config(cfg)
    capsys.readouterr()  # the loading bar
    assert save_trial_model(encoder, cfg) is False
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("search: the trial's model was not saved:")
    assert blocked.read_text() == "not a directory"
