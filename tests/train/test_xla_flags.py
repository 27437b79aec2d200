"""train/xla_flags.py: lmlab's defaults and $LMLAB_XLA_FLAGS join $XLA_FLAGS without overriding the
user's flags, reach XLA, and a malformed $LMLAB_XLA_FLAGS is a one-line error of `python -m train`."""

import os
import subprocess
import sys

import pytest

from train import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_user_flags_win_over_defaults_and_extra_comes_last():
    user = "--xla_cpu_enable_fast_math=true --xla_dump_to=/tmp/x"
    defaults = ("--xla_cpu_enable_fast_math=false", "--xla_cpu_use_thunk_runtime=true")
    out = xla_flags.merged(user, "--xla_backend_optimization_level=2", defaults)
    assert out.split() == ["--xla_cpu_enable_fast_math=true", "--xla_dump_to=/tmp/x",
                           "--xla_cpu_use_thunk_runtime=true", "--xla_backend_optimization_level=2"]


def test_apply_is_idempotent_and_leaves_an_unset_environment_alone():
    env = {"XLA_FLAGS": "--a_flag=1", xla_flags.ENV: "--b_flag"}
    first = xla_flags.apply(env)
    assert xla_flags.apply(env) == first == env["XLA_FLAGS"]
    assert first.split()[0] == "--a_flag=1" and first.split()[-1] == "--b_flag"
    empty = {}
    xla_flags.apply(empty)
    assert empty == ({} if not xla_flags.DEFAULT_CPU_FLAGS else {"XLA_FLAGS": " ".join(xla_flags.DEFAULT_CPU_FLAGS)})


@pytest.mark.parametrize("bad", ["xla_cpu_enable_fast_math", "-x", "--"])
def test_malformed_extra_flags_are_named(bad):
    with pytest.raises(ValueError, match=f"LMLAB_XLA_FLAGS holds '{bad}'"):
        xla_flags.merged("", f"--ok {bad}")


def _run(args, extra):
    env = {**os.environ, "XLA_FLAGS": "", xla_flags.ENV: extra, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, *args], check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_extra_flags_reach_xla():
    code = "from train import xla_flags; xla_flags.apply(); import jax; print(jax.device_count())"
    result = _run(["-c", code], "--xla_force_host_platform_device_count=3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "3"


def test_train_cli_reports_malformed_flags_in_one_line():
    result = _run(["-m", "train", "--helpshort"], "not-a-flag")
    assert result.returncode != 0
    expected = ("error: $LMLAB_XLA_FLAGS holds 'not-a-flag', which is not an XLA flag; write --name or "
                "--name=value, separated by spaces")
    assert result.stderr.strip().splitlines() == [expected]
