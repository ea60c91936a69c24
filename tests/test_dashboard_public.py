"""``search dashboard --public``: the warning says what is exposed (issue 18).

optuna-dashboard serves the artifact store, and the kept trained models are in it: anyone who
reaches a public dashboard can download them. (tests/test_dashboard_browser.py runs the real
server with ``--public`` and reads the warning from its stderr.)
"""

from __future__ import annotations

import pytest

from search.observe.dashboard import DashboardError
from search.observe.dashboard import check_host


def test_the_public_warning_says_the_kept_models_can_be_downloaded() -> None:
    warning = check_host("0.0.0.0", public=True)
    assert warning is not None and warning.startswith("warning: the dashboard has no login")
    assert "download the trained models it keeps" in warning
    assert "\n" not in warning


def test_loopback_needs_no_warning_and_a_public_host_needs_public() -> None:
    assert check_host("127.0.0.1", public=False) is None
    with pytest.raises(DashboardError, match="add --public"):
        check_host("0.0.0.0", public=False)
