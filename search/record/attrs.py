"""Every key of the trial record and of the study record: the contract between workers,
preflight, frontier, report, dashboard and W&B.

User attributes are short and flat (the dashboard's trial table shows one column per key and
one line per trial); JSON objects (the effective config, the metrics) are system attributes,
which the dashboard leaves out of the table and scripts read as ``trial.system_attrs``.
``search.record.trial_record`` writes the record and reads it back (old studies included).
"""

from __future__ import annotations

# Trial user attributes (short, flat: one table cell each).
OUTCOME = "outcome"  # one of OUTCOMES: what became of the trial, at a glance
MODEL = "model"
BATCH_SIZE = "batch_size"
MAX_LEN = "max_len"
# The study metric's final value is stored flat under the metric's own name (e.g. "ndcg@10").
DEFAULT_METRIC = "ndcg@10"
PEAK_MEMORY_MB = "peak_memory_mb"  # measured peak (CUDA allocator, else process RSS)
MEMORY_ESTIMATE_MB = "memory_estimate_mb"  # preflight estimate of the peak
MEMORY_ESTIMATE_BAND = "memory_estimate_band"  # skipped trials: the estimate's error band
FREE_MEMORY_MB = "free_memory_mb"  # skipped trials: the free memory it was compared with
MODEL_FACTS = "model_facts"  # where the estimate's facts came from: config.json:DIR|hf-cache|table
SECONDS = "seconds"  # wall seconds the trial's worker spent on it
PADDING_FREE = "padding_free"  # True: the encoder ran on real tokens only (search.train.unpadded)
OOM = "oom"  # True when the trial ended in (or was skipped for) OOM; same as outcome "oom"
OOM_KIND = "oom_kind"  # "real" | "host" | "predicted" | "frontier"
OOM_PHASE = "oom_phase"  # "load" | "forward" | "backward" | "optimizer" | "eval"
OOM_FRONTIER_TRIAL = "oom_frontier_trial"  # number of the trial whose OOM justified a skip
ERROR = "error"  # one-line reason of a failure or a skip
DEVICE = "device"  # e.g. "cuda:0 (NVIDIA H100, 80 GiB)" or "cpu (62.8 GiB)"
DEVICE_KIND = "device_kind"  # "cuda" | "cpu" | "mps" ...: the device type without index
# "fp32" | "bf16" | "fp16": what the trial computed in (the config's amp, as the device ran it)
PRECISION = "precision"
GPU_NAME = "gpu_name"  # e.g. "NVIDIA H100 80GB HBM3" (CUDA devices only)
DEVICE_MEMORY_MB = "device_memory_mb"  # memory the trial was allowed (limit or device total)
HOST = "host"
GPU = "gpu"  # the worker's GPU index(es): --gpu, else $CUDA_VISIBLE_DEVICES
WORKER = "worker"
HANDED_BACK = "handed_back"  # True: given back on SIGTERM/SIGINT and re-queued
WANDB_RUN_ID = "wandb_run_id"  # the trial's W&B run (search.observe.tracking)
WANDB_RUN_PATH = "wandb_run_path"  # its W&B path: [entity/]project/run_id
# artifact id of the trial's saved model (top K; search.observe.keep), on studies run before
# issue 15 (a model is now uploaded after its trial is told: MODEL_KEPT_PREFIX)
MODEL_ARTIFACT = "model_artifact"
MODEL_ARTIFACT_STORE = "model_artifact_store"  # the store holding it: a directory or a URL
STAGE = "stage"  # the spec stage the trial ran in (search.sampling.stages); absent: single stage

# Legacy trial user attributes: written before issue 8, still read as a fallback.
CONFIG = "config"  # the effective TrialConfig as a JSON object (now SYSTEM_CONFIG)
METRICS = "metrics"  # the last epoch's metrics as a JSON object (now SYSTEM_METRICS)

