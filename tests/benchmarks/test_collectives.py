"""benchmarks/collectives.py in quick mode: every row's HLO bytes of ours (collective-permutes
only) equal the cost model's bytes and the HLO parser's ring estimate of the lax collective, and
the fitted alpha and beta are non-negative. Times are printed, never asserted."""

import importlib.util
import math
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _benchmark():
    spec = importlib.util.spec_from_file_location("collectives_benchmark",
                                                  os.path.join(REPO, "benchmarks", "collectives.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_table_bytes_agree(capsys):
    result = _benchmark().main(["--quick"])
    rows = result["rows"]
    # 5 collectives on N = 4 and 8, the hierarchical one on 2x4; two sizes each.
    assert len(rows) == (5 * 2 + 1) * 2
    for row in rows:
        assert row["hlo_ours_kinds"] == ["collective-permute"], row
        assert row["hlo_ours"] == row["cost"].sent_bytes == row["hlo_lax"], row
        assert row["seconds_ours"] > 0 and row["seconds_lax"] > 0
    assert result["alpha"] >= 0 and result["beta"] >= 0
    assert math.isfinite(result["alpha"]) and math.isfinite(result["beta"])
    out = capsys.readouterr().out
    assert "HLO ours" in out and "fit to ours' times" in out
