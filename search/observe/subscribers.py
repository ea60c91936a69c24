"""The observers ``search run`` / ``search worker`` attach to a worker's trial events.

Each is a ``search.worker.events.Subscriber``, called on the worker's event thread (never on
the trial step nor under the budget lock): the dashboard notes (``search.observe.publish``),
one W&B run per trial when tracking is on (``search.observe.tracking``) and the kept top-K
models (``search.observe.keep``). ``run_study(spec, opts, subscribers=standard_subscribers(spec,
opts))`` runs a study as the CLI does.
"""

from __future__ import annotations

from search.observe.keep import KeepSubscriber
from search.observe.publish import NotesSubscriber
from search.observe.tracking import TrackingSubscriber
from search.observe.tracking import tracking_settings
from search.spec.options import RunOptions
from search.spec.options import study_name_for
from search.spec.study_spec import StudySpec
from search.worker.events import Subscriber

__all__ = ["standard_subscribers"]


def standard_subscribers(spec: StudySpec, opts: RunOptions) -> list[Subscriber]:
    """The CLI's observers of a worker: dashboard notes, W&B runs (when on), kept models.

    Build them before ``Worker.open``: the W&B one imports wandb on a thread meanwhile.
    """
    subscribers: list[Subscriber] = [NotesSubscriber(), KeepSubscriber(spec, opts)]
    settings = tracking_settings(spec, opts)
    if settings.enabled:
        subscribers.append(TrackingSubscriber(settings, study_name_for(spec, opts)))
    return subscribers
