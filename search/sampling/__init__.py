"""What to try next: the conditional space, the sampler around TPE, pruners, stages and
``search refine``.
"""
