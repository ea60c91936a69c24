"""The end of the forkserver's preload: freeze what it imported, collect again
(:mod:`search.worker.preload_gc`)."""

import gc

gc.freeze()
gc.enable()
