"""The ``search`` command: run a study, run a worker, report, check the storage.

search run --study ko-retrieval --tiny --n-trials 8
search worker --study ko-retrieval --storage postgresql://... --gpu 0
search report --study ko-retrieval-tiny [--json] [--plots DIR]
search storage check --storage postgresql://... [--upgrade]
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Annotated
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from search.cli.proxy_options import InsecurePublicOpt
from search.cli.proxy_options import TlsCertOpt
from search.cli.proxy_options import TlsClientCaOpt
from search.cli.proxy_options import TlsKeyOpt
from search.cli.proxy_options import TokenFileOpt
from search.cli.run_options import WORKER_ONLY
from search.cli.run_options import RunArgs
from search.cli.run_options import StorageOpt
from search.cli.run_options import with_run_args

if TYPE_CHECKING:
    from collections.abc import Sequence

    import optuna
    from optuna.storages import BaseStorage
    from rich.progress import TaskID

    from search.spec.options import RunOptions
    from search.spec.study_spec import StudySpec
    from search.worker.events import Subscriber
    from search.worker.runner import RunSummary


class _OneLineUsage(typer.Typer):
    """The app, run as a program: a usage error (an unknown option, a value out of its range,
    a missing one) is one line and exit 2 like every other error, not click's usage box."""

    def __call__(self, *args: object, **kwargs: object) -> NoReturn:
        from typer.exceptions import Abort
        from typer.exceptions import TyperException  # click's ClickException's base, in typer

        kwargs.setdefault("standalone_mode", False)  # the errors come here, not to click
        try:
            code = super().__call__(*args, **kwargs)
        except TyperException as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `search` alone: the help
                exc.show()  # type: ignore[attr-defined]
                sys.exit(exc.exit_code)
            message = " ".join(exc.format_message().split())
            names: list[str] = []
            ctx = getattr(exc, "ctx", None)
            while ctx is not None and ctx.parent is not None:  # up to the program's own
                names.insert(0, ctx.info_name or "")
                ctx = ctx.parent
            hint = " ".join(["search", *names, "--help"])
            err_console.print(
                f"[bold red]error:[/] {escape(message)} ({hint})", highlight=False, soft_wrap=True
            )
            sys.exit(exc.exit_code)
        except Abort:
            err_console.print("aborted", highlight=False)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


