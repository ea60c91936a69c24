"""What writing a trial's record costs: one upsert per table vs one per attribute.

A worker writes each trial's record (the claimed config, then the outcome: ~18 user attributes
and a system one) through ``ResilientRDBStorage.set_trial_attrs``. Three ways, same trial
shape, alternating round by round on one storage:

* ``batched``: the product's ``set_trial_attrs`` (``storage.compat.set_trial_attrs_in``: the
  trial read once, one ``INSERT ... ON CONFLICT DO UPDATE`` per table);
* ``per-attr``: the same transaction written one attribute at a time with the product's
  ``storage.compat.set_trial_attr_in`` (Optuna's ``_set_trial_attr_without_commit``: a read
  of the trial and an upsert per attribute), the path before;
* ``optuna``: what a plain Optuna user does, ``set_trial_user_attr`` / ``set_trial_system_attr``
  per attribute, each its own transaction.

Run::

    python bench/bench_trial_attrs.py                      # SQLite in a temporary directory
    python bench/bench_trial_attrs.py --url postgresql://postgres@127.0.0.1:5432/attrbench

Prints the median milliseconds per record of each way and the ratios to ``batched``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optuna.study import StudyDirection

from storage import ResilientRDBStorage
from storage import StorageError
from storage import create_storage
from storage.compat import scoped_session
from storage.compat import set_trial_attr_in


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _record(n_user: int) -> tuple[dict[str, Any], dict[str, Any]]:
    user = {f"attr_{i}": ("x" * 20 if i % 2 else i * 1.5) for i in range(n_user)}
    system = {"search:config": {"model": "m", "lr": 1e-4, "batch_size": 32, "x": list(range(30))}}
    return user, system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="storage URL (default: a new SQLite file)")
    parser.add_argument("--rounds", type=_positive, default=40)
    parser.add_argument("--attrs", type=_positive, default=18, help="user attributes per record")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite:///{Path(tmp) / 'attrs.db'}"
        try:
            store = create_storage(url, heartbeat_interval=None)
        except StorageError as exc:
            parser.exit(2, f"error: {exc}\n")
        if not isinstance(store, ResilientRDBStorage):
            parser.exit(2, f"error: --url {url!r}: an SQLite or PostgreSQL URL, not a proxy\n")
        sid = store.create_new_study([StudyDirection.MAXIMIZE], f"bench-attrs-{uuid.uuid4().hex}")
        user, system = _record(args.attrs)

        def batched(tid: int) -> None:
            store.set_trial_attrs(tid, user, system)

        def per_attr(tid: int) -> None:
            with scoped_session(store, ignore_integrity_error=True) as session:
                for is_system, values in ((False, user), (True, system)):
                    for key, value in values.items():
                        set_trial_attr_in(store, session, tid, key, value, system=is_system)

        def optuna_calls(tid: int) -> None:
            for key, value in user.items():
                store.set_trial_user_attr(tid, key, value)
            for key, value in system.items():
                store.set_trial_system_attr(tid, key, value)

        ways: dict[str, Callable[[int], None]] = {
            "batched": batched,
            "per-attr": per_attr,
            "optuna": optuna_calls,
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        for r in range(args.rounds):
            order = list(ways)[r % 3 :] + list(ways)[: r % 3]  # rotate who goes first
            for name in order:
                tid = store.create_new_trial(sid)
                start = time.perf_counter()
                ways[name](tid)
                times[name].append(time.perf_counter() - start)
                got = store.get_trial(tid)
                assert got.user_attrs == user, name  # every way wrote the whole record
        backend = url.split(":", 1)[0]
        print(f"{backend}: {args.attrs} user + 1 system attributes, {args.rounds} rounds")
        base = statistics.median(times["batched"])
        for name, ts in times.items():
            median = statistics.median(ts)
            print(
                f"  {name:9s} {1000 * median:7.2f} ms per record (min {1000 * min(ts):6.2f})"
                f"  x{median / base:5.2f} of batched"
            )


if __name__ == "__main__":
    main()
