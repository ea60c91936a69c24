"""Options of ``search run`` and ``search worker``, declared once, and the RunOptions they make.

Adding an option: one field in :class:`RunArgs` (its type, default and ``typer.Option``) and,
if the runner reads it, one field of the same name in ``search.spec.options.RunOptions``. Nothing
here imports torch, optuna or the storage layer: these are checked before any of them loads.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated
from typing import get_type_hints

import typer

from search.record.config import DEFAULT_OBJECTIVE
from search.spec.options import RunOptions

FORCE_SPACE_HELP = (
    "Run an existing study although its stored space differs from the spec's. Its trials were "
    "sampled from the old space and TPE keeps learning from them: multivariate TPE keeps the "
    "ranges of the study's first trials for its joint model and samples a parameter "
    "independently when that model's value lies outside the new range. Changed categorical "
    "choices (models, batch_size, max_len) or log scales are refused even so (Optuna cannot "
    "mix them in one study): use another --study-name. The study then stores the new spec."
)


StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Storage URL (postgresql://..., sqlite:///file.db). Default: $SEARCH_STORAGE, "
        "else the URL in the file $SEARCH_STORAGE_FILE, else search.db in the working directory.",
    ),
]
"""``--storage``: shared by run, worker, report and storage check."""


class OptionError(ValueError):
    """A bad option value; the message is one line naming the option and the value."""


@dataclass(frozen=True)
class RunArgs:
    """Every option of ``search run`` / ``search worker``, as typed on the command line."""

    study: Annotated[
        str | None,
        typer.Option("--study", help="Shipped study spec to run (e.g. ko-retrieval)."),
    ] = None
    spec: Annotated[
        Path | None, typer.Option("--spec", help="Your own study spec (YAML) instead of --study.")
    ] = None
    storage: StorageOpt = None
    n_trials: Annotated[
        int | None,
        typer.Option(
            "--n-trials",
            min=1,
            help="The study's total budget of finished trials, stored with a new study "
            "(default: the spec's study.n_trials).",
        ),
    ] = None
    set_n_trials: Annotated[
        bool, typer.Option("--set-n-trials", help="Change the stored budget of an existing study.")
    ] = False
    gpu: Annotated[
        str | None,
        typer.Option("--gpu", help="GPU index for this worker (else CUDA_VISIBLE_DEVICES)."),
    ] = None
    timeout: Annotated[
        float | None,
        typer.Option("--timeout", min=1, help="Stop starting trials after S seconds."),
    ] = None
    seed: Annotated[int | None, typer.Option("--seed", help="Sampler seed.")] = None
    tiny: Annotated[
        bool, typer.Option("--tiny", help="Tiny offline replicas of each model (no downloads).")
    ] = False
    skip_unavailable: Annotated[
        bool,
        typer.Option(
            "--skip-unavailable",
            help="Search only the models whose weights are here (local path or Hugging Face "
            "cache); recorded on a new study. Default: a missing model stops the run (exit 2).",
        ),
    ] = False
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto"
    memory_limit: Annotated[
        str | None, typer.Option("--memory-limit", help="Cap each trial's memory, e.g. 6GiB.")
    ] = None
    no_preflight: Annotated[
        bool, typer.Option("--no-preflight", help="Do not skip configs by memory estimate.")
    ] = False
    no_frontier: Annotated[
        bool, typer.Option("--no-frontier", help="Do not skip configs dominated by an OOM.")
    ] = False
    study_name: Annotated[
        str | None, typer.Option("--study-name", help="Optuna study name (default: the spec's).")
    ] = None
    force_space: Annotated[bool, typer.Option("--force-space", help=FORCE_SPACE_HELP)] = False
    wandb: Annotated[
        bool | None,
        typer.Option(
            "--wandb/--no-wandb",
            help="One Weights & Biases run per trial (offline under the study's directory "
            "unless WANDB_API_KEY is set). Default: the spec's tracking.wandb (off).",
        ),
    ] = None
    wandb_project: Annotated[
        str | None,
        typer.Option(
            "--wandb-project", help="W&B project (default: tracking.project, else the study)."
        ),
    ] = None
    wandb_entity: Annotated[
        str | None,
        typer.Option(
            "--wandb-entity",
            help="W&B team or user (default: tracking.entity, else $WANDB_ENTITY, else yours).",
        ),
    ] = None
    objective: Annotated[str, typer.Option("--objective", hidden=True)] = DEFAULT_OBJECTIVE
    callback: Annotated[
        list[str] | None,
        typer.Option(
            "--callback",
            help="Observe this worker's trials with your own code, MODULE:NAME (repeatable): "
            "a search.worker.events.Subscriber subclass or instance, or a function "
            "fn(study, frozen_trial) called after each trial this worker told, like Optuna's "
            "optimize callbacks. Called on the worker's event thread, never delaying a trial.",
        ),
    ] = None


WORKER_ONLY = frozenset({"gpu"})
"""Options that only ``search worker`` has."""


def with_run_args(
    *, exclude: frozenset[str] = frozenset()
) -> Callable[[Callable[[RunArgs], None]], Callable[..., None]]:
    """Turn ``body(args: RunArgs)`` into a typer command taking every RunArgs field as an option.

    Args:
        exclude: Fields this command does not offer (their defaults are used).
    """
    hints = get_type_hints(RunArgs, include_extras=True)
    params = [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name]
        )
        for f in dataclasses.fields(RunArgs)
        if f.name not in exclude
    ]

    def decorate(body: Callable[[RunArgs], None]) -> Callable[..., None]:
        def command(**values: object) -> None:
            body(RunArgs(**values))  # type: ignore[arg-type]

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.__name__ = body.__name__
        command.__qualname__ = body.__qualname__
        command.__doc__ = body.__doc__
        return command

    return decorate


def check_device_name(device: str) -> None:
    """Reject a --device that is not auto, cpu, cuda or cuda:N (no torch needed)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise OptionError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")


