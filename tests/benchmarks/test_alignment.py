"""benchmarks/alignment.py runs in quick mode: every method trains from the SFT warm start (GRPO
on the reward model's score, `grpo_rm`, is left out: the `model` reward drives PPO end to end in
colabs/07_alignment.ipynb, and tests/train/test_rewards.py checks its scorer), the RL runs' own held-out evaluation (train.rollout.evaluate, jitted on the run's mesh) agrees
with the benchmark's (inference.generate + the verifier) on the same checkpoints, preference
pairs are built from the warm start's samples, and the table is printed.

No wall-clock time is asserted (timing lives in the benchmark's printout)."""

import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp

from data import verifiable
from inference.load import Loaded
from models.gpt import GPT, GPTConfig
from models.layers.blocks import BlockConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _benchmark():
    spec = importlib.util.spec_from_file_location("alignment_benchmark",
                                                  os.path.join(REPO, "benchmarks", "alignment.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_alignment_benchmark_quick_mode(tmp_path, capsys):
    bench = _benchmark()
    results = bench.main(["--quick", f"--root={tmp_path}", "--pair_prompts=256",
                          "--methods=grpo,ppo,dpo,reward"])
    out = capsys.readouterr().out
    held_out = 32  # QUICK's verifiable.num_eval
    assert results["pairs"]["train"] > 0 and results["pairs"]["held_out"] > 0
    with open(tmp_path / "preferences.jsonl") as f:
        pairs = [json.loads(line) for line in f]
    assert len(pairs) == results["pairs"]["train"] + results["pairs"]["held_out"]
    for pair in pairs:  # chosen verified right, rejected wrong, by the task's verifier
        a, b = map(int, pair["prompt"][:-1].split("+"))
        assert int(pair["chosen"]) == a + b and pair["rejected"] and pair["rejected"] != str(a + b)
    before = results["sft"]["after"]
    for method in ("grpo", "ppo"):
        r = results[method]
        assert r["before"] == before
        # Two independent greedy evaluations of the same checkpoints: at most one problem apart
        # (an argmax tie can fall either way under different batch shapes).
        assert abs(r["run_eval"][0] - before) <= 1 / held_out + 1e-9
        assert abs(r["run_eval"][1] - r["after"]) <= 1 / held_out + 1e-9
        assert r["kl"] >= 0 and 0 <= r["after"] <= 1
        with open(tmp_path / method / "summary.json") as f:
            summary = json.load(f)
        assert {"exact_match", "mean_reward", "mean_length"} <= set(summary["eval_before"]) & set(summary["eval_after"])
    assert results["dpo"]["kl"] >= 0 and 0 <= results["reward"]["accuracy"] <= 1
    for label in ("method", "sft@120", "grpo", "ppo", "dpo", "reward", "held-out preference accuracy"):
        assert label in out


def test_kl_to_itself_is_zero(tmp_path):
    bench = _benchmark()
    tok = bench.ByteLevelBPE([bytes([b]) for b in range(256)], [], ("<|endoftext|>",))
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, num_layers=1, max_len=32,
                          block=BlockConfig(d_model=32, num_heads=2, d_ff=64)))
    params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    other = model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
    problems = verifiable.generate("addition", verifiable.TaskConfig(num_train=4, num_eval=4))[1]
    policy = Loaded(model, params, tok, "test")
    assert bench.kl_to_reference(policy, policy, problems) == 0.0
    assert bench.kl_to_reference(policy, Loaded(model, other, tok, "test"), problems) > 0.0
