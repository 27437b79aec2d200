"""benchmarks/expert_parallel.py in quick mode: the all_to_all dispatch moves token buffers by
all-to-all in the forward pass (exactly the sizes its design gives) and gathers no expert weights,
where the constraint-based layout gathers them whole in dropless mode."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _benchmark():
    spec = importlib.util.spec_from_file_location("expert_parallel_benchmark",
                                                  os.path.join(REPO, "benchmarks", "expert_parallel.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_expert_parallel_benchmark_quick_mode(capsys):
    bench = _benchmark()
    rows = {(r["mode"], r["dispatch"]): r for r in bench.main(["--quick"])}
    assert set(rows) == {(m, d) for m in bench.MODES for d in bench.DISPATCHES}
    assert all(set(r) == set(bench.FIELDS) for r in rows.values())
    s = bench.sizes(quick=True)
    L, E, D, F, K = s["layers"], s["experts"], s["d_model"], s["d_ff"], 2
    G = s["batch"] * s["seq"] // 8  # tokens per device
    N = 4  # expert shards
    expert_tensor = 4 * E * D * F
    # Per layer the buffer goes there and back: capacity [E, min(C, G), D] with C = ceil(2 * 8G * K / E);
    # dropless the worst-case [N, G * K, D].
    C = -(-2 * 8 * G * K // E)
    assert rows["capacity", "all_to_all"]["forward_all_to_all_bytes"] == L * 2 * 4 * E * min(C, G) * D
    assert rows["dropless", "all_to_all"]["forward_all_to_all_bytes"] >= L * 2 * 4 * N * G * K * D
    for mode in bench.MODES:
        assert rows[mode, "all_to_all"]["forward_all_gather_bytes"] < expert_tensor  # no expert weights
    # The constraint-based dropless layout gathers the three expert tensors of every layer whole.
    assert rows["dropless", "auto"]["forward_all_gather_bytes"] >= L * 3 * expert_tensor
    assert rows["dropless", "auto"]["forward_all_to_all_bytes"] < 4 * D  # never a token
    assert "dispatch" in capsys.readouterr().out
