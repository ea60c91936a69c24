"""Running trials: the runner loop, the study's global budget, the isolated child process,
opening the study, the records a worker writes, and preparing its models.
"""