def check_device_available(device: str) -> None:
    """Reject a CUDA --device this machine does not have (imports torch: call it last)."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise OptionError(
            f"--device {device!r}: CUDA is not available here (use --device cpu or auto)"
        )
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise OptionError(
            f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here"
        )


MAX_TIMEOUT_S = 366 * 24 * 3600.0  # --timeout: a year (and a day) at most
_GPU = re.compile(r"\d+|(?:GPU|MIG)-[0-9A-Za-z/-]+")  # CUDA_VISIBLE_DEVICES: index or UUID


def check_gpu(gpu: str | None) -> None:
    """Reject a ``--gpu`` that is not one device index (or an nvidia-smi -L UUID).

    Example:
        >>> check_gpu("1"); check_gpu("GPU-5ad9c2e1-8b2f-4c0e-9d77-2a1f0b6e3c44")
        >>> check_gpu("banana")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        search.cli.run_options.OptionError: --gpu 'banana': expected one GPU index such as 0, ...
    """
    if gpu is not None and not _GPU.fullmatch(gpu):
        raise OptionError(
            f"--gpu {gpu!r}: expected one GPU index such as 0, or a GPU-/MIG- UUID as "
            "nvidia-smi -L lists them"
        )


def check_timeout(timeout: float | None) -> None:
    """Reject a ``--timeout`` that is not finite or longer than :data:`MAX_TIMEOUT_S`."""
    if timeout is not None and not 0 < timeout <= MAX_TIMEOUT_S:
        raise OptionError(
            f"--timeout {timeout!r}: expected seconds up to {MAX_TIMEOUT_S:.0f} (366 days); "
            "leave it out for no time limit"
        )


def check_study_name(name: str | None, option: str = "--study-name") -> None:
    """Reject an empty or blank name option (it would silently mean the spec's, or W&B's)."""
    if name is not None and not name.strip():
        raise OptionError(
            f"{option} {name!r}: empty; give a name, or leave the option out for the spec's"
        )


def run_options(args: RunArgs) -> RunOptions:
    """The RunOptions of ``args``: same-named fields pass through, the rest are converted here.

    Raises:
        OptionError: A bad ``--device``, ``--gpu``, ``--timeout``, ``--study-name`` or
            ``--memory-limit``.
        StorageError: A bad ``--storage`` URL.
    """
    from search.memory.device import parse_size  # light: torch loads inside device_info only

    check_device_name(args.device)
    check_gpu(args.gpu)
    check_timeout(args.timeout)
    check_study_name(args.study_name)
    check_study_name(args.wandb_project, "--wandb-project")
    check_study_name(args.wandb_entity, "--wandb-entity")
    try:
        limit = parse_size(args.memory_limit) if args.memory_limit else None
    except ValueError as exc:
        raise OptionError(f"--memory-limit {args.memory_limit!r}: {exc}") from None
    from storage import resolve_storage_url  # after the checks above: it imports optuna

    names = {f.name for f in dataclasses.fields(RunOptions)}
    same = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name in names}
    return RunOptions(
        **{
            **same,
            "storage_url": resolve_storage_url(args.storage),
            "memory_limit": limit,
            "use_estimate": not args.no_preflight,
            "use_frontier": not args.no_frontier,
        }
    )
