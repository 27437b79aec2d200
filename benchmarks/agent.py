"""The tool-calling SFT recipe end to end: does a small model answer arithmetic better with the calculator?

1. `data.tool_calls.prepare`: synthetic questions ("What is 4821 * 37?"), each written twice for SFT,
   with the calculator (the assistant calls it, reads the result, answers) and without (it answers at
   once); held-out questions never seen in training; a BPE whose merges hold no digit.
2. `configs/agent.py` trains a small Llama from scratch through the one trainer (`train.trainer.run`, the sft
   objective reading the JSONL through its `files:` source; loss on assistant tokens only).
3. The trained model (`inference.load`) answers every held-out question two ways, greedy:
     agent   `agents.loop.run_agents` with the calculator on the allow-list (the tools system prompt,
             tool calls parsed from its text and executed, results fed back, at most 3 steps)
     direct  the same model, the same question, no tools offered (it must compute the answer itself)
   Exact match: the last integer of the final answer equals the true value. Also reported: the shares
   of agent runs that called the calculator at all, with exactly the question's expression, and whose
   final answer repeats the calculator's result (the two copies the model must learn).

Run:
  python benchmarks/agent.py           # the default preset (Llama, 4 layers x 64), ~12 min on 2 cores
  python benchmarks/agent.py --quick   # the tiny preset, a few steps (the test: runs, learns nothing)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from agents.loop import local_chat, run_agents
from agents.tools import ToolRegistry, calculator
from configs import agent as agent_config
from data import tool_calls


@dataclasses.dataclass(frozen=True)
class Settings:
    preset: str
    steps: int
    num_train: int
    num_eval: int
    batch_size: int
    max_steps: int = 3  # model calls per agent run
    max_new_tokens: int = 40  # per model call


FULL = Settings(preset="default", steps=3000, num_train=4000, num_eval=200, batch_size=16)  # configs/agent.py:default
QUICK = Settings(preset="tiny", steps=4, num_train=40, num_eval=6, batch_size=8, max_steps=2, max_new_tokens=12)


def train(settings: Settings, directory: str) -> dict[str, str]:
    """Writes the data and trains the model; returns the paths (`prepare`'s, plus "run")."""
    from train import trainer

    paths = tool_calls.prepare(directory, tool_calls.ToolCallsConfig(num_train=settings.num_train,
                                                                     num_eval=settings.num_eval))
    c = agent_config.get_config(settings.preset)
    c.tokenizer.path = paths["tokenizer"]
    c.data.update(source=f"files:{paths['train']}", batch_size=settings.batch_size)
    c.steps = settings.steps
    c.schedule.update(warmup_steps=min(c.schedule.warmup_steps, settings.steps // 2))
    c.checkpoint.update(async_save=False)
    paths["run"] = os.path.join(directory, "run")
    trainer.run(c, paths["run"])
    return paths


def evaluate(run: str, questions: list[tool_calls.Question], *, max_steps: int = 3, max_new_tokens: int = 40,
             chunk: int = 200) -> dict:
    """Exact match of the agent (calculator allowed) and of direct answers, on `questions`."""
    from inference.load import load

    chat = local_chat(load(run), max_new_tokens=max_new_tokens)
    registry = ToolRegistry([calculator()])
    agent, direct = [], []
    for start in range(0, len(questions), chunk):
        part = questions[start:start + chunk]
        conversations = [[{"role": "user", "content": q.text}] for q in part]
        agent += run_agents(chat.batch, conversations, registry, max_steps=max_steps)
        direct += chat.batch(conversations, None)

    def exact(answer: str, q) -> bool:
        return tool_calls.parse_answer(answer) == q.answer

    called = [any(c["name"] == "calculator" and json.loads(c["arguments"]).get("expression") == q.expression
                  for c in t.tool_calls) for t, q in zip(agent, questions)]
    used = [any(c["name"] == "calculator" and c["status"] == "ok" for c in t.tool_calls) for t in agent]
    relayed = [bool(t.tool_calls) and tool_calls.parse_answer(t.answer) == tool_calls.parse_answer(
        t.tool_calls[-1]["result"]) for t in agent]
    n = len(questions)
    return {
        "questions": n,
        "agent_exact_match": sum(exact(t.answer, q) for t, q in zip(agent, questions)) / n,
        "direct_exact_match": sum(exact(r.get("content") or "", q) for r, q in zip(direct, questions)) / n,
        "agent_called_calculator_exactly": sum(called) / n,
        "agent_called_calculator": sum(used) / n,  # any well-formed call that ran
        "agent_answer_is_tool_result": sum(relayed) / n,  # the final answer repeats the last result
        "agent_stop_reasons": {r: sum(t.stop_reason == r for t in agent) for r in ("answered", "step_limit", "refused")},
        "example_transcript": agent[0].to_dict(),
        "example_direct": direct[0].get("content"),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny preset, a few steps (for the test)")
    parser.add_argument("--workdir", default="", help="keep the data, tokenizer and run here (default: a temp dir)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.workdir or tmp
        started = time.perf_counter()
        paths = train(settings, directory)
        trained = time.perf_counter()
        results = evaluate(paths["run"], tool_calls.read_held_out(paths["held_out"]), max_steps=settings.max_steps,
                           max_new_tokens=settings.max_new_tokens)
        results.update(settings=dataclasses.asdict(settings), train_seconds=trained - started,
                       eval_seconds=time.perf_counter() - trained)
    print(f"preset {settings.preset}: {settings.steps} steps of {settings.batch_size} x {agent_config.SEQ_LEN} "
          f"tokens on {settings.num_train} questions (x2: with and without the calculator); "
          f"train {results['train_seconds']:.0f}s, eval {results['eval_seconds']:.0f}s")
    print(f"held-out questions: {results['questions']}")
    print(f"  agent with calculator   exact match {results['agent_exact_match']:.1%}  (called it with the "
          f"question's expression: {results['agent_called_calculator_exactly']:.1%}; stops "
          f"{results['agent_stop_reasons']})")
    print(f"  agent calls that ran: {results['agent_called_calculator']:.1%}; final answers that repeat the "
          f"calculator's result: {results['agent_answer_is_tool_result']:.1%}")
    print(f"  direct answer           exact match {results['direct_exact_match']:.1%}")
    print(f"  gain                    {results['agent_exact_match'] - results['direct_exact_match']:+.1%}")
    print("example transcript:", json.dumps(results["example_transcript"]["messages"][1:], ensure_ascii=False))
    print("example direct answer:", results["example_direct"])
    return results


if __name__ == "__main__":
    main()
