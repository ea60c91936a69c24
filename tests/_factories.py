"""Builders shared by the tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy.pool import NullPool

from search.record.config import TrialConfig
from search.record.models import MODELS
from storage import redact_url

# The PostgreSQL the marked tests use (.ci/run creates the database).
PG_URL = os.environ.get("SEARCH_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/search_test")
# The shared data directory (KLUE-NLI is read in place from it); overridable to test its absence.
SHARED_DATA = Path(
    os.environ.get("SEARCH_TEST_SHARED_DATA", Path(__file__).parents[1].parent / "shared/data")
)
KLUE_JSON = SHARED_DATA / "klue-nli/klue-nli-v1.1_dev.json"
# Korean sentences for tokenizers and encoders when the KLUE file is absent.
SENTENCES = [
    "흡연자분들은 발코니가 있는 방이면 발코니에서 흡연이 가능합니다.",
    "어떤 방에서도 흡연은 금지됩니다.",
    "오늘 서울의 날씨는 맑고 따뜻합니다.",
    "내일은 전국에 비가 올 예정입니다.",
    "검색 모델은 질문과 문서를 같은 공간에 임베딩합니다.",
    "한국어 문장을 토큰으로 나누는 방법은 여러 가지가 있습니다.",
    "이 식당은 주말에 사람이 많아서 예약이 필요합니다.",
    "지하철역에서 숙소까지 걸어서 5분 정도 걸립니다.",
    "회의는 오후 세 시에 시작해서 한 시간 동안 진행됩니다.",
    "도서관은 월요일마다 휴관합니다.",
]


# Driver messages that mean no server answered (vs one that answered and refused).
_UNREACHABLE = (
    "connection refused",
    "timeout expired",
    "could not translate host name",
    "name or service not known",
    "no route to host",
    "network is unreachable",
    "no such file or directory",  # a Unix socket that is not there
)


def ci() -> bool:
    """True under CI (``CI`` set to anything but empty, 0, false or no)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def ensure_pg_database(url: str, timeout: int = 3) -> str | None:
    """Connect to ``url``, creating its database when the server is reachable but lacks it.

    Returns None when the database is usable, else the real cause in one line: the server is
    unreachable, or the database is missing and could not be created (and why), or it exists
    and refused the connection.
    """
    shown = redact_url(url)
    target = sqlalchemy.engine.make_url(url)
    first = _connect_error(url, timeout)
    if first is None:
        return None
    missing = f'database "{target.database}" does not exist' in first
    admin = sqlalchemy.create_engine(
        target.set(database="postgres"),
        poolclass=NullPool,
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": timeout},
    )
    try:
        conn = admin.connect()
    except sqlalchemy.exc.SQLAlchemyError as exc:
        admin.dispose()
        if missing:
            return (
                f"database {target.database!r} missing at {shown} and could not be created "
                f"(no connection to the 'postgres' database: {_first(exc)})"
            )
        if any(sign in first.lower() for sign in _UNREACHABLE):
            return f"PostgreSQL server unreachable at {shown}: {first}"
        return f"PostgreSQL at {shown} refused the connection: {first}"
    try:
        with conn:
            exists = conn.execute(
                sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :name"),
                {"name": target.database},
            ).scalar()
            if exists:
                return f"database {target.database!r} exists at {shown} but refused: {first}"
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{target.database}"'))
    except sqlalchemy.exc.SQLAlchemyError as exc:
        if _connect_error(url, timeout) is None:  # created meanwhile by another process
            return None
        return (
            f"database {target.database!r} missing at {shown} and could not be created: "
            f"{_first(exc)}"
        )
    finally:
        admin.dispose()
    return _connect_error(url, timeout)


@contextmanager
def fresh_pg_database(pg_url: str, prefix: str = "search_test") -> Iterator[str]:
    """A new, empty database ``<prefix>_<random>`` on ``pg_url``'s server, as ``pg_url`` with
    that database; dropped afterwards, its connections cut (``WITH (FORCE)``)."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    url = sqlalchemy.engine.make_url(pg_url)
    admin = sqlalchemy.create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        try:
            yield url.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def _connect_error(url: str, timeout: int) -> str | None:
    engine = sqlalchemy.create_engine(
        url, poolclass=NullPool, connect_args={"connect_timeout": timeout}
    )
    try:
        with engine.connect():
            return None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        return _first(exc)
    finally:
        engine.dispose()


def _first(exc: BaseException) -> str:
    """The first non-empty line of an error (psycopg's detail follows on later lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def kept_files_dir(tmp_path_factory: Any, name: str) -> Path:
    """Where a test keeps files for a person to look at: ``$SEARCH_TEST_ARTIFACTS/NAME`` (CI
    sets it), else a tmp directory."""
    root = os.environ.get("SEARCH_TEST_ARTIFACTS")
    path = Path(root) / name if root else tmp_path_factory.mktemp(name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def trial_config(**over: Any) -> TrialConfig:
    """A small CPU TrialConfig (ko-simcse unless ``model`` says otherwise), fields overridable.

    Pooling, normalisation and prefixes follow the model's facts unless given.
    """
    model = over.get("model", "ko-simcse")
    info = MODELS.get(model)
    base: dict[str, Any] = dict(
        model=model,
        model_path="unused",
        batch_size=8,
        max_len=32,
        lr=1e-4,
        temperature=0.05,
        warmup_ratio=0.0,
        weight_decay=0.0,
        epochs=1,
        amp=False,
        gradient_checkpointing=False,
        hard_negatives=0,
        seed=0,
        device="cpu",
        train_path="unused",
        eval_dir="unused",
    )
    if info is not None:
        base.update(
            pooling=info.pooling,
            normalize=info.normalize,
            query_prefix=info.query_prefix,
            passage_prefix=info.passage_prefix,
        )
    base.update(over)
    return TrialConfig(**base)


def bge_cuda_config(**over: Any) -> TrialConfig:
    """A bge-m3-ko CUDA config (32 x 256, AMP) whose weights path is never loaded."""
    base: dict[str, Any] = dict(
        model="bge-m3-ko",
        model_path="/nonexistent/bge-m3-ko",
        batch_size=32,
        max_len=256,
        lr=2e-5,
        warmup_ratio=0.1,
        weight_decay=0.01,
        amp=True,
        device="cuda",
        train_path="t.jsonl",
        eval_dir="eval",
    )
    return trial_config(**(base | over))
