"""Run one trial in a child process, so that no failure of the trial can take the worker down.

A CUDA out-of-memory can leave the allocator fragmented or leak memory, a segfault kills the
interpreter, and the kernel's OOM killer sends SIGKILL: inside the worker, each would poison or
end every later trial. Here the objective runs in a child process; when it ends, the device
memory it held is freed with it, and the worker reads what happened from a pipe and the exit
status.

Start cost: children come from a ``forkserver`` that has imported torch, transformers, optuna
and the objective's module once, so a trial starts in milliseconds instead of paying those
imports. The forkserver is a fresh interpreter (not a fork of the worker) and never touches
CUDA, so no child is ever forked from a process with a CUDA context. Call :func:`warm_up` to
start it before the first trial.

A child never outlives its worker: it ends itself, quietly, when a pipe only the worker holds
reaches EOF (the worker exited or was SIGKILLed), and the kernel kills it when the forkserver
dies (``PR_SET_PDEATHSIG``); the forkserver exits at once when the worker goes
(``search.worker.forkserver_exit``).

Protocol on the pipe (child -> parent): ``("phase", name)`` on every phase the objective enters
(so the phase survives a hard kill), ``("report", epoch, metrics)`` answered by the parent with
a bool (prune?), ``("partial", examples_seen, metrics)`` for a sooner evaluation on a sample of
the eval set (``report_partial``; answered like a report, not kept in the history), ``("step",
step, values)`` after each training step when the worker tracks the trial (``on_step``; not
answered), then one final ``("result", dict)``, ``("pruned",
dict)`` or ``("error", dict)``; each final dict also carries the objective's seconds per phase
(``timings``, from the clock lent to an objective that takes ``clock``) and when it was called
and ended (``called_at``, ``ended_at``: ``time.monotonic()``, one clock for the whole host).
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import importlib
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from multiprocessing.connection import Connection
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import psutil

from search.record.config import DEFAULT_OBJECTIVE
from search.record.config import TrialConfig
from search.record.precision import device_type

__all__ = [
    "MALLOC_MMAP_THRESHOLD",
    "MMAP_THRESHOLD_ENV",
    "TrialOutcome",
    "mmap_threshold_from_env",
    "reap",
    "run_isolated",
    "warm_up",
]

MIB = 1024**2
# Imported once by the forkserver; a module that fails to import is skipped there. "__main__"
# is the worker's main module: every child imports it (multiprocessing's spawn rules), so
# preloading it makes that import free. Like any spawn/forkserver program, a main script must
# guard its entry point with ``if __name__ == "__main__":``.
# search.train.tiny imports the four model classes (RobertaModel, XLMRobertaModel, BertModel):
# imported once here instead of in every trial (~120 MiB of resident memory and its time per
# trial, which the CPU memory estimate does not count; BENCHMARKS.md, estimate vs measured).
# search.worker.preload_gc / preload_done: no collections while it imports, then its objects
# frozen out of every trial's collections. search.worker.preload_tables: transformers' tables
# that each trial's first from_pretrained would build again.
PRELOAD = (
    "search.worker.preload_gc",
    "__main__",
    "torch",
    "transformers",
    "optuna",
    "search.memory.oom",
    "search.worker.isolation",
    "search.train.tiny",
    "search.worker.preload_tables",
    "search.worker.preload_done",
)
# Preloaded after all else: its exit handler runs first (search.worker.forkserver_exit).
_PRELOAD_LAST = "search.worker.forkserver_exit"
# Kill a child that has not exited this long after sending its final message.
_EXIT_GRACE_S = 30.0
# Host memory below this share of the total while a child was alive hints at the OOM killer.
_HOST_LOW_MEMORY = 0.05
# prctl(2) option: the signal a process gets when its parent dies (Linux).
_PR_SET_PDEATHSIG = 1
# The exit code of a child whose worker died (nobody reads it: the worker is gone).
_ORPHAN_EXIT = 70

Report = Callable[[int, dict[str, float]], bool]


@dataclass
class TrialOutcome:
    """What became of one isolated trial.

    Args:
        status: ``complete``, ``pruned``, ``oom``, ``failed``, ``killed`` or ``stopped``.
        value: ``metrics["ndcg@10"]`` when complete.
        metrics: The last metrics (the result's, else the last report's).
        history: Metrics reported per epoch.
        phase: Last phase the objective entered (for an OOM: where it happened).
        error: One line, ``ExceptionType: message``, for oom / failed / killed.
        oom_kind: ``real`` (an allocator failure) or ``host`` (killed by the OOM killer).
        peak_memory_mb: Peak memory of the trial: the objective's own figure when it returns
            one, else the child's (CUDA allocator peak, or peak resident memory on CPU).
        seconds: Wall seconds from starting the child to its final message (or, without
            one, to its exit).
        exitcode: The child's exit code (negative: killed by that signal); None when it sent
            its final message and was still exiting (:func:`reap`).
        baseline_memory_mb: The child's resident memory after imports, before the trial
            (``peak_memory_mb - baseline_memory_mb`` is what the trial added on CPU).
        timings: Wall seconds per phase (``search.record.attrs.TIMING_PHASES``): ``start``
            (from starting the child to calling the objective) and the objective's own
            (``load``, ``tokenise``, ``train``, ``evaluate``, ``save``: what it measured up to
            its end, also when pruned or failed). Empty when the child sent no final message.
        padding_free: Whether the encoder ran padding-free (a completed ``TrainResult``'s
            ``padding_free``), None when the objective did not say.
        ended_at: ``time.monotonic()`` when the objective returned or raised (one clock for
            every process of the host), or None.
    """

    status: str
    value: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    phase: str | None = None
    error: str | None = None
    oom_kind: str | None = None
    peak_memory_mb: float | None = None
    seconds: float = 0.0
    exitcode: int | None = None
    baseline_memory_mb: float | None = None
    timings: dict[str, float] = field(default_factory=dict)
    padding_free: bool | None = None
    ended_at: float | None = None


# --------------------------------------------------------------------------- the child side


def _status_kib(field_name: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmSize``, ``VmRSS``, ``VmHWM``), in KiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


# glibc malloc serves a request from mmap (unmapped when freed) only above its mmap threshold;
# freed memory below it stays resident in the heap. The threshold is dynamic by default: each
# free of an mmapped chunk raises it to that chunk's size (up to 32 MiB), so which freed
# activations stay resident depends on the order of the trial's allocations: one checkpointed
# tiny config (32 x 128) peaked at 264-375 MiB over identical runs, 148 MiB in every run with the
# threshold fixed at 1 MiB. Fixing it costs page faults on every large tensor (real
# all-MiniLM-L6-v2, 16 x 128, a hard negative: x1.22 the CPU seconds of the steps, x1.33 with
# checkpointing; paired medians of 3, bench_estimate_real --mmap-thresholds 0,1048576), so a
# trial keeps glibc's own behaviour and only the estimate's calibration (its tests,
# bench_estimate_real) fixes it: ``run_isolated(mmap_threshold=MALLOC_MMAP_THRESHOLD)`` or
# $SEARCH_MALLOC_MMAP_THRESHOLD=<bytes> (0 or unset: glibc's dynamic threshold).
MALLOC_MMAP_THRESHOLD = 1 * MIB
MMAP_THRESHOLD_ENV = "SEARCH_MALLOC_MMAP_THRESHOLD"
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h


def mmap_threshold_from_env(env: Mapping[str, str]) -> int:
    """The fixed threshold ``env`` asks for (bytes; 0: glibc's own dynamic threshold)."""
    value = env.get(MMAP_THRESHOLD_ENV, "").strip()
    return int(value) if value.isdigit() else 0


def _default_mmap_threshold(cfg: TrialConfig, memory_limit_bytes: int | None) -> int:
    """$SEARCH_MALLOC_MMAP_THRESHOLD when set; else fixed under a CPU memory limit, where the
    preflight's estimate (calibrated on the fixed threshold) decides what runs; else 0."""
    if MMAP_THRESHOLD_ENV in os.environ:
        return mmap_threshold_from_env(os.environ)
    if memory_limit_bytes is not None and device_type(cfg.device) == "cpu":
        return MALLOC_MMAP_THRESHOLD
    return 0


def _fix_malloc_mmap_threshold(threshold: int) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (True when it was set; 0: leave it)."""
    if threshold <= 0:
        return False
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, ValueError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / MIB


def _peak_mb(device_type: str) -> float:
    if device_type == "cuda":
        import torch

        if torch.cuda.is_initialized():
            return torch.cuda.max_memory_allocated() / MIB
    hwm = _status_kib("VmHWM")
    return hwm / 1024 if hwm is not None else _rss_mb()


def _set_memory_limit(limit: int, device: str) -> Callable[[], None]:
    """Cap what the trial may use from now on; return a function that lifts the cap.

    CUDA: ``torch.cuda.set_per_process_memory_fraction(limit / total)`` on the trial's device
    (the caching allocator raises ``torch.OutOfMemoryError`` beyond it). CPU: the address-space
    limit ``RLIMIT_AS`` is set to the child's current address space (``VmSize``, after all
    imports) plus ``limit``, so ``limit`` is what the trial may add: model, data, optimizer
    states, activations and allocator slack. Address space counts reserved memory too, so the
    cap is a little stricter than resident memory.
    """
    kind = device_type(device)
    if kind == "cuda":
        import torch

        index = torch.device(device if ":" in device else "cuda").index or 0
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), index)
        return lambda: torch.cuda.set_per_process_memory_fraction(1.0, index)
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    size_kib = _status_kib("VmSize")
    base = size_kib * 1024 if size_kib is not None else psutil.Process().memory_info().vms
    cap = base + limit
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _apply_env(env: Mapping[str, str]) -> None:
    """Make the child's environment the worker's (the forkserver's is from when it started)."""
    for key in list(os.environ):
        if key not in env:
            del os.environ[key]
    os.environ.update(env)
    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))


