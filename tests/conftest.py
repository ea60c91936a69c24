"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import sqlalchemy
from _factories import PG_URL
from sqlalchemy.pool import NullPool

from storage import redact_url


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The test PostgreSQL URL (``SEARCH_TEST_PG_URL``), or skip with the reason."""
    engine = sqlalchemy.create_engine(
        PG_URL, poolclass=NullPool, connect_args={"connect_timeout": 3}
    )
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as exc:
        error = str(exc).splitlines()[0]
        pytest.skip(
            f"PostgreSQL unreachable at {redact_url(PG_URL)} (SEARCH_TEST_PG_URL): {error}"
        )
    finally:
        engine.dispose()
    return PG_URL
