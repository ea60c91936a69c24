"""Measure one trial of the product's objective from outside: a wrapper the benches run as it.

``timed_train(cfg, **hooks)`` calls the product's ``search.train.loop.train`` unchanged (looked
up at call time, so whatever tree is on ``sys.path`` is what runs) and records, with two clocks
(``cpu``: this process' CPU seconds; ``wall``: ``perf_counter``):

* ``load``: seconds inside ``BiEncoder.from_config`` (the model load, timed by wrapping that
  public classmethod for the call);
* ``marks``: when each phase was first entered, via the public ``on_phase`` callback
  (``load``, ``forward``, ``backward``, ``optimizer``, ``eval``), from the call;
* ``phase_s``: seconds spent per phase name (a phase lasts until the next one starts; the
  last one until ``train`` returns): ``forward + backward + optimizer`` is the time in
  training steps, measured the same way for any version of the loop;
* ``tokens``: tokens fed to the encoder's word embeddings in training mode (a global forward
  pre-hook on ``nn.Embedding``: :func:`count_training_tokens`);
* ``steps``: forward phases entered (one per training step);
* ``samples_per_s``, ``metrics`` and ``timings`` (when ``TrainResult`` has them) of the result.

The record is appended as one JSON line to ``$BENCH_TRIAL_LOG`` when it is set (also for a
pruned or failed trial, with ``status``), and kept in :data:`LAST`. As the objective of an
isolated trial (``--objective trial_probe:timed_train``, ``bench/`` on ``PYTHONPATH``) it runs in
the worker's child exactly where ``search.train.loop:train`` would.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOG_ENV = "BENCH_TRIAL_LOG"
OBJECTIVE = "trial_probe:timed_train"
STEP_PHASES = ("forward", "backward", "optimizer")
LAST: dict[str, Any] = {}
_TOKENS: list[int] = []


def count_training_tokens() -> list[int]:
    """A one-element list counting the tokens fed to word embeddings in training mode.

    A global forward pre-hook on ``nn.Embedding`` (registered once per process): the same count
    for any trainer (ours, sentence-transformers), independent of the machine's load. Tables of
    1024 rows or fewer (positions, token types) are skipped.
    """
    if _TOKENS:
        return _TOKENS
    import torch

    _TOKENS.append(0)

    def count(module: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
        if isinstance(module, torch.nn.Embedding) and module.training:
            if module.num_embeddings > 1024 and inputs and isinstance(inputs[0], torch.Tensor):
                _TOKENS[0] += inputs[0].numel()

    torch.nn.modules.module.register_module_forward_pre_hook(count)
    return _TOKENS


def _now() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def timed_train(cfg: Any, **hooks: Any) -> Any:
    """``search.train.loop.train(cfg, **hooks)``, timed and counted (see the module)."""
    from search.train import loop
    from search.train.encoder import BiEncoder

    tokens = count_training_tokens()
    tokens_before = tokens[0]
    load = [0.0, 0.0]
    original = BiEncoder.__dict__["from_config"]

    def timed_from_config(cls: type[BiEncoder], config: Any) -> BiEncoder:
        t = _now()
        try:
            return original.__func__(cls, config)
        finally:
            u = _now()
            load[0] += u[0] - t[0]
            load[1] += u[1] - t[1]

    user_on_phase: Callable[[str], None] | None = hooks.pop("on_phase", None)
    start = _now()
    marks: dict[str, list[float]] = {}
    phase_s: dict[str, list[float]] = {}
    current: list[Any] = [None, start]
    steps = [0]
    tokens_at_eval: list[int] = []

    def close_phase(at: tuple[float, float]) -> None:
        if current[0] is not None:
            acc = phase_s.setdefault(current[0], [0.0, 0.0])
            acc[0] += at[0] - current[1][0]
            acc[1] += at[1] - current[1][1]

    def on_phase(name: str) -> None:
        at = _now()
        close_phase(at)
        current[0], current[1] = name, at
        marks.setdefault(name, [at[0] - start[0], at[1] - start[1]])
        if name == "forward":
            steps[0] += 1
        if name == "eval" and not tokens_at_eval:
            tokens_at_eval.append(tokens[0] - tokens_before)
        if user_on_phase is not None:
            user_on_phase(name)

    record: dict[str, Any] = {"status": "failed", "model": cfg.model, "batch_size": cfg.batch_size}
    record["max_len"] = cfg.max_len
    BiEncoder.from_config = classmethod(timed_from_config)  # type: ignore[method-assign,assignment]
    try:
        result = loop.train(cfg, on_phase=on_phase, **hooks)
        record["status"] = "complete"
        record["samples_per_s"] = float(result.samples_per_s)
        record["metrics"] = {k: float(v) for k, v in result.metrics.items()}
        record["result_seconds"] = float(result.seconds)
        timings = getattr(result, "timings", None)
        if timings:
            record["timings"] = {k: float(v) for k, v in dict(timings).items()}
        return result
    except BaseException as exc:
        record["status"] = "pruned" if type(exc).__name__ == "TrialPruned" else "failed"
        raise
    finally:
        BiEncoder.from_config = original  # type: ignore[method-assign]
        end = _now()
        close_phase(end)
        record.update(
            total=[end[0] - start[0], end[1] - start[1]],
            load=load,
            marks=marks,
            phase_s=phase_s,
            steps=steps[0],
            step_s=[sum(phase_s.get(p, [0.0, 0.0])[i] for p in STEP_PHASES) for i in (0, 1)],
            tokens=tokens_at_eval[0] if tokens_at_eval else tokens[0] - tokens_before,
            pid=os.getpid(),
        )
        LAST.clear()
        LAST.update(record)
        path = os.environ.get(LOG_ENV)
        if path:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def write_eval_subset(src: Path, dst: Path, queries: int) -> Path:
    """A BEIR directory of the first ``queries`` queries and about 3 docs per query."""
    from search.train.data import load_eval

    full = load_eval(src, "test")
    qids = list(full.queries)[:queries]
    docs = {d for q in qids for d in full.qrels[q]} | set(list(full.corpus)[: 3 * queries])
    (dst / "qrels").mkdir(parents=True, exist_ok=True)
    with (dst / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for d in full.corpus:
            if d in docs:
                f.write(json.dumps({"_id": d, "text": full.corpus[d]}, ensure_ascii=False) + "\n")
    with (dst / "queries.jsonl").open("w", encoding="utf-8") as f:
        for q in qids:
            f.write(json.dumps({"_id": q, "text": full.queries[q]}, ensure_ascii=False) + "\n")
    with (dst / "qrels" / "test.tsv").open("w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q in qids:
            for d, rel in full.qrels[q].items():
                f.write(f"{q}\t{d}\t{rel}\n")
    return dst


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records a run appended to ``path`` (none when it does not exist)."""
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