def _one_line(exc: BaseException, limit: int = 1000) -> str:
    text = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _result_dict(result: Any) -> dict[str, Any]:
    """The fields of a ``TrainResult`` (or of a mapping returned by a fake objective)."""
    get = result.get if isinstance(result, Mapping) else lambda k, d=None: getattr(result, k, d)
    out = {
        "metrics": {k: float(v) for k, v in dict(get("metrics", {}) or {}).items()},
        "history": [dict(h) for h in (get("history", []) or [])],
        "peak_memory_mb": get("peak_memory_mb", None),
        "timings": {k: float(v) for k, v in dict(get("timings", {}) or {}).items()},
        "padding_free": get("padding_free", None),
    }
    return out


def _quiet_libraries() -> None:
    """Keep transformers' loading bars and advice out of the worker's output."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _set_parent_death_signal() -> None:
    """Ask Linux to SIGKILL this process when its parent (the forkserver) dies."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return  # not Linux: the watch thread alone
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def _die_with_worker(lifeline: Connection) -> None:
    """End this child, quietly and at once, when its worker dies.

    ``lifeline`` is the read end of a pipe whose write end only the worker holds (it is never
    written to): the read returns EOF when the worker exits or is killed, SIGKILL included, and
    a daemon thread then ends the process with ``os._exit`` (no traceback, no clean-up that
    could block; the device memory goes with the process). Besides, the kernel SIGKILLs the
    child when its parent, the forkserver, dies (``PR_SET_PDEATHSIG``); the forkserver exits
    when the worker does (its own pipe from the worker reaches EOF).
    """
    _set_parent_death_signal()

    def watch() -> None:
        try:
            lifeline.recv_bytes()
        except (EOFError, OSError):
            pass
        os._exit(_ORPHAN_EXIT)

    threading.Thread(target=watch, name="worker-lifeline", daemon=True).start()


