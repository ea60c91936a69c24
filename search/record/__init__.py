"""The trial record and the vocabulary everything else shares (the bottom layer).

Attribute keys (``attrs``), ``TrialConfig``, the shipped model table and ``ModelInfo``, the
device and precision rules, errors, how a trial's record is written and read back, and pure
counts over a study's trials. Imports nothing else from ``search``.
"""
