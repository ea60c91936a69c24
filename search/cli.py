"""The ``search`` command: run a study, run a worker, report, check the storage.

search run --study ko-retrieval --tiny --n-trials 8
search worker --study ko-retrieval --storage postgresql://... --gpu 0
search report --study ko-retrieval-tiny [--json]
search storage check --storage postgresql://... [--upgrade]
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated
from typing import Any
from typing import NoReturn

import typer
from rich.console import Console

app = typer.Typer(
    help="Hyperparameter search for Korean bi-encoder retrieval models, on Optuna.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
storage_app = typer.Typer(help="Inspect and upgrade the study storage.", no_args_is_help=True)
app.add_typer(storage_app, name="storage")

# Piped output (CI logs, files) gets a wide table instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 180)
err_console = Console(stderr=True)

StudyOpt = Annotated[
    str | None,
    typer.Option("--study", help="Shipped study spec to run (e.g. ko-retrieval)."),
]
SpecOpt = Annotated[
    Path | None, typer.Option("--spec", help="Your own study spec (YAML) instead of --study.")
]
StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Storage URL (postgresql://..., sqlite:///file.db). Default: $SEARCH_STORAGE, "
        "else search.db in the working directory.",
    ),
]


def _check_device(device: str) -> None:
    """Reject a --device this machine cannot run, before anything is written."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        _fail(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            _fail(f"--device {device!r}: CUDA is not available here (use --device cpu or auto)")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            _fail(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")


def _fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the user's mistakes into one-line errors with exit code 2 (never a traceback)."""
    from search.budget import BudgetError
    from search.errors import RunError
    from search.spec import SpecError
    from search.train.data import DataError
    from storage import StorageError

    try:
        yield
    except (SpecError, DataError, BudgetError, StorageError) as exc:
        _fail(str(exc))
    except RunError as exc:
        _fail(str(exc), code=1)


def _run(
    *,
    study: str | None,
    spec_file: Path | None,
    storage: str | None,
    n_trials: int | None,
    set_n_trials: bool,
    timeout: float | None,
    seed: int | None,
    tiny: bool,
    device: str,
    gpu: str | None,
    memory_limit: str | None,
    no_preflight: bool,
    no_frontier: bool,
    study_name: str | None,
    objective: str,
) -> None:
    from search.device import parse_size
    from search.report import report_table
    from search.report import study_report
    from search.runner import RunOptions
    from search.runner import study_name_for
    from search.spec import resolve_spec
    from storage import redact_url
    from storage import resolve_storage_url

    with _user_errors():
        spec = resolve_spec(study, str(spec_file) if spec_file else None)
        _check_device(device)
        try:
            limit = parse_size(memory_limit) if memory_limit else None
        except ValueError as exc:
            _fail(f"--memory-limit {memory_limit!r}: {exc}")
        opts = RunOptions(
            storage_url=resolve_storage_url(storage),
            n_trials=n_trials,
            set_n_trials=set_n_trials,
            timeout=timeout,
            seed=seed,
            tiny=tiny,
            device=device,
            gpu=gpu,
            memory_limit=limit,
            use_estimate=not no_preflight,
            use_frontier=not no_frontier,
            study_name=study_name,
            objective=objective,
        )
        console.print(
            f"study [bold]{study_name_for(spec, opts)}[/] in {redact_url(opts.storage_url)}",
            highlight=False,
        )
        summary = _run_with_progress(spec, opts)
    report = study_report(summary.study)
    console.print(report_table(report))
    console.print(
        f"{summary.trials_run} trials run by this worker (stopped by {summary.stopped_by}); "
        f"study {summary.study_name} in {summary.storage_url}. "
        f"Report again: search report --study {summary.study_name} --storage "
        f"{summary.storage_url}",
        highlight=False,
    )


