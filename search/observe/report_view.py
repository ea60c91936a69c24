"""The report of a study for a terminal of 100 columns: best trial, outcomes, best configs, OOMs.

Renders the plain data of ``search.observe.report.study_report`` (what ``--json`` prints) with
rich: one line naming the overall best trial and its whole config, then three narrow tables.

Example:
    >>> from search.observe.report_view import report_text
    >>> text = report_text({"study": "s", "models": [], "trials": 0, "best": None})
    >>> text.splitlines()[0]
    'best: no completed trials yet'
"""

from __future__ import annotations

import io
import shlex
from typing import Any

from rich import box
from rich.console import Console
from rich.console import Group
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from search.observe.plot_data import metric_label

WIDTH = 100  # the report fits a terminal this wide
_PATH_KEYS = ("model", "model_path", "train_path", "eval_dir")  # said elsewhere, or long paths
_SHORT = {"lr": "lr", "temperature": "T", "warmup_ratio": "wu", "weight_decay": "wd"}
_TRIALS_SHOWN = 6  # trial numbers listed per OOM config line


def _fmt_value(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def config_line(config: dict[str, Any] | None, ran: dict[str, str] | None = None) -> str:
    """Every setting of a config that is not a path, as ``key=value`` pairs; with ``ran``
    (``search.record.trial_record.ran_on``), what ran in place of what was asked: the
    ``device`` ``auto`` resolved to, and the ``precision`` in place of ``amp``.

    Example:
        >>> config_line({"lr": 0.001, "amp": True, "device": "auto"},
        ...             {"device": "cpu", "precision": "fp32"})
        'lr=0.001 precision=fp32 device=cpu'
    """
    if not config:
        return "(config not recorded)"
    ran = ran or {}
    shown = dict(config)
    if "precision" in ran and "amp" in shown:
        shown = {("precision" if k == "amp" else k): v for k, v in shown.items()}
    shown.update({k: v for k, v in ran.items() if k in shown})
    return " ".join(
        f"{k}={_fmt_value(v)}"
        for k, v in shown.items()
        if k not in _PATH_KEYS and v not in (None, "")
    )


def short_config(config: dict[str, Any] | None) -> str:
    """``b64 len384 lr=3.2e-05 T=0.031 wu=0.1 wd=0.05`` (the searched values, 2 digits)."""
    if not config:
        return "-"
    shape = f"b{config.get('batch_size')} len{config.get('max_len')}"
    rest = [f"{short}={_fmt_value(config[k], 2)}" for k, short in _SHORT.items() if k in config]
    return " ".join([shape, *rest])


def best_line(report: dict[str, Any]) -> Text:
    """``best: trial 12, bge-m3-ko, nDCG@10 0.8123 (MRR@10 ...) | key=value ...``."""
    best = report.get("best")
    if not best:
        return Text("best: no completed trials yet")
    metric = metric_label(str(report.get("metric") or "ndcg@10"))
    others = ", ".join(
        f"{metric_label(k)} {v:.4f}"
        for k, v in best.items()
        if (k.startswith("mrr@") or k.startswith("recall@")) and isinstance(v, (int, float))
    )
    text = Text("best: ", style="bold")
    text.append(f"trial {best['trial']}, {best['model']}, {metric} {best['value']:.4f}",
                style="bold green")  # fmt: skip
    if others:
        text.append(f" ({others})")
    text.append(f" | {config_line(best.get('config'), best.get('ran'))}")
    return text


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                 show_edge=False, pad_edge=False)  # fmt: skip


def _share(value: Any) -> str:
    return f"{value:.0%}" if isinstance(value, (int, float)) else "-"


def outcomes_table(report: dict[str, Any]) -> Table:
    """Trials per model by outcome, OOM by kind, OOM rate, the seconds OOMs cost, and the share
    of worker time spent in training steps (per model and, in the title, study-wide)."""
    n = report.get("trials", 0)
    title = f"study {report['study']}: {n} trial{'' if n == 1 else 's'}"
    share = report.get("train_share")
    if share is not None:
        title += f", {share:.0%} of worker time in training steps"
    table = _table(title)
    table.caption = (
        "OOM r/h/p/f: real (device), host (RAM), predicted (preflight), frontier. re-run (when "
        "any): failed and re-queued (worker lost or stopped). train: share of the worker time in "
        "training steps (trials that recorded their phases)"
    )
    table.caption_justify = "left"
    table.add_column("model")
    # Every trial in one column: trials = complete + pruned + OOM + failed + re-run + running
    # (the last two shown when a study has any).
    extra = [
        (key, name)
        for key, name in (("requeued", "re-run"), ("running", "running"))
        if any(r.get(key) for r in report["models"])
    ]
    columns = ("trials", "complete", "pruned", "OOM r/h/p/f", "failed")
    for col in (*columns, *(name for _, name in extra), "OOM rate", "OOM s", "train"):
        table.add_column(col, justify="right")
    for r in report["models"]:
        table.add_row(
            r["model"],
            str(r["trials"]),
            str(r["complete"]),
            str(r["pruned_early"]),
            f"{r['oom_real']}/{r['oom_host']}/{r['oom_predicted']}/{r['oom_frontier']}",
            str(r["failed"]),
            *(str(r.get(key, 0)) for key, _ in extra),
            f"{r['oom_rate']:.0%}",
            f"{r['oom_seconds']:.1f}",
            _share(r.get("train_share")),
        )
    return table


