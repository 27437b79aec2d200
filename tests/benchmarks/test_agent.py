"""benchmarks/agent.py runs in quick mode end to end (data, the sft run through the trainer, the
agent and direct evaluation on held-out questions) and reports consistent numbers. The tiny run
learns nothing, so no accuracy is asserted; the full mode's numbers are in the README."""

import importlib.util
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _benchmark():
    spec = importlib.util.spec_from_file_location("agent_benchmark", os.path.join(REPO, "benchmarks", "agent.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_agent_benchmark_quick_mode(capsys, tmp_path):
    bench = _benchmark()
    results = bench.main(["--quick", f"--workdir={tmp_path}"])
    out = capsys.readouterr().out
    q = bench.QUICK
    assert results["questions"] == q.num_eval
    for key in ("agent_exact_match", "direct_exact_match", "agent_called_calculator_exactly", "agent_called_calculator",
                "agent_answer_is_tool_result"):
        assert 0.0 <= results[key] <= 1.0
        assert results[key] * q.num_eval == round(results[key] * q.num_eval)
    assert sum(results["agent_stop_reasons"].values()) == q.num_eval
    transcript = results["example_transcript"]
    assert transcript["messages"][0]["role"] == "user" and transcript["stop_reason"] in ("answered", "step_limit")
    assert 1 <= transcript["steps"] <= q.max_steps
    json.dumps(transcript)
    # The run trained the configured steps through the trainer, and its checkpoint is what was evaluated.
    from inference.load import committed_steps
    assert committed_steps(str(tmp_path / "run"))[-1] == q.steps
    assert "agent with calculator" in out and "direct answer" in out and "gain" in out
