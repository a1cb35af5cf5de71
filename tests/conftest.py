"""Shared test setup: repo root on sys.path, golden-data location, fast CPU defaults."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

REFERENCE = os.environ.get("RESEARCH_REFERENCE", os.path.join(ROOT, "..", "shared", "reference"))

# Tests build the same tiny models many times: a persistent compilation cache turns repeated
# XLA compiles (the bulk of a CPU test run) into cache reads, within and across test files.
import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "RESEARCH_JAX_CACHE", os.path.join(ROOT, ".cache", "jax")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
