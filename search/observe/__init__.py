"""Looking at a study: the report, plots, dashboard notes and artifacts, W&B tracking, kept
models and ``search best``.
"""