# Each command imports what it runs inside its function (lazy, on purpose): ``search --help``
# and the spec commands stay free of optuna, storage, torch and transformers.
app = _OneLineUsage(
    help="Hyperparameter search for Korean bi-encoder retrieval models, on Optuna.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)
storage_app = typer.Typer(
    help="Inspect and upgrade the study storage.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(storage_app, name="storage")
spec_app = typer.Typer(
    help="Write and check study specs.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(spec_app, name="spec")

# Piped output (CI logs, files) gets a wide table instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 180)
err_console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> NoReturn:
    # escape: a message may hold brackets (an IPv6 host, `pip install 'pkg[extra]'`)
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _open_study(
    study: str, storage: str | None
) -> tuple[str, optuna.storages.BaseStorage, optuna.Study]:
    """The storage URL, the storage and the study ``study`` in it; no such study: one line.

    Opens an existing storage only (creates nothing); call it inside ``_user_errors()``.
    """
    import optuna

    from storage import create_storage
    from storage import redact_url
    from storage import resolve_storage_url

    url = resolve_storage_url(storage)
    store = create_storage(url, heartbeat_interval=None, must_exist=True)
    try:
        return url, store, optuna.load_study(study_name=study, storage=store)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(store)]
        _fail(
            f"--study {study!r}: no such study in {redact_url(url)} "
            f"(studies: {', '.join(names) or 'none'})"
        )


# The user's mistakes, as (module, class): shown as one line with exit code 2.
USER_ERRORS = (
    ("search.cli.run_options", "OptionError"),
    ("search.spec.study_spec", "SpecError"),
    ("search.train.data", "DataError"),
    ("search.worker.budget", "BudgetError"),
    ("search.spec.model_resolve", "ModelsUnavailableError"),
    ("storage", "StorageError"),
    ("search.sampling.refine", "RefineError"),
    ("search.worker.events", "CallbackError"),
    ("search.worker.dispatch", "FlushSettingError"),
    ("search.train.cache_settings", "CacheSettingError"),
    ("search.cli.environment", "SettingError"),
)


def _loaded(names: tuple[tuple[str, str], ...]) -> tuple[type[BaseException], ...]:
    """The classes among ``names`` whose module is loaded (one not loaded cannot have raised).

    So a bad spec is reported without importing optuna (storage) or torch first.
    """
    return tuple(getattr(sys.modules[m], c) for m, c in names if m in sys.modules)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the user's mistakes into one-line errors with exit code 2 (never a traceback)."""
    from search.record.errors import RunError

    try:
        yield
    except RunError as exc:
        _fail(str(exc), code=1)
    except Exception as exc:
        if isinstance(exc, _loaded(USER_ERRORS)):
            _fail(str(exc))
        raise


def _run(args: RunArgs, *, service: bool = False) -> None:
    """Check options, spec, data and the stored study (no torch yet), then run the trials."""
    from search.cli.run_options import check_device_available
    from search.cli.run_options import run_options
    from search.spec.load import check_spec_data
    from search.spec.load import resolve_spec
    from search.spec.options import study_name_for
    from search.spec.space_check import check_stored_space
    from search.spec.space_check import missing_sqlite

    with _user_errors():
        from search.cli.environment import check_environment

        check_environment()  # every $SEARCH_* variable: a bad one is exit 2 before any work
        spec = resolve_spec(args.study, str(args.spec) if args.spec else None)
        check_spec_data(
            spec, model_paths=not (args.tiny or args.skip_unavailable), weights=not args.tiny
        )
        opts = run_options(args)  # imports the storage layer (optuna) for the URL
        if service:  # a long-running worker: refuse a placeholder or missing password
            from storage import check_password

            check_password(opts.storage_url)
        callbacks = _callbacks(args.callback or [])  # a bad one: exit 2 before any work
        name = study_name_for(spec, opts)
        _check_name_length(name, spec, opts)
        from storage import check_new_sqlite
        from storage import create_storage

        # One storage for the whole run: the checks read it, the worker runs on it. A missing
        # SQLite file holds no study to check; the worker creates it (its directory is checked
        # here: the worker starts the trial server before it opens the storage).
        new = missing_sqlite(opts.storage_url)
        if new:
            check_new_sqlite(opts.storage_url)
        storage = None if new else create_storage(opts.storage_url)
        if storage is not None:  # replicas and real weights never share a study
            from search.worker.study_store import check_replicas

            check_replicas(storage, name, opts.tiny)
        check_stored_space(opts.storage_url, name, spec, force=args.force_space, storage=storage)
        from search.spec.model_resolve import check_before_run

        # Missing weights: exit 2 in seconds, no study.
        check_before_run(spec, opts, name, storage=storage)
        check_device_available(opts.device)  # imports torch for a cuda device: last
        from search.observe.subscribers import standard_subscribers
        from storage import redact_url

        console.print(f"study [bold]{name}[/] in {redact_url(opts.storage_url)}", highlight=False)
        from search.observe.tracking import tracking_settings

        wandb_line = tracking_settings(spec, opts).describe()
        if wandb_line:  # W&B on: say so, where the runs go, and how offline ones get there
            _say(wandb_line)
        subscribers = [*standard_subscribers(spec, opts), *callbacks]
        summary = _run_with_progress(spec, opts, storage, subscribers)
    from search.observe.report import study_report
    from search.observe.report_view import report_view

    report = study_report(summary.study)
    _report_console().print(report_view(report), crop=False)
    again = f"search report --study {shlex.quote(summary.study_name)}"
    if not _storage_from_env(args.storage):  # else the same environment names it again
        again += f" --storage {shlex.quote(summary.storage_url)}"
    _say(
        f"{summary.trials_run} trials run by this worker (stopped by {summary.stopped_by}); "
        f"study {summary.study_name} in {summary.storage_url}. Report again: {again}"
    )


def _say(text: str, out: Console | None = None) -> None:
    """Print a line holding a command to copy: never wrapped (rich wraps at the console's
    width, which would split the command, e.g. leave ``--storage`` without its URL)."""
    (out or console).print(text, highlight=False, markup=False, soft_wrap=True)


def _check_name_length(name: str, spec: StudySpec, opts: RunOptions) -> None:
    """A study name longer than the storage's column (PostgreSQL refuses it, SQLite not):
    refused on both, naming where it came from."""
    from search.cli.run_options import OptionError
    from search.spec.study_spec import SpecError
    from storage import study_name_limit

    limit = study_name_limit()
    if len(name) <= limit:
        return
    why = f"{len(name)} characters, the storage holds at most {limit}"
    if opts.study_name:
        raise OptionError(f"--study-name {name[:40]!r}...: {why}")
    raise SpecError(f"{spec.source}: field study.name (value: {spec.study.name[:40]!r}...): {why}")


def _storage_from_env(option: str | None) -> bool:
    """Whether the storage URL came from ``$SEARCH_STORAGE`` / ``$SEARCH_STORAGE_FILE``."""
    from storage import storage_url_source

    return storage_url_source(option) not in ("option", "default")


def _callbacks(refs: list[str]) -> list[Subscriber]:
    """The ``--callback`` subscribers, loaded (a bad one: ``CallbackError``, exit 2)."""
    from search.worker.events import load_subscriber

    return [load_subscriber(ref) for ref in refs]


def _run_with_progress(
    spec: StudySpec,
    opts: RunOptions,
    storage: BaseStorage | None = None,
    subscribers: Sequence[Subscriber] = (),
) -> RunSummary:
    import optuna
    from rich.progress import BarColumn
    from rich.progress import MofNCompleteColumn
    from rich.progress import Progress
    from rich.progress import TextColumn
    from rich.progress import TimeElapsedColumn

    from search.record import attrs
    from search.record.trial_record import is_oom
    from search.worker.runner import run_study

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
        task: TaskID | None = None  # no bar until the study is open and trials start
        mine: list[int] = []

        def on_progress(budget: int, finished: int) -> None:
            # The study's count (all workers'), re-read after each trial of this worker.
            nonlocal task
            if task is None:
                task = progress.add_task("", total=budget, completed=finished)
            progress.update(task, total=budget, completed=finished)

        def on_trial(frozen: optuna.trial.FrozenTrial) -> None:
            state = frozen.state.name.lower()
            if is_oom(frozen.user_attrs):
                state = f"oom ({frozen.user_attrs.get(attrs.OOM_KIND)})"
            if frozen.state.name == "COMPLETE" and frozen.value is not None:
                best.append(frozen.value)
            mine.append(frozen.number)
            model = frozen.user_attrs.get(attrs.MODEL, "?")
            if task is None:  # on_progress runs first; a trial never comes before it
                return
            progress.update(
                task,
                description=f"#{frozen.number} {model}: {state}"
                + (f" | best {max(best):.4f}" if best else "")
                + f" | {len(mine)} by this worker",
            )

        summary = run_study(
            spec,
            opts,
            storage=storage,
            subscribers=subscribers,
            on_trial=on_trial,
            on_progress=on_progress,
            check_data=False,
        )
    if summary.stopped_by in ("sigterm", "sigint"):
        what = "interrupted" if summary.stopped_by == "sigint" else "terminated"
        if summary.handed_back is not None:
            done = f"trial {summary.handed_back} handed back and re-queued"
        else:
            done = "no trial was running"
        console.print(f"{what}: {done}", highlight=False)
        if summary.stopped_by == "sigint":
            raise typer.Exit(130)  # the shell's code for Ctrl-C
    return summary


@app.command(short_help="Run the whole search in this process (one worker).")
@with_run_args(exclude=WORKER_ONLY)
def run(args: RunArgs) -> None:
    """Run the whole search in this process (one worker), on the embedded default storage."""
    _run(args)


@app.command(short_help="Pull trials from a shared study until its budget is spent.")
@with_run_args()
def worker(args: RunArgs) -> None:
    """Pull trials from a shared study until its global budget is spent, then exit 0."""
    _run(args, service=True)


@app.command(short_help="Per-model report: outcomes, OOM rate, best scores.")
def report(
    study: Annotated[str, typer.Option("--study", help="Optuna study name (e.g. ko-retrieval).")],
    storage: StorageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    plots: Annotated[
        Path | None,
        typer.Option(
            "--plots",
            help="Also write the plots (PNG, and one offline HTML page) into this directory.",
        ),
    ] = None,
    publish: Annotated[
        bool,
        typer.Option(
            "--publish",
            help="Save the report as the study's dashboard note and its plots as artifacts.",
        ),
    ] = False,
    artifacts: Annotated[
        Path | None,
        typer.Option(
            "--artifacts",
            help="Artifact directory for --publish (default: $SEARCH_ARTIFACTS, else "
            "<sqlite file>.artifacts; required for PostgreSQL).",
        ),
    ] = None,
) -> None:
    """Per-model report: best trial, outcomes, OOM rate and configs, best nDCG@10, plots."""
    import optuna

    from search.observe.report import study_report
    from search.observe.report_view import report_view

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if plots is not None:
        _check_plots_dir(plots)
    with _user_errors():
        url, store, loaded = _open_study(study, storage)
    published = _publish(loaded, url, artifacts) if publish else None
    data = study_report(loaded, storage=store)
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        _report_console().print(report_view(data), crop=False)
    if plots is not None:
        _write_plots(loaded, store, plots, quiet=as_json)
    if published:
        err_console.print(published, highlight=False, soft_wrap=True)


def _publish(study: optuna.Study, url: str, artifacts: Path | None) -> str:
    """``report --publish``: the note and the plots; a mistake is one line, nothing written."""
    from search.observe.publish import PublishError
    from search.observe.publish import publish

    try:
        done = publish(study, url=url, artifacts=artifacts)
    except PublishError as exc:
        _fail(str(exc))
    return (
        f"published to the dashboard: the study note, {done['trial_notes']} trial notes "
        f"written or brought up to date, and {len(done['artifacts'])} plots "
        f"(artifacts in {done['directory']}; serve them with search dashboard)"
    )


def _report_console() -> Console:
    """The terminal's width, else the 100 columns the report is laid out for."""
    from search.observe.report_view import WIDTH

    return console if sys.stdout.isatty() else Console(width=WIDTH)


def _check_plots_dir(path: Path) -> None:
    """``--plots DIR``: the plot libraries are installed and DIR can be a directory."""
    from search.observe.plots import PlotsUnavailableError
    from search.observe.plots import require_plot_libs

    try:
        require_plot_libs()
    except PlotsUnavailableError as exc:
        _fail(str(exc))
    if path.exists() and not path.is_dir():
        _fail(f"--plots {path}: exists and is not a directory")


def _write_plots(study: optuna.Study, store: object, path: Path, *, quiet: bool) -> None:
    """Write the plots of ``study`` into ``path`` and say where (stderr under --json)."""
    from search.observe.plot_style import HTML
    from search.observe.plots import write_plots

    try:
        written = write_plots(study, path, storage=store)  # type: ignore[arg-type]
    except OSError as exc:
        _fail(f"--plots {path}: {exc.strerror or exc}")
    out = err_console if quiet else console
    out.print(f"{len(written)} plots in {path} (open {path / HTML})", highlight=False)


@storage_app.command("check", short_help="Whether the storage is reachable, its schema current.")
def storage_check(
    storage: StorageOpt = None,
    upgrade: Annotated[
        bool, typer.Option("--upgrade", help="Upgrade the schema if it is behind.")
    ] = False,
) -> None:
    """Say whether the storage is reachable and its schema current; upgrade on request.

    Exit 0: usable; 1: the schema is behind (--upgrade); 2: unreachable, or a wrong URL.
    """
    from storage import check_storage
    from storage import resolve_storage_url

    with _user_errors():
        status = check_storage(resolve_storage_url(storage), upgrade=upgrade)
    if not status.reachable:  # like every command: one line, exit 2
        _fail(status.message)
    console.print(status.message, highlight=False, markup=False, soft_wrap=True)
    if not status.schema_current:
        raise typer.Exit(1)


@app.command(short_help="optuna-dashboard on the study storage.")
def dashboard(
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port.")] = 8080,
    artifacts: Annotated[
        Path | None,
        typer.Option(
            "--artifacts",
            help="Artifact directory (default: $SEARCH_ARTIFACTS, else <sqlite file>.artifacts).",
        ),
    ] = None,
    public: Annotated[
        bool,
        typer.Option("--public", help="Allow a non-loopback --host (the dashboard has no login)."),
    ] = False,
) -> None:
    """optuna-dashboard on the study storage (URL as for every command: no password in argv)."""
    from search.observe.dashboard import DashboardError
    from search.observe.dashboard import serve
    from storage import resolve_storage_url

    with _user_errors():
        try:
            serve(
                resolve_storage_url(storage),
                host=host,
                port=port,
                artifacts=artifacts,
                public=public,
            )
        except DashboardError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


@app.command(short_help="Optuna's gRPC storage proxy in front of the database.")
def proxy(
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port.")] = 13000,
    threads: Annotated[
        int, typer.Option("--threads", min=4, help="Server threads (about 4 per worker).")
    ] = 256,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
    tls_client_ca: TlsClientCaOpt = None,
    token_file: TokenFileOpt = None,
    insecure_public: InsecurePublicOpt = False,
) -> None:
    """Optuna's gRPC storage proxy in front of the study database (workers: grpc://HOST:PORT)."""
    from search.cli.proxy import serve
    from storage import resolve_storage_url
    from storage import server_security

    with _user_errors():
        security = server_security(tls_cert, tls_key, tls_client_ca, token_file)
        stopped_by = serve(
            resolve_storage_url(storage),
            host=host,
            port=port,
            threads=threads,
            security=security,
            insecure_public=insecure_public,
        )
    err_console.print(f"search proxy stopped ({stopped_by})", highlight=False)


@app.command("refine", short_help="Enqueue new configs around the top K trials.")
def refine_cmd(
    study: Annotated[str, typer.Option("--study", help="Optuna study name (e.g. ko-retrieval).")],
    storage: StorageOpt = None,
    top: Annotated[
        int, typer.Option("--top", min=1, help="Refine around this many best trials.")
    ] = 3,
    n_trials: Annotated[
        int, typer.Option("--n-trials", min=1, help="Enqueue at most this many configs.")
    ] = 8,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the random draws.")] = None,
    memory_limit: Annotated[
        str | None,
        typer.Option(
            "--memory-limit",
            help="Memory of the device the configs will run on, e.g. 24GiB, for the OOM "
            "frontier (default: the device each top trial ran on).",
        ),
    ] = None,
) -> None:
    """Enqueue new configs around the top K trials; the study's next run or workers run them.

    Neighbouring batch sizes and lengths within the space and its conditions, learning rate
    and temperature within a factor of 2 of the best; never a config already tried or one an
    earlier real OOM rules out. The study's budget grows by the number enqueued.
    """
    import optuna
    from pydantic import ValidationError

    from search.memory.device import parse_size
    from search.record import attrs
    from search.sampling.refine import enqueue_refine
    from search.spec.study_spec import StudySpec
    from storage import redact_url

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        limit = parse_size(memory_limit) if memory_limit else None
    except ValueError as exc:
        _fail(f"--memory-limit {memory_limit!r}: {exc}")
    with _user_errors():
        url, _, loaded = _open_study(study, storage)
        from search.record.stored_spec import stored_spec_of

        stored = stored_spec_of(loaded)
        try:
            spec = StudySpec.model_validate(stored)
        except ValidationError:
            _fail(f"--study {study!r}: the study holds no readable spec (run by search run?)")
        done = enqueue_refine(
            loaded, spec, top_k=top, n=n_trials, seed=seed, device_total_bytes=limit
        )
    from search.observe.report_view import short_config

    budget = loaded.user_attrs.get(attrs.STUDY_N_TRIALS)
    console.print(
        f"enqueued {len(done)} config{'' if len(done) == 1 else 's'} around the top {top} "
        f"trials of study {study} (budget now {budget} trials)",
        highlight=False,
    )
    for params in done:
        console.print(f"  {params['model']} {short_config(params)}", highlight=False)
    if done:
        again = f"search run --spec {shlex.quote(spec.source)} --study-name {shlex.quote(study)}"
        if not _storage_from_env(storage):
            again += f" --storage {shlex.quote(redact_url(url))}"
        from search.worker.study_store import replica_of

        tiny = " --tiny" if replica_of(loaded) else ""
        _say(f"run them: {again}{tiny} (or search worker ...)")


@spec_app.command("init", short_help="Write a spec of your own from a shipped one.")
def spec_init(
    file: Annotated[Path, typer.Argument(help="The spec file to write.", show_default=False)],
    from_: Annotated[
        str, typer.Option("--from", help="The shipped spec to start from.")
    ] = "ko-retrieval",
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing FILE.")] = False,
) -> None:
    """Write a spec of your own (a copy of a shipped one that still finds the demo data)."""
    from search.spec.init import init_spec

    with _user_errors():
        written = init_spec(file, from_, force=force)
    _say(
        f"wrote {written} (from the shipped {from_} spec; its data paths point at the shipped "
        f"demo data). Run it: search run --spec {shlex.quote(str(written))} --tiny"
    )


@spec_app.command("check", short_help="Check a spec and its data as search run would.")
def spec_check(
    file: Annotated[Path, typer.Argument(help="The spec file to check.", show_default=False)],
) -> None:
    """Check a spec and its data as `search run` would, without touching any study."""
    from search.spec.load import check_spec_data
    from search.spec.load import load_spec

    with _user_errors():
        spec = load_spec(file)
        check_spec_data(spec)
    n = len(spec.models)
    _say(f"{file}: ok ({n} model{'' if n == 1 else 's'}, study {spec.study.name})")


@spec_app.command("schema", short_help="Print the spec's JSON Schema (for editors).")
def spec_schema_command(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="The file to write (else stdout).")
    ] = None,
) -> None:
    """Print the spec's JSON Schema, for editors to validate and complete specs."""
    import json

    from search.spec.schema import spec_schema

    text = json.dumps(spec_schema(), indent=2, ensure_ascii=False) + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        _fail(f"--output {output}: {exc.strerror or exc}")
    err_console.print(f"wrote {output}", highlight=False)