def _send_final(conn: Connection, final: tuple[str, dict[str, Any]]) -> None:
    """Send the final message; a worker gone meanwhile ends the child quietly."""
    try:
        conn.send(final)
        conn.close()
    except (OSError, EOFError):  # BrokenPipeError, ConnectionResetError: the worker is gone
        os._exit(_ORPHAN_EXIT)


def _child_main(
    conn: Connection,
    cfg_json: dict[str, Any],
    objective: str,
    memory_limit: int | None,
    env: dict[str, str],
    stream_steps: bool = False,
    mmap_threshold: int = 0,
    lifeline: Connection | None = None,
) -> None:
    """Entry point of the child: run the objective and send what became of it."""
    if lifeline is not None:
        _die_with_worker(lifeline)
    # Ctrl-C reaches the whole process group: the worker decides what becomes of the trial
    # (it hands it back), so the child does not die of KeyboardInterrupt on its own.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Leave the objects inherited from the forkserver out of every garbage collection: a
    # collection would touch (and so copy) every page of the inherited heap, 1-2 s per trial.
    gc.freeze()
    _apply_env(env)
    # Only where asked (the estimate's calibration): the threshold's cost, see the constant.
    _fix_malloc_mmap_threshold(mmap_threshold)
    _quiet_libraries()
    # Imported here, in the child, once its environment is set (they import torch).
    import optuna

    from search.memory.oom import is_oom_error
    from search.memory.oom import release_device_memory
    from search.train.phase_clock import PhaseClock

    phase: list[str | None] = [None]
    lift: Callable[[], None] = lambda: None  # noqa: E731
    cfg = TrialConfig.from_json(cfg_json)
    kind = "cpu"
    baseline = _rss_mb()
    clock = PhaseClock()  # lent to an objective that takes it (search.train.loop.train)
    called_at: float | None = None
    final: tuple[str, dict[str, Any]]

    def on_phase(name: str) -> None:
        phase[0] = name
        conn.send(("phase", name))

    def report(epoch: int, metrics: dict[str, float]) -> bool:
        conn.send(("report", int(epoch), {k: float(v) for k, v in metrics.items()}))
        return bool(conn.recv())

    def report_partial(step: int, metrics: dict[str, float]) -> bool:
        conn.send(("partial", int(step), {k: float(v) for k, v in metrics.items()}))
        return bool(conn.recv())

    def on_step(step: int, values: dict[str, float]) -> None:
        conn.send(("step", int(step), {k: float(v) for k, v in values.items()}))

    try:
        module, _, name = objective.partition(":")
        fn = getattr(importlib.import_module(module), name)
        extra: dict[str, Any] = {}
        if stream_steps and _accepts(fn, "on_step"):
            extra["on_step"] = on_step
        if _accepts(fn, "report_partial"):  # the objective decides (cfg.eval_every_steps)
            extra["report_partial"] = report_partial
        if _accepts(fn, "clock"):
            extra["clock"] = clock
        kind = device_type(cfg.device)
        baseline = _rss_mb()
        if memory_limit is not None:
            lift = _set_memory_limit(memory_limit, cfg.device)
        called_at = time.monotonic()
        result = fn(cfg, report=report, on_phase=on_phase, **extra)
        lift()
        final = ("result", _result_dict(result))
    except optuna.TrialPruned:
        lift()
        final = ("pruned", {})
    except BaseException as exc:  # noqa: BLE001 - every failure is reported to the parent
        lift()
        final = ("error", {"error": _one_line(exc), "oom": is_oom_error(exc)})
    ended_at = time.monotonic()
    measured = clock.stop()  # what the objective measured up to its end, however it ended
    # The traceback (and the tensors its frames hold) is gone here: free before sending.
    release_device_memory()
    final[1]["timings"] = measured or final[1].get("timings") or {}
    final[1]["called_at"], final[1]["ended_at"] = called_at, ended_at
    final[1].setdefault("peak_memory_mb", None)
    final[1]["child_peak_mb"] = _peak_mb(kind)
    final[1]["baseline_mb"] = baseline
    final[1]["phase"] = phase[0]
    _send_final(conn, final)


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes the keyword ``name`` (fake objectives may not take ``on_step``)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


