"""`python -m sharding.ablate` and `python -m sharding.plan` (through train/cli.py): a bad input
is one line `error: ...`, exit 1, no traceback, and no library log lines."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(module, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LMLAB_DEBUG")}
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False, timeout=300)


@pytest.mark.parametrize("module, args, fragments", [
    ("sharding.ablate", ["--strategies=dp,zero9", "--devices=2", "--steps=1", "--fast_compile"],
     ["unknown sharding strategy 'zero9'", "expected one of"]),
    ("sharding.ablate", ["--devices=many"], ["--devices='many' must be a positive integer"]),
    ("sharding.plan", ["--config=configs/llama.py:tiny", "--mesh=data=2", "--strategy=tp"],
     ["strategy `tp` splits over mesh axis `tensor`"]),
    ("sharding.plan", ["--config=configs/llama.py:tiny", "--mesh=data"],
     ["--mesh='data': each axis must be NAME=SIZE"]),
    ("sharding.plan", [], ["give --params and --devices"]),
])
def test_a_bad_input_is_one_line(module, args, fragments):
    result = _cli(module, *args)
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