@spec_app.command("from-wandb", short_help="Turn a W&B sweep configuration into a spec.")
def spec_from_wandb(
    sweep: Annotated[Path, typer.Argument(help="The W&B sweep (YAML).", show_default=False)],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="The spec file to write (else stdout).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing OUTPUT.")] = False,
) -> None:
    """Turn a W&B sweep configuration into a study spec (checked before it is written)."""
    from search.spec.wandb_sweep import convert_file

    with _user_errors():
        result = convert_file(sweep, output, force=force)
    if output is None:
        sys.stdout.write(result.to_yaml())
        return
    for note in result.notes:
        console.print(f"  {note}", highlight=False, markup=False)
    _say(f"wrote {output}. Run it: search run --spec {shlex.quote(str(output))} --tiny")


@app.command(short_help="The best trial: model, metrics, config, kept model.")
def best(
    study: Annotated[str, typer.Option("--study", help="Optuna study name (e.g. ko-retrieval).")],
    storage: StorageOpt = None,
    export: Annotated[
        Path | None,
        typer.Option(
            "--export",
            help="Write the best trial's model here as a sentence-transformers model (a new "
            "or empty directory); retrains its config when the study kept no model of it.",
        ),
    ] = None,
    artifacts: Annotated[
        Path | None,
        typer.Option(
            "--artifacts",
            help="Read kept models from this directory (default: the trial's store).",
        ),
    ] = None,
    tolerance: Annotated[
        float,
        typer.Option(
            "--tolerance",
            min=0.0,
            help="Largest difference of a retrained value from the recorded.",
        ),
    ] = 0.01,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="Where a retrain runs: cpu, cuda, cuda:N (default: the trial's device).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """The best trial: number, model, metrics, config, kept model; --export DIR writes it."""
    import optuna

    from search.observe.best import BestError
    from search.observe.best import ExportError
    from search.observe.best import best_summary
    from search.observe.best import best_trial
    from search.observe.best import check_export_dir
    from search.observe.best import export_best
    from search.observe.best import format_best

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _user_errors():
        try:
            if export is not None:
                check_export_dir(export)  # before anything is read or trained
            if device is not None:
                from search.cli.run_options import check_device_available
                from search.cli.run_options import check_device_name

                check_device_name(device)
                check_device_available(device)
            _, _, loaded = _open_study(study, storage)
            trial = best_trial(loaded)
            summary = best_summary(loaded, trial)
            done = None
            if export is not None:
                if not as_json:
                    console.print("\n".join(format_best(summary)), highlight=False, markup=False)
                    if summary["artifact"] is None:
                        console.print(f"retraining trial {trial.number} ...", highlight=False)
                done = export_best(
                    loaded,
                    export,
                    trial=trial,
                    artifacts=artifacts,
                    tolerance=tolerance,
                    device=device,
                )
        except BestError as exc:
            _fail(str(exc))
        except ExportError as exc:
            _fail(str(exc), code=1)
    if as_json:
        sys.stdout.write(json.dumps({**summary, "export": done}) + "\n")
        return
    if done is None:
        console.print("\n".join(format_best(summary)), highlight=False, markup=False)
        return
    how = (
        "its kept model"
        if done["how"] == "artifact"
        else f"retrained: {summary['metric']} {done['retrained']:.4f}, recorded "
        f"{done['recorded']:.4f}"
    )
    if summary.get("tiny_replicas"):
        how += "; a tiny replica, not the real weights: for trying the service, not serving"
    _say(
        f"exported trial {trial.number} to {export} ({how}); load it with "
        f"SentenceTransformer({str(export)!r}), then encode_query / encode_document"
    )


if __name__ == "__main__":
    app()
