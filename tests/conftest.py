"""Test set-up shared by the whole suite.

Eight simulated CPU devices are requested here, before anything imports jax, so
that sharding tests see a mesh of 8 while the rest of the suite runs unchanged.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The trainer's persistent compilation cache ("auto": ~/.cache/lmlab/jax_cache) stays off for the
# suite: tests write nothing outside their tmp dirs (tests/train/test_compilation_cache.py points
# it at one).
os.environ["LMLAB_COMPILATION_CACHE_DIR"] = "none"
# Notebooks and demos read this to pick their small sizes when run by the suite.
os.environ.setdefault("LMLAB_QUICK", "1")
