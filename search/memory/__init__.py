"""Memory: the device, out-of-memory detection, the memory estimate, the OOM frontier, the
preflight that skips configs that will not fit, and the feasible grid.
"""
