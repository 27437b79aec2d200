"""benchmarks/profile_step.py: its HLO classification on a hand-written module, and its quick mode
on a real trainer step (every op event accounted for, matmuls present).

No wall-clock time is asserted."""

import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HLO = """HloModule jit_f, entry_computation_layout={(f32[4,4]{1,0})->f32[4]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%fused_dot (p0: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  %d = f32[4,4]{1,0} dot(%p0, %p0), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = f32[4,4]{1,0} tanh(%d)
}

%fused_move (p0: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  ROOT %tr = f32[4,4]{0,1} transpose(%p0), dimensions={1,0}
}

%fused_exp (p0: f32[4,4]) -> f32[4,4] {
  %p0 = f32[4,4]{1,0} parameter(0)
  ROOT %e = f32[4,4]{1,0} exponential(%p0)
}

ENTRY %main (x: f32[4,4]) -> f32[4] {
  %x = f32[4,4]{1,0} parameter(0)
  %mm = f32[4,4]{1,0} fusion(%x), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(f)/dot_general"}
  %mv = f32[4,4]{0,1} fusion(%mm), kind=kLoop, calls=%fused_move
  %ex = f32[4,4]{1,0} fusion(%mv), kind=kLoop, calls=%fused_exp
  %c = f32[] constant(0)
  %sc = f32[4,4]{1,0} scatter(%ex, %x, %ex), update_window_dims={}, to_apply=%add
  ROOT %r = f32[4]{0} reduce(%sc, %c), dimensions={1}, to_apply=%add
}
"""


def _load():
    path = os.path.join(REPO, "benchmarks", "profile_step.py")
    spec = importlib.util.spec_from_file_location("profile_step", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def profile_step():
    return _load()


def test_classifies_hand_written_hlo(profile_step):
    computations = profile_step.parse_hlo(HLO)
    entry = computations["main"]
    assert entry["mm"].op_name == "jit(f)/dot_general" and entry["mm"].calls == ("fused_dot",)
    kinds = {name: profile_step.classify(entry[name], computations) for name in ("mm", "mv", "ex", "sc", "r")}
    assert kinds == {"mm": "matmul", "mv": "copy", "ex": "fusion", "sc": "gather", "r": "reduce"}


def test_quick_mode_accounts_for_every_op(profile_step, capsys):
    r = profile_step.main(["--quick"])
    kinds = r["kinds"]
    total = sum(kinds.values())
    assert set(kinds) == set(profile_step.KINDS) and total > 0
    assert kinds["matmul"] > 0  # a transformer step is mostly matmuls: they must be found
    # The kinds partition the ops: their times sum to the ops' total (float sums, 1e-9 relative).
    assert sum(ms for _, _, ms, _, _ in r["ops"]) == pytest.approx(total, rel=1e-9)
    out = capsys.readouterr().out
    shares = [float(line.split()[-1].rstrip("%")) for line in out.splitlines()
              if line.split() and line.split()[0] in profile_step.KINDS]
    assert len(shares) == len(profile_step.KINDS)
    assert sum(shares) == pytest.approx(100.0, abs=0.05 * len(shares))  # each printed to 0.1%
    assert "top op" in out
