"""`python -m sharding.ablate` and `python -m sharding.plan` (through train/cli.py): a bad input
is one line `error: ...`, exit 1, no traceback, and no library log lines."""

import pytest

from tests.cli_output import assert_one_line_error, run_module


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
    # XLA_FLAGS cleared: the CLIs set their own simulated device counts
    assert_one_line_error(run_module(module, *args, env={"XLA_FLAGS": ""}, timeout=300), *fragments)