# -------------------------------------------------------------------------- the parent side

_context: Any = None
# Children that sent their final message and are exiting: the kernel frees their memory, and
# a CUDA context is torn down, while the worker records the trial and claims the next one.
# :func:`reap` waits for them before the next child starts, and when this process exits.
_exiting: list[tuple[Any, Connection, float]] = []
_exiting_lock = threading.Lock()


def reap() -> None:
    """Wait for the children that sent their final message to exit.

    One still alive :data:`_EXIT_GRACE_S` seconds after its final message is killed. Called
    before a child starts, so that the memory the last trial held (host and device) is free
    again before the next trial's, and at this process's exit.
    """
    with _exiting_lock:
        while _exiting:
            proc, lifeline_w, deadline = _exiting.pop()
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
            lifeline_w.close()  # after its exit: the child's lifeline never ends it early
            proc.close()


atexit.register(reap)  # before multiprocessing's own handler, which would SIGTERM them


def _get_context(objective_module: str) -> Any:
    """The forkserver context (preload set on first use: torch, transformers, the objective)."""
    global _context
    if _context is None:
        ctx = mp.get_context("forkserver")
        last = PRELOAD[-1]  # preload_done: after everything else
        preload = list(dict.fromkeys([*PRELOAD[:-1], DEFAULT_OBJECTIVE.split(":")[0]]))
        if objective_module not in preload:
            preload.append(objective_module)
        ctx.set_forkserver_preload([*preload, last, _PRELOAD_LAST])
        _context = ctx
    return _context


