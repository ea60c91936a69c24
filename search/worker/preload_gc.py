"""The forkserver's garbage collector around its preload (``isolation.PRELOAD``).

The forkserver imports torch and transformers once for every trial. Collecting while they
import only walks objects that live as long as the server (0.5-1 s of its CPU); after the
imports, ``gc.freeze`` moves them out of every later collection, so a trial's collections no
longer walk (and copy-on-write touch) the ~400,000 objects it inherits. Importing
:mod:`search.worker.preload_gc` first turns collection off; importing
:mod:`search.worker.preload_done` last freezes and turns it back on.
"""

import gc

gc.disable()
