"""The study spec: its model, loading and checking it, model facts, run options.

Knows the spec file and the models it names; knows nothing of trials being run. Imports only
``search.train`` (data checks) and ``search.record``.
"""