def _run_with_progress(spec: object, opts: object) -> object:
    import optuna
    from rich.progress import BarColumn
    from rich.progress import MofNCompleteColumn
    from rich.progress import Progress
    from rich.progress import TextColumn
    from rich.progress import TimeElapsedColumn

    from search.runner import run_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    best: list[float] = []
    with Progress(
        TextColumn("[bold]trials"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("", total=None)

        def on_start(budget: int, finished: int) -> None:
            progress.update(task, total=budget, completed=finished)

        def on_trial(frozen: optuna.trial.FrozenTrial) -> None:
            state = frozen.state.name.lower()
            if frozen.user_attrs.get("oom"):
                state = f"oom ({frozen.user_attrs.get('oom_kind')})"
            if frozen.state.name == "COMPLETE" and frozen.value is not None:
                best.append(frozen.value)
            model = frozen.user_attrs.get("model", "?")
            progress.update(
                task,
                advance=1,
                description=f"#{frozen.number} {model}: {state}"
                + (f" | best {max(best):.4f}" if best else ""),
            )

        return run_study(spec, opts, on_trial=on_trial, on_start=on_start)  # type: ignore[arg-type]


NTrialsOpt = Annotated[
    int | None,
    typer.Option(
        "--n-trials",
        min=1,
        help="The study's total budget of finished trials, stored with a new study "
        "(default: the spec's study.n_trials).",
    ),
]
SetNTrialsOpt = Annotated[
    bool, typer.Option("--set-n-trials", help="Change the stored budget of an existing study.")
]
TimeoutOpt = Annotated[
    float | None, typer.Option("--timeout", min=1, help="Stop starting trials after S seconds.")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Sampler seed.")]
TinyOpt = Annotated[
    bool, typer.Option("--tiny", help="Tiny offline replicas of each model (no downloads).")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
MemoryLimitOpt = Annotated[
    str | None, typer.Option("--memory-limit", help="Cap each trial's memory, e.g. 6GiB.")
]
NoPreflightOpt = Annotated[
    bool, typer.Option("--no-preflight", help="Do not skip configs by memory estimate.")
]
NoFrontierOpt = Annotated[
    bool, typer.Option("--no-frontier", help="Do not skip configs dominated by an OOM.")
]
StudyNameOpt = Annotated[
    str | None, typer.Option("--study-name", help="Optuna study name (default: the spec's).")
]
GpuOpt = Annotated[
    str | None,
    typer.Option("--gpu", help="GPU index for this worker (else CUDA_VISIBLE_DEVICES)."),
]
ObjectiveOpt = Annotated[str, typer.Option("--objective", hidden=True)]
DEFAULT_OBJECTIVE = "search.train.loop:train"


@app.command()
def run(
    study: StudyOpt = None,
    spec: SpecOpt = None,
    storage: StorageOpt = None,
    n_trials: NTrialsOpt = None,
    set_n_trials: SetNTrialsOpt = False,
    timeout: TimeoutOpt = None,
    seed: SeedOpt = None,
    tiny: TinyOpt = False,
    device: DeviceOpt = "auto",
    memory_limit: MemoryLimitOpt = None,
    no_preflight: NoPreflightOpt = False,
    no_frontier: NoFrontierOpt = False,
    study_name: StudyNameOpt = None,
    objective: ObjectiveOpt = DEFAULT_OBJECTIVE,
) -> None:
    """Run the whole search in this process (one worker), on the embedded default storage."""
    _run(spec_file=spec, gpu=None, **_without(locals(), "spec"))


@app.command()
def worker(
    study: StudyOpt = None,
    spec: SpecOpt = None,
    storage: StorageOpt = None,
    n_trials: NTrialsOpt = None,
    set_n_trials: SetNTrialsOpt = False,
    gpu: GpuOpt = None,
    timeout: TimeoutOpt = None,
    seed: SeedOpt = None,
    tiny: TinyOpt = False,
    device: DeviceOpt = "auto",
    memory_limit: MemoryLimitOpt = None,
    no_preflight: NoPreflightOpt = False,
    no_frontier: NoFrontierOpt = False,
    study_name: StudyNameOpt = None,
    objective: ObjectiveOpt = DEFAULT_OBJECTIVE,
) -> None:
    """Pull trials from a shared study until its global budget is spent, then exit 0."""
    _run(spec_file=spec, **_without(locals(), "spec"))


def _without(values: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k not in names}


@app.command()
def report(
    study: Annotated[str, typer.Option("--study", help="Optuna study name (e.g. ko-retrieval).")],
    storage: StorageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Per-model report: trials, outcomes, OOM rate and cost, best nDCG@10, peak memory."""
    import optuna

    from search.report import report_table
    from search.report import study_report
    from storage import create_storage
    from storage import redact_url
    from storage import resolve_storage_url

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _user_errors():
        url = resolve_storage_url(storage)
        store = create_storage(url, heartbeat_interval=None)
        try:
            loaded = optuna.load_study(study_name=study, storage=store)
        except KeyError:
            names = [s.study_name for s in optuna.get_all_study_summaries(store)]
            _fail(
                f"--study {study!r}: no such study in {redact_url(url)} "
                f"(studies: {', '.join(names) or 'none'})"
            )
    data = study_report(loaded, storage=store)
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        console.print(report_table(data))


@storage_app.command("check")
def storage_check(
    storage: StorageOpt = None,
    upgrade: Annotated[
        bool, typer.Option("--upgrade", help="Upgrade the schema if it is behind.")
    ] = False,
) -> None:
    """Say whether the storage is reachable and its schema current; upgrade on request."""
    from storage import check_storage
    from storage import resolve_storage_url

    with _user_errors():
        status = check_storage(resolve_storage_url(storage), upgrade=upgrade)
    console.print(status.message, highlight=False)
    if not status.reachable or not status.schema_current:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
