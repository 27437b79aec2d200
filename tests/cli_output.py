"""Running an lmlab command line in a subprocess and checking the one-line error contract
(`train/cli.py`): exit status 1, stderr exactly one line `error: ...`, no traceback."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` from the checkout, without LMLAB_DEBUG; `env` overrides variables."""
    base = {k: v for k, v in os.environ.items() if k != "LMLAB_DEBUG"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**base, "PYTHONPATH": REPO, **(env or {})}, check=False)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 1, stderr exactly one line `error: ...` holding each fragment, no traceback."""
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
