"""The models a worker trains: what ``from_pretrained`` loads for each (a tiny replica with
``--tiny``) and each one's architecture facts, for the preflight's memory estimate.
"""

from __future__ import annotations

from search.record.models import ModelInfo
from search.spec.model_facts import facts_of_directory
from search.spec.model_facts import model_ref
from search.spec.model_facts import resolve_facts
from search.spec.model_resolve import ModelsUnavailableError
from search.spec.options import RunOptions
from search.spec.study_spec import StudySpec
from search.train.data import load_train
from search.train.tiny_layout import MARKER
from search.train.tiny_layout import replica_facts
from search.train.tiny_layout import tiny_replica_dir

__all__ = ["model_facts", "prepare_models"]


def prepare_models(
    spec: StudySpec, opts: RunOptions, names: list[str] | None = None
) -> dict[str, str]:
    """Model name -> what ``from_pretrained`` loads; builds tiny replicas with ``--tiny``."""
    names = names or list(spec.models)
    if not opts.tiny:
        return {name: model_ref(spec, name) for name in names}
    facts = {name: resolve_facts(spec, name, attention=False) for name in names}
    built = {name: tiny_replica_dir(info, opts.cache_dir / "tiny") for name, info in facts.items()}
    if all((path / MARKER).is_file() for path in built.values()):
        return {name: str(path) for name, path in built.items()}  # nothing to build: no torch
    import transformers  # lazy: only building replicas needs it (transformers imports torch)

    from search.train.tiny import build_tiny_replica  # imports torch: only to build

    transformers.utils.logging.disable_progress_bar()  # "Writing model shards" per replica
    train = load_train(spec.resolve_path(spec.data.train))
    texts = [t for ex in train for t in (ex.query, ex.positive, *ex.negatives)]
    return {
        name: str(build_tiny_replica(info, opts.cache_dir / "tiny", texts))
        for name, info in facts.items()
    }


def model_facts(
    spec: StudySpec, opts: RunOptions, model_paths: dict[str, str]
) -> dict[str, ModelInfo]:
    """Each searched model's facts (``search.spec.model_facts``); a tiny replica's, from its
    config."""
    facts = {}
    for name in model_paths:
        try:
            # --tiny needs no hub: its facts come from the replica's own config below.
            info = resolve_facts(spec, name, download=not opts.tiny)
        except LookupError as exc:  # the hub answered, but its config did not come
            raise ModelsUnavailableError(
                f"{exc}; fix: hf download {model_paths[name]}, or set models.{name}.path: DIR"
            ) from None
        if opts.tiny:  # the replica's marker, else its config.json (transformers, torch)
            built = replica_facts(info, model_paths[name])
            info = built or facts_of_directory(info, model_paths[name])
        facts[name] = info
    return facts
