"""How many workers one PostgreSQL study holds: N workers, straight on the database and through
``search proxy``.

Each worker is a process running the service's trial step as ``search worker`` does
(``search.worker.worker.Worker.open`` on ``create_storage``'s storage, then ``Worker.step``
until the budget is spent): the study opened with its budget, the stale-trial watcher thread,
the claim under the study's budget lock, sampling the ko-retrieval space, the preflight, the
trial record before and after "training" under the heartbeat thread, and the tell. Training is
the step's ``trainer``: ``time.sleep(--seconds)`` in-process, no trial child. The sampler is
``RandomSampler`` (the budget lock's cost, not TPE's fit time: that one is measured in
``bench_storage_latency.py``), the spec has no stages, no baseline trials are enqueued and the
preflight's estimate and frontier are off (a fake 24 GiB GPU: nothing is skipped). The budget is
``--per-worker`` trials per worker.

For each N and mode (``direct``: ``postgresql://``; ``proxy``: ``grpc://`` to a
``search proxy`` process started for the run) on a fresh database:

* trials/s from the barrier (every worker imported and waiting, the database's tables
  created) to the last worker's exit,
  against the ideal ``N / seconds`` (the anchor, same run): the ratio is the efficiency;
* claim latency (the step's claim returning a trial: lock wait + stale sweep + the trial
  list's one read + ask + first heartbeat), start latency (claimed to training: sampling, the
  preflight, the first record) and tell latency (training's end to the step's return: record +
  ``study.tell``), p50 / p99 over all trials;
* the budget lock: wait and hold per take (claims and the watchers' sweeps), p50 / p99, and
  its utilisation (sum of holds / wall time);
* peak database connections (``pg_stat_activity`` of the run's database, polled every 0.1 s);
* peak RSS per worker (and of the proxy);
* whether the budget came out exact (COMPLETE == budget, nothing RUNNING).

``direct`` is skipped where N workers would need more connections than the server allows
(about 3 per worker: main thread, heartbeat thread, watcher/lock), since on a shared server
that would starve every other client.

Run::

    python bench/bench_scale.py                       # N = 4, 16, 64, 128; 2 s trials
    python bench/bench_scale.py --n 4,16 --seconds 1 --per-worker 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_URL = os.environ.get(
    "SEARCH_BENCH_PG_URL",
    os.environ.get("SEARCH_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/search_test"),
)
CONNECTIONS_PER_WORKER = 3  # direct: what a worker holds at peak (measured at N=4 and 16)


# ------------------------------------------------------------------------------ the worker


def worker_main(argv: list[str]) -> int:
    """One worker: the service's trial step until the budget is spent, sleeping for training."""
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("study")
    parser.add_argument("--budget", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--barrier", type=Path, required=True)
    parser.add_argument("--heartbeat", type=int, default=2)
    parser.add_argument("--grace", type=int, default=20)
    args = parser.parse_args(argv)

    import random
    import resource
    from collections.abc import Iterator
    from contextlib import contextmanager

    import optuna

    import search.worker.budget as budget_module
    import search.worker.step as step_module
    from search.memory.device import DeviceInfo
    from search.record.config import TrialConfig
    from search.record.models import MODELS
    from search.spec.load import resolve_spec
    from search.spec.options import RunOptions
    from search.worker.isolation import TrialOutcome
    from search.worker.trainer import TrainHooks
    from search.worker.worker import Worker
    from storage import create_storage
    from storage import named_lock

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    waits: list[float] = []
    holds: list[float] = []
    sweeps: list[float] = []
    claims: list[float] = []
    marks: dict[str, float] = {}

    @contextmanager
    def timed_lock(storage: Any, name: str, **kwargs: Any) -> Iterator[None]:
        """The budget lock, timed (a hook for this benchmark only)."""
        asked = time.perf_counter()
        with named_lock(storage, name, **kwargs):
            got = time.perf_counter()
            waits.append(got - asked)
            try:
                yield
            finally:
                held = time.perf_counter() - got
                holds.append(held)
                if threading.current_thread().name == "stale-watcher":
                    sweeps.append(held)  # the watcher's sweep (adopt, stale query, fail)

    budget_module.named_lock = timed_lock  # type: ignore[assignment]
    step_claim = step_module.claim

    def timed_claim(*a: Any, **kw: Any) -> Any:
        """The step's claim, timed (a hook for this benchmark only)."""
        asked = time.perf_counter()
        taken = step_claim(*a, **kw)
        marks["claimed"] = time.perf_counter()
        if taken is not None:
            claims.append(marks["claimed"] - asked)
        return taken

    step_module.claim = timed_claim  # type: ignore[assignment]

    def sleep_trainer(cfg: TrialConfig, hooks: TrainHooks) -> TrialOutcome:
        """The "training": a sleep, in this process."""
        marks["training"] = time.perf_counter()
        time.sleep(args.seconds)
        marks["trained"] = time.perf_counter()
        score = {"ndcg@10": random.random()}
        return TrialOutcome("complete", metrics=score, history=[score], peak_memory_mb=1.0)

    spec = resolve_spec("ko-retrieval", None)
    spec = spec.model_copy(update={"stages": []})
    opts = RunOptions(
        storage_url=args.url,
        n_trials=args.budget,
        device="cuda",
        use_estimate=False,
        use_frontier=False,
        study_name=args.study,
    )
    gpu = DeviceInfo("cuda:0", "cuda:0 (fake, 24 GiB)", 24 * 2**30, 24 * 2**30)

    (args.barrier / str(os.getpid())).touch()
    while not (args.barrier / "go").exists():
        time.sleep(0.02)
    storage = create_storage(args.url, heartbeat_interval=args.heartbeat, grace_period=args.grace)
    starts: list[float] = []
    tells: list[float] = []
    with Worker.open(
        spec,
        opts,
        storage=storage,
        check_data=False,
        device=gpu,
        facts={model: MODELS[model] for model in spec.models},
        model_paths=dict.fromkeys(spec.models, "x"),
        trainer=sleep_trainer,
        sampler=optuna.samplers.RandomSampler(),
        pruner=optuna.pruners.NopPruner(),
        baselines=False,
        warm=False,
    ) as worker:
        while True:
            result = worker.step()
            if result.stopped:
                break
            if result.trained is not None:
                starts.append(marks["training"] - marks["claimed"])
                tells.append(time.perf_counter() - marks["trained"])
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary = {"claims": claims, "starts": starts, "tells": tells}
    summary |= {"waits": waits, "holds": holds, "sweeps": sweeps}
    print(json.dumps({**summary, "end": time.time(), "rss_mb": rss_kb / 1024}), flush=True)
    return 0


# ------------------------------------------------------------------------------ the driver


def _admin(url: str) -> Any:
    import sqlalchemy

    return sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")


def _fresh_db(url: str) -> str:
    import sqlalchemy

    name = f"bench_scale_{uuid.uuid4().hex[:8]}"
    with _admin(url).connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    return sqlalchemy.engine.make_url(url).set(database=name).render_as_string(False)


def _drop_db(admin_url: str, url: str) -> None:
    import sqlalchemy

    name = sqlalchemy.engine.make_url(url).database
    engine = _admin(admin_url)
    with engine.connect() as conn:
        conn.execute(
            sqlalchemy.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = :n AND pid <> pg_backend_pid()"
            ),
            {"n": name},
        )
        conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
    engine.dispose()


