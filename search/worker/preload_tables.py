"""Build, once in the forkserver's preload, the tables every trial's first ``from_pretrained``
would build again (``isolation.PRELOAD``).

transformers 5 compiles about a thousand regular expressions for its checkpoint conversion
mapping on the first ``from_pretrained`` of a process, and caches them in the module. Every
trial is a fresh child of the forkserver, so each paid it: 0.05-0.06 s of a tiny replica's
0.10-0.12 s load (8 children forked after a preload with and without it, BENCHMARKS.md). Built
here, the children inherit it. A transformers without that table is left as it is.
"""

import contextlib

with contextlib.suppress(ImportError, AttributeError):
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    get_checkpoint_conversion_mapping("bert")  # builds (and caches) the table of every type