# Trial system attributes (JSON, for scripts: ``trial.system_attrs[...]``).
SYSTEM_CONFIG = "search:config"  # the effective TrialConfig: {"model": ..., "lr": ...}
SYSTEM_METRICS = "search:metrics"  # last epoch's metrics: {"ndcg@10": ..., "mrr@10": ...}
SYSTEM_HISTORY = "search:history"  # every epoch's metrics: [{"ndcg@10": ...}, ...]
SYSTEM_ERROR = "search:error"  # the whole error line when the user attr ERROR was cut short
# What the pruner needs of a running trial's reports (search.sampling.peer_pruner), one JSON
# object rewritten per report: {"examples_total": int, "se": {"<step>": SE of the metric}}.
SYSTEM_PRUNING = "search:pruning"
# Where the trial's wall time went, seconds per phase (TIMING_PHASES; rounded to ms): a phase
# not measured is absent (a killed child reports none of its own, an older study no key).
SYSTEM_TIMINGS = "search:timings"
RETRY_HISTORY = "retry_history"  # Optuna's (RetryHeartbeatStaleTrialCallback): failed numbers
FAILED_TRIAL = "failed_trial"  # Optuna's: the number of the original trial of a re-queued one

# Keys of a report's metrics (``TrainHooks.report`` / ``report_partial``), besides the metrics.
REPORT_EXAMPLES_TOTAL = "examples_total"  # the run's nominal total: epochs x training examples
SE_SUFFIX = "_se"  # "ndcg@10_se": the standard error over queries of the mean "ndcg@10"


def se_key(metric: str) -> str:
    """The key of ``metric``'s standard error in a report: ``ndcg@10`` -> ``ndcg@10_se``."""
    return metric + SE_SUFFIX


# Study user attributes.
STUDY_N_TRIALS = "n_trials"  # the study's global budget of finished trials
STUDY_SPEC = "spec"  # the spec of a study made before search:spec (search.record.stored_spec)
STUDY_MODELS = "models"  # the models searched, when --skip-unavailable left some out

# Study system attributes.
STUDY_SPEC_SYSTEM = "search:spec"  # the resolved study spec, secrets excluded
STUDY_INITIALIZED = "search:initialized"  # on_create finished (search.worker.study_store)
# One key per kept model later removed (pushed out of the top K): prefix + artifact id -> trial.
MODEL_REMOVED_PREFIX = "search:model_removed:"
# One key per kept model: prefix + trial number -> {"artifact": id, "store": directory or URL}.
MODEL_KEPT_PREFIX = "search:model_kept:"
# One key per completed trial whose model could not be stored: prefix + trial number -> the
# error, one line (the trial is told by then: its own attributes cannot change any more).
MODEL_NOT_KEPT_PREFIX = "search:model_not_kept:"
STUDY_STAGE_SEEDED = "search:stage_seeded:"  # + stage name: its seeds were enqueued
# True: the study's trials train tiny replicas (search run --tiny), False: the real weights;
# written when a run opens the study (search.worker.study_store), absent on older studies.
STUDY_REPLICAS = "search:tiny_replicas"

# Vocabularies.
OUTCOME_RUNNING = "running"  # claimed, training (or waiting to be re-run after a hand-back)
OUTCOME_COMPLETE = "complete"  # finished with a value
OUTCOME_PRUNED = "pruned"  # stopped early by the pruner
OUTCOME_OOM = "oom"  # ran out of memory or was skipped for memory (oom_kind says how)
OUTCOME_FAILED = "failed"  # an error (error says which)
OUTCOME_HANDED_BACK = "handed_back"  # its worker was stopped; re-queued with the same params
OUTCOMES = (
    OUTCOME_RUNNING,
    OUTCOME_COMPLETE,
    OUTCOME_PRUNED,
    OUTCOME_OOM,
    OUTCOME_FAILED,
    OUTCOME_HANDED_BACK,
)
OOM_KINDS = ("real", "host", "predicted", "frontier")
SKIP_KINDS = ("predicted", "frontier")  # preflight skips: recorded, never trained, free
PHASES = ("load", "forward", "backward", "optimizer", "eval")
# The phases of a trial's wall time (SYSTEM_TIMINGS), in the order they run. prepare: the
# worker before the child (sample, preflight, the claimed record); start: from starting the
# child to calling the objective (the last trial's child ending its exit, fork, environment,
# imports); load: the model; tokenise: reading and tokenising the data; train: the optimizer
# steps; evaluate: every evaluation, sooner ones included, with the pruner's answer; save: saving
# a kept model; record: the worker after the objective ended (the child's final message, the
# outcome's record) up to writing it, while the child exits.
TIMING_PHASES = ("prepare", "start", "load", "tokenise", "train", "evaluate", "save", "record")
TRAIN_PHASE = "train"
