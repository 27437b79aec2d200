"""`sharding/`'s library lays out a step it is given: no library module imports `train/`
(only the CLIs, which build the language model's step, may)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The command-line entry points: they build a run from a config, so they may use train/.
CLIS = {"ablate", "plan", "multihost_demo"}


def _library_modules() -> list[str]:
    names = sorted(p.stem for p in (ROOT / "sharding").glob("*.py") if p.stem not in CLIS)
    return ["sharding" if name == "__init__" else f"sharding.{name}" for name in names]


def _train_modules_after_importing(modules: list[str]) -> list[str]:
    """The `train` modules a fresh interpreter holds after importing `modules` (this test
    process has imported train/ already)."""
    code = ("import importlib, json, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m == 'train' or m.startswith('train.'))))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_library_modules_do_not_import_train():
    modules = _library_modules()
    assert {"sharding.step", "sharding.layout", "sharding.strategies", "sharding.analysis"} <= set(modules)
    assert _train_modules_after_importing(modules) == []
    # The probe sees an import of train/ where there is one (the CLIs' train.program).
    assert "train.step" in _train_modules_after_importing(["train.program"])