def best_table(report: dict[str, Any]) -> Table:
    """Each model's best trial: score and number, median peak memory, searched values."""
    metric = metric_label(str(report.get("metric") or "ndcg@10"))
    table = _table(f"best {metric} per model")
    table.caption = "#: trial number. peak GiB: median over the trials that fit"
    table.caption_justify = "left"
    table.add_column("model")
    table.add_column(f"best {metric}", justify="right")
    table.add_column("peak GiB", justify="right")
    table.add_column("best config", overflow="fold")
    for r in report["models"]:
        peak = r.get("median_peak_memory_mb")
        table.add_row(
            r["model"],
            "-" if r["best_value"] is None else f"{r['best_value']:.4f} #{r['best_trial']}",
            "-" if peak is None else f"{peak / 1024:.2f}",
            short_config(r.get("best_config")),
        )
    return table


def oom_table(report: dict[str, Any]) -> Table | Text:
    """The configs that ran out of memory (or were skipped for it), per model."""
    rows = report.get("oom_configs") or []
    if not rows:
        return Text("no trial ran out of memory", style="bold")
    table = _table("configs that ran out of memory, per model")
    table.add_column("model")
    table.add_column("batch", justify="right")
    table.add_column("max_len", justify="right")
    table.add_column("kind")
    table.add_column("phase")
    table.add_column("trials", overflow="fold")
    for row in rows:
        numbers = row["trials"]
        shown = " ".join(f"#{n}" for n in numbers[:_TRIALS_SHOWN])
        more = len(numbers) - _TRIALS_SHOWN
        table.add_row(
            row["model"],
            str(row["batch_size"]),
            str(row["max_len"]),
            row["kind"],
            row["phase"] or "(skipped)",
            f"{len(numbers)}: {shown}" + (f" +{more} more" if more > 0 else ""),
        )
    return table


def stages_table(report: dict[str, Any]) -> Table | None:
    """A staged search: each stage's best per model, and what it gained over earlier stages."""
    stages = report.get("stages") or []
    if not stages:
        return None
    metric = metric_label(str(report.get("metric") or "ndcg@10"))
    table = _table(f"best {metric} per model per stage, in the order the stages ran")
    table.caption = "gain: the stage's best minus the best of the earlier stages"
    table.caption_justify = "left"
    table.add_column("stage")
    table.add_column("model")
    table.add_column("trials", justify="right")
    table.add_column(f"best {metric}", justify="right")
    table.add_column("gain", justify="right")
    table.add_column("best config", overflow="fold")
    for st in stages:
        gain = st.get("gain")
        shown = "-" if gain is None else f"{gain:+.4f}"
        for i, m in enumerate(st["models"]):
            table.add_row(
                st["stage"] if i == 0 else "",
                m["model"],
                str(m["trials"]),
                "-" if m["best_value"] is None else f"{m['best_value']:.4f} #{m['best_trial']}",
                shown if i == 0 else "",
                short_config(m.get("best_config")),
            )
    return table


def report_view(report: dict[str, Any]) -> Group:
    """The whole report: best line, outcomes, best per model, per stage, OOM configs."""
    parts: list[RenderableType] = [best_line(report)]
    kept = report.get("kept_models") or []
    if kept:  # search.observe.keep: the K best trials' models, as sentence-transformers artifacts
        trials = ", ".join(str(m["trial"]) for m in kept)
        parts.append(
            Text(  # a command to copy: one line at any width
                f"kept models: trials {trials} (search best --study "
                f"{shlex.quote(report['study'])} --export DIR)",
                no_wrap=True,
                overflow="ignore",
            )
        )
    for row in report.get("models_not_kept") or []:  # one line each: the store failed
        parts.append(Text(f"model of trial {row['trial']} not kept: {row['error']}"))
    tables = (outcomes_table(report), best_table(report), stages_table(report), oom_table(report))
    for part in tables:
        if part is not None:
            parts += [Text(""), part]
    return Group(*parts)


def report_text(report: dict[str, Any], width: int = WIDTH) -> str:
    """The report as plain text ``width`` columns wide (for notes and logs)."""
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(report_view(report), crop=False)  # a command line passes the width whole
    return console.export_text()
