"""Notebooks run by `pytest --nbmake colabs` read LMLAB_QUICK to choose small sizes."""

import os

os.environ.setdefault("LMLAB_QUICK", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