def warm_up(objective: str = DEFAULT_OBJECTIVE) -> None:
    """Start the forkserver now (imports torch and transformers once, a few seconds).

    It starts with SIGINT ignored (inherited across its exec), so a Ctrl-C, which reaches
    the whole process group, cannot kill it while it imports; the worker decides what a
    Ctrl-C means (it hands the running trial back).
    """
    import threading
    from multiprocessing import forkserver

    _get_context(objective.split(":")[0])
    if threading.current_thread() is not threading.main_thread():
        forkserver.ensure_running()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


def _oom_kill_count() -> int | None:
    """The kernel's OOM-kill counter of this process's memory cgroup (v2 or v1), if readable."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates: list[tuple[Path, str]] = []
    for line in lines:
        _, controllers, where = line.split(":", 2)
        rel = where.lstrip("/")
        if controllers == "":  # cgroup v2
            for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                candidates.append((root / rel / "memory.events", "oom_kill"))
        elif "memory" in controllers.split(","):  # cgroup v1
            root = Path("/sys/fs/cgroup/memory")
            candidates.append((root / rel / "memory.oom_control", "oom_kill"))
            candidates.append((root / "memory.oom_control", "oom_kill"))
    for file, key in candidates:
        try:
            rows = file.read_text().splitlines()
        except OSError:
            continue
        for row in rows:
            name, _, value = row.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def run_isolated(
    cfg: TrialConfig,
    *,
    report: Report | None = None,
    memory_limit_bytes: int | None = None,
    objective: str = DEFAULT_OBJECTIVE,
    timeout: float | None = None,
    stop: Callable[[], bool] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    report_partial: Report | None = None,
    mmap_threshold: int | None = None,
) -> TrialOutcome:
    """Run ``objective(cfg, report=..., on_phase=...)`` in a child process and say how it ended.

    The child's reports reach ``report`` in this process (which talks to Optuna) and its answer
    (prune or not) goes back. An exception that :func:`search.memory.oom.is_oom_error` classifies
    ends as ``oom`` (``real``), ``optuna.TrialPruned`` as ``pruned``, any other exception as
    ``failed``. A child killed by a signal is ``killed``; with SIGKILL, when the memory
    cgroup's ``oom_kill`` counter grew or the host's available memory fell under 5% while it
    ran, ``oom_kind`` is ``host`` (the kernel's OOM killer). The worker always goes on.

    Args:
        cfg: The trial's effective config (sent to the child as JSON).
        report: Called with ``(epoch, metrics)`` for each evaluation; True prunes the trial.
        memory_limit_bytes: What the trial may use: on CUDA through the allocator's
            per-process fraction, on CPU through the child's address-space limit above its
            post-import baseline (see ``_set_memory_limit``).
        objective: ``"module:function"`` with ``search.train.loop.train``'s signature.
        timeout: Seconds after which the child is killed (``killed``, ``timeout``).
        stop: Polled at least every half second; when it returns True the child is killed
            and the outcome is ``stopped`` (the worker got SIGTERM or SIGINT). An exception
            raised by ``report`` (e.g. the trial was failed meanwhile) also kills and reaps
            the child, then propagates.
        on_step: Called with ``(step, {"loss", "lr", "memory_mb"})`` for each training step
            the objective streams (only objectives taking ``on_step``); None: not streamed.
        report_partial: Called with ``(examples_seen, metrics)`` for each sooner evaluation
            on the eval sample (``training.eval_every_steps``); True prunes the trial. None:
            such reports are answered "go on" and dropped.
        mmap_threshold: Fix glibc's malloc mmap threshold in the child at this many bytes
            (:data:`MALLOC_MMAP_THRESHOLD` makes CPU peaks reproducible: the memory estimate's
            calibration); 0: glibc's own dynamic threshold; None: $SEARCH_MALLOC_MMAP_THRESHOLD
            when set, else fixed under a CPU ``memory_limit_bytes`` (the estimate that decides
            what runs under the cap predicts the fixed threshold's peak), else glibc's own (a
            trial's default: no page-fault tax).

    Returns:
        The outcome; ``seconds`` is the wall time including the child's start. A child that
        sent its final message is not waited for: it exits while the caller records the
        trial, and the next call (or :func:`reap`) waits for it before starting another.
    """
    module, _, func = objective.partition(":")
    if not module or not func:
        raise ValueError(f"objective must be 'module:function', but got {objective=}.")
    if memory_limit_bytes is not None and memory_limit_bytes <= 0:
        raise ValueError(f"memory_limit_bytes must be positive, but got {memory_limit_bytes=}.")
    ctx = _get_context(module)
    reap()  # the last trial's child has exited and freed its memory
    if mmap_threshold is None:
        mmap_threshold = _default_mmap_threshold(cfg, memory_limit_bytes)
    start = time.monotonic()
    kills_before = _oom_kill_count()
    host_total = psutil.virtual_memory().total
    lowest_available = 1.0
    parent_conn, child_conn = ctx.Pipe(duplex=True)
    # Only this process holds the write end: the child dies when it reaches EOF (this process
    # exits or is killed), see _die_with_worker.
    lifeline_r, lifeline_w = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=_child_main,
        args=(
            child_conn,
            cfg.to_json(),
            objective,
            memory_limit_bytes,
            dict(os.environ),
            on_step is not None,
            mmap_threshold,
            lifeline_r,
        ),
        name=f"trial-{cfg.model}",
        daemon=True,
    )
    proc.start()
    child_conn.close()  # so that recv() sees EOF when the child dies
    lifeline_r.close()

    outcome = TrialOutcome(status="failed")
    final: tuple[str, dict[str, Any]] | None = None
    timed_out = False
    stopped = False
    try:
        while final is None:
            if stop is not None and stop():
                stopped = True
                break
            remaining = None if timeout is None else timeout - (time.monotonic() - start)
            if remaining is not None and remaining <= 0:
                timed_out = True
                break
            step = 0.5 if remaining is None else max(0.0, min(0.5, remaining))
            ready = wait([parent_conn, proc.sentinel], timeout=step)
            lowest_available = min(
                lowest_available, psutil.virtual_memory().available / host_total
            )
            if parent_conn in ready:
                try:
                    message = parent_conn.recv()
                except (EOFError, OSError):
                    break  # the child died
                kind = message[0]
                if kind == "phase":
                    outcome.phase = message[1]
                elif kind == "report":
                    _, epoch, metrics = message
                    outcome.history.append(dict(metrics))
                    outcome.metrics = dict(metrics)
                    prune = bool(report(epoch, metrics)) if report is not None else False
                    parent_conn.send(prune)
                elif kind == "partial":
                    _, seen, metrics = message
                    prune = bool(report_partial(seen, metrics)) if report_partial else False
                    parent_conn.send(prune)
                elif kind == "step":
                    if on_step is not None:
                        on_step(message[1], message[2])
                else:
                    final = (kind, message[1])
            elif proc.sentinel in ready and not parent_conn.poll():
                break
    finally:
        parent_conn.close()
        if final is None:  # stopped, timed out, died, or ``report`` raised: gone before return
            if proc.is_alive():
                proc.kill()
            proc.join()
            lifeline_w.close()
            outcome.exitcode = proc.exitcode
            proc.close()
        else:  # it exits on its own: reaped before the next child starts
            with _exiting_lock:
                _exiting.append((proc, lifeline_w, time.monotonic() + _EXIT_GRACE_S))
    outcome.seconds = time.monotonic() - start

    if stopped:
        outcome.status = "stopped"
        outcome.error = "Stopped: the worker was told to stop"
        return outcome
    if timed_out:
        outcome.status = "killed"
        outcome.error = f"timeout: killed after {timeout:g} s"
        return outcome
    if final is None:
        return _died(outcome, kills_before, lowest_available)
    kind, data = final
    outcome.phase = data.get("phase") or outcome.phase
    outcome.baseline_memory_mb = data.get("baseline_mb")
    outcome.ended_at = data.get("ended_at")
    called_at = data.get("called_at")
    if called_at is not None:  # the objective was called: the child's start, then its phases
        outcome.timings = {"start": max(0.0, called_at - start), **data.get("timings", {})}
    peak = data.get("peak_memory_mb")
    outcome.peak_memory_mb = float(peak) if peak is not None else data.get("child_peak_mb")
    if kind == "result":
        outcome.status = "complete"
        outcome.metrics = data["metrics"] or outcome.metrics
        outcome.history = data["history"] or outcome.history
        outcome.value = outcome.metrics.get("ndcg@10")
        padding_free = data.get("padding_free")
        outcome.padding_free = None if padding_free is None else bool(padding_free)
    elif kind == "pruned":
        outcome.status = "pruned"
    elif data.get("oom"):
        outcome.status, outcome.oom_kind, outcome.error = "oom", "real", data["error"]
    else:
        outcome.status, outcome.error = "failed", data["error"]
    return outcome


def _died(
    outcome: TrialOutcome, kills_before: int | None, lowest_available: float
) -> TrialOutcome:
    """Classify a child that exited without a final message."""
    code = outcome.exitcode
    if code is None or code >= 0:
        outcome.status = "failed"
        outcome.error = f"ChildExited: the trial process exited with code {code} without a result"
        return outcome
    number = -code
    outcome.status = "killed"
    outcome.error = f"Killed: the trial process was killed by {_signal_name(number)}"
    if number == signal.SIGKILL:
        evidence = host_oom_evidence(kills_before, _oom_kill_count(), lowest_available)
        if evidence is not None:
            outcome.oom_kind = "host"
            outcome.error += f" (host out of memory: {evidence})"
    return outcome


def host_oom_evidence(
    kills_before: int | None, kills_after: int | None, lowest_available: float
) -> str | None:
    """Why a SIGKILLed child counts as killed by the kernel's OOM killer, or None.

    The cgroup's ``oom_kill`` counter grew while it ran (both readings known), else the host's
    available memory fell under 5% of the total while it ran.

    >>> host_oom_evidence(2, 3, 0.5)
    'cgroup oom_kill 2 -> 3'
    >>> host_oom_evidence(None, None, 0.01)
    'host memory available fell to 1.0%'
    >>> host_oom_evidence(3, 3, 0.5) is None
    True
    """
    if kills_before is not None and kills_after is not None and kills_after > kills_before:
        return f"cgroup oom_kill {kills_before} -> {kills_after}"
    if lowest_available < _HOST_LOW_MEMORY:
        return f"host memory available fell to {lowest_available:.1%}"
    return None