class ConnectionPoll(threading.Thread):
    """The peak number of connections to one database, polled every 0.1 s."""

    def __init__(self, admin_url: str, database: str) -> None:
        super().__init__(daemon=True)
        self._engine = _admin(admin_url)
        self._database = database
        self._stop_event = threading.Event()
        self.peak = 0
        self.missed = 0  # polls that failed

    def run(self) -> None:
        import sqlalchemy

        query = sqlalchemy.text("SELECT count(*) FROM pg_stat_activity WHERE datname = :n")
        while not self._stop_event.wait(0.1):
            try:  # a connection per poll: the server may be restarted by another job
                with self._engine.connect() as conn:
                    count = conn.execute(query, {"n": self._database}).scalar()
                self.peak = max(self.peak, int(count or 0))
            except sqlalchemy.exc.SQLAlchemyError:
                self.missed += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5)
        self._engine.dispose()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_proxy(db: str, n: int, tmp: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    port = _free_port()
    log = tmp / "proxy.out"
    threads = max(64, 4 * n)
    command = [sys.executable, "-m", "search.cli", "proxy", "--port", str(port)]
    command += ["--threads", str(threads)]
    env = {**os.environ, "SEARCH_STORAGE": db, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while "search proxy:" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the proxy did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    return proc, f"grpc://127.0.0.1:{port}", log


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run_one(admin_url: str, mode: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run: N workers on a fresh database, straight or through a proxy."""
    import optuna
    import sqlalchemy

    from search.record.counts import spent_count
    from storage import create_storage

    db = _fresh_db(admin_url)
    database = str(sqlalchemy.engine.make_url(db).database)
    schema = create_storage(db, heartbeat_interval=None)  # the tables, before the clock starts
    schema.engine.dispose()  # type: ignore[attr-defined]
    budget = n * args.per_worker
    proxy = None
    proxy_rss = float("nan")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        barrier = tmp / "barrier"
        barrier.mkdir()
        try:
            url = db
            if mode == "proxy":
                proxy, url, _ = _start_proxy(db, n, tmp)
            study = f"scale-{mode}-{n}"
            command = [sys.executable, __file__, "_worker", url, study, "--budget", str(budget)]
            command += ["--seconds", str(args.seconds), "--barrier", str(barrier)]
            command += ["--heartbeat", str(args.heartbeat), "--grace", str(args.grace)]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
            workers = [
                subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
                for _ in range(n)
            ]
            started = time.monotonic()
            while len(list(barrier.iterdir())) < n:
                if any(w.poll() is not None for w in workers):
                    raise RuntimeError("a worker died before the barrier")
                if time.monotonic() - started > 600:
                    raise RuntimeError("the workers did not reach the barrier in 600 s")
                time.sleep(0.1)
            imported_s = time.monotonic() - started
            poll = ConnectionPoll(admin_url, database)
            poll.start()
            go = time.time()
            (barrier / "go").touch()
            outs = []
            for w in workers:
                out, _ = w.communicate(timeout=args.timeout)
                outs.append(out)
            poll.stop()
            if proxy is not None:
                proxy_rss = _rss_mb(proxy.pid)
        finally:
            if proxy is not None:
                proxy.terminate()
                proxy.wait(30)
    results = [json.loads(o.strip().splitlines()[-1]) for o in outs if o.strip()]
    codes = [w.returncode for w in workers]
    end = max(r["end"] for r in results) if results else float("nan")
    store = create_storage(db, heartbeat_interval=None)
    trials = optuna.load_study(study_name=study, storage=store).get_trials(deepcopy=False)
    store.engine.dispose()  # type: ignore[attr-defined]
    _drop_db(admin_url, db)
    complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
    claims = [x for r in results for x in r["claims"]]
    starts = [x for r in results for x in r["starts"]]
    tells = [x for r in results for x in r["tells"]]
    waits = [x for r in results for x in r["waits"]]
    holds = [x for r in results for x in r["holds"]]
    sweeps = [x for r in results for x in r.get("sweeps", [])]
    wall = end - go
    return {
        "mode": mode,
        "n": n,
        "budget": budget,
        "seconds": args.seconds,
        "exit_codes_ok": all(c == 0 for c in codes),
        "exact": complete == budget and running == 0 and spent_count(trials) == budget,
        "wall_s": wall,
        "trials_per_s": complete / wall,
        "ideal_per_s": n / args.seconds,
        "claim_p50_ms": 1000 * _pct(claims, 0.5),
        "claim_p99_ms": 1000 * _pct(claims, 0.99),
        "start_p50_ms": 1000 * _pct(starts, 0.5),
        "start_p99_ms": 1000 * _pct(starts, 0.99),
        "tell_p50_ms": 1000 * _pct(tells, 0.5),
        "tell_p99_ms": 1000 * _pct(tells, 0.99),
        "lock_takes": len(holds),
        "lock_wait_p50_ms": 1000 * _pct(waits, 0.5),
        "lock_wait_p99_ms": 1000 * _pct(waits, 0.99),
        "lock_hold_p50_ms": 1000 * _pct(holds, 0.5),
        "lock_hold_p99_ms": 1000 * _pct(holds, 0.99),
        "lock_busy": sum(holds) / wall,
        "sweeps": len(sweeps),
        "sweep_hold_p50_ms": 1000 * _pct(sweeps, 0.5),
        "sweep_hold_p99_ms": 1000 * _pct(sweeps, 0.99),
        "peak_connections": poll.peak,
        "connection_polls_missed": poll.missed,
        "worker_rss_mb": statistics.median(r["rss_mb"] for r in results) if results else 0,
        "proxy_rss_mb": proxy_rss,
        "imported_s": imported_s,
    }


def _max_connections(url: str) -> int:
    import sqlalchemy

    with _admin(url).connect() as conn:
        return int(conn.execute(sqlalchemy.text("SHOW max_connections")).scalar())


def main() -> int:
    """Run every N and mode; print a table and one JSON line per run."""
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        return worker_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="admin URL of the PostgreSQL server")
    parser.add_argument("--n", default="4,16,64,128", help="worker counts")
    parser.add_argument("--modes", default="direct,proxy")
    parser.add_argument("--seconds", type=float, default=2.0, help="one fake trial")
    parser.add_argument("--per-worker", type=int, default=3, help="budget = N x this")
    parser.add_argument("--timeout", type=float, default=600, help="per run, seconds")
    parser.add_argument("--heartbeat", type=int, default=30, help="as compose's default")
    parser.add_argument("--grace", type=int, default=120, help="as compose's default")
    args = parser.parse_args()
    limit = _max_connections(args.url)
    print(
        f"server max_connections={limit}; {os.cpu_count()} cores; trial {args.seconds:g} s; "
        f"heartbeat {args.heartbeat} s, grace {args.grace} s; budget {args.per_worker} x N"
    )
    rows = []
    for n in [int(x) for x in args.n.split(",")]:
        for mode in args.modes.split(","):
            if mode == "direct" and n * CONNECTIONS_PER_WORKER > limit * 0.6:
                print(
                    f"direct N={n}: skipped (about {n * CONNECTIONS_PER_WORKER} connections "
                    f"needed, the shared server allows {limit})",
                    flush=True,
                )
                continue
            row = run_one(args.url, mode, n, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = (
        f"{'mode':>6} {'N':>4} {'trials/s':>8} {'ideal':>6} {'ratio':>5} {'claim p50/p99 ms':>17}"
        f" {'start p50/p99 ms':>16} {'tell p50/p99 ms':>16} {'lock hold p50/p99 ms':>20}"
        f" {'lock busy':>9} {'peak conns':>10} {'RSS/worker':>10} {'exact':>5}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['mode']:>6} {r['n']:>4} {r['trials_per_s']:>8.2f} {r['ideal_per_s']:>6.1f}"
            f" {r['trials_per_s'] / r['ideal_per_s']:>5.2f}"
            f" {r['claim_p50_ms']:>8.0f}/{r['claim_p99_ms']:<8.0f}"
            f" {r['start_p50_ms']:>7.0f}/{r['start_p99_ms']:<8.0f}"
            f" {r['tell_p50_ms']:>7.0f}/{r['tell_p99_ms']:<8.0f}"
            f" {r['lock_hold_p50_ms']:>10.1f}/{r['lock_hold_p99_ms']:<9.1f}"
            f" {r['lock_busy']:>9.2f} {r['peak_connections']:>10} {r['worker_rss_mb']:>8.0f}MB"
            f" {'yes' if r['exact'] and r['exit_codes_ok'] else 'NO':>5}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
