"""Running trials: the Worker and its trial step, the study loop, the study's global budget,
the isolated child process, opening the study, the records a worker writes, preparing its
models, and the events its observers subscribe to.
"""
