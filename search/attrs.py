"""Names of the user attributes every trial and study carries (the contract with reports)."""

from __future__ import annotations

# Trial user attributes.
CONFIG = "config"  # the effective TrialConfig as a JSON object
MODEL = "model"
BATCH_SIZE = "batch_size"
MAX_LEN = "max_len"
METRICS = "metrics"  # last epoch's retrieval metrics: {"ndcg@10": ..., "mrr@10": ..., ...}
PEAK_MEMORY_MB = "peak_memory_mb"  # measured peak (CUDA allocator, else process RSS)
MEMORY_ESTIMATE_MB = "memory_estimate_mb"  # preflight estimate of the peak
SECONDS = "seconds"  # wall seconds the trial's worker spent on it
OOM = "oom"  # True when the trial ended in (or was skipped for) out of memory
OOM_KIND = "oom_kind"  # "real" | "host" | "predicted" | "frontier"
OOM_PHASE = "oom_phase"  # "load" | "forward" | "backward" | "optimizer" | "eval"
OOM_FRONTIER_TRIAL = "oom_frontier_trial"  # number of the trial whose OOM justified a skip
ERROR = "error"  # one-line reason of a failure
DEVICE = "device"  # e.g. "cuda:0 (NVIDIA H100, 80 GiB)" or "cpu"
DEVICE_MEMORY_MB = "device_memory_mb"  # memory the trial was allowed (limit or device total)
HOST = "host"
GPU = "gpu"
WORKER = "worker"

# Study user attributes.
STUDY_N_TRIALS = "n_trials"  # the study's global budget of finished trials
STUDY_SPEC = "spec"  # the resolved study spec, secrets excluded

OOM_KINDS = ("real", "host", "predicted", "frontier")
PHASES = ("load", "forward", "backward", "optimizer", "eval")
