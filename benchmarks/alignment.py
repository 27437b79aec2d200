"""Measured gains of alignment on a verifiable task: SFT warm start, then GRPO, PPO, DPO, and a
reward model, each judged on held-out problems.

The pipeline (`configs/align.py`'s presets, run by the trainer in this process exactly as
`python -m train --config=configs/align.py:PRESET --workdir=ROOT/PRESET` with the overrides
printed beside each run):

  1. files: a byte-level tokenizer (256 bytes + <|endoftext|>) and the SFT lines of the task's
     training split (`data.verifiable`: 2-digit addition, `{"prompt": "12+34=", "completion": "46"}`)
  2. sft:    a tiny GPT from scratch, deliberately short (partial exact match)
  3. grpo, ppo: RL from the SFT model on `task:addition` with the accuracy reward
  4. preferences: for training and held-out prompts, `--samples` completions sampled from the
     SFT model (temperature 1); a prompt with a correct and a wrong one gives the pair
     {prompt, chosen: correct, rejected: wrong}; the held-out prompts' pairs come last (the
     validation split of the preference runs)
  5. dpo:    DPO from the SFT model on the training pairs
  6. reward: a reward model (a score head on the SFT run's last checkpoint) on the same pairs
  7. grpo_rm (optional, --methods=grpo,ppo,dpo,reward,grpo_rm): GRPO on the reward model's
     score instead of the verifier, with a KL loss to the SFT model

Columns: minutes of the run (wall clock, compilation and its own evaluations included),
held-out greedy exact match before (the SFT model) and after, and the KL to the reference (the
SFT model): the mean over held-out prompts of sum_t KL(policy(.|context_t) || sft(.|context_t))
over the tokens of a completion sampled from the policy (temperature 1), in nats. The reward
model's row gives its held-out preference accuracy instead. Exact match is computed here by
greedy decoding (`inference.generate`) and the task's verifier; the RL runs' own summaries
(`eval_before`/`eval_after`, `train.rollout.evaluate`) must agree with it and are printed too.

Run:
  python benchmarks/alignment.py             # the table (~15-25 min on 2 cores)
  python benchmarks/alignment.py --quick     # tiny sizes and a few steps (the test)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

# Let the script run from a bare checkout, without lmlab pip-installed.
_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from configs import align
from configs.loader import load_config
from data import prompts, verifiable
from data.tokenizer import ByteLevelBPE
from inference import load as load_lib
from inference.generate import generate, lm_logits

METHODS = ("grpo", "ppo", "dpo", "reward")
OPTIONAL = ("grpo_rm",)  # GRPO on the reward model's score (after `reward`): --methods=...,reward,grpo_rm
# --quick: a pipeline check in a few minutes, not a measurement. The SFT run is long enough
# that some samples are right (the preference pairs need them); its last step is the warm start.
QUICK_SFT_STEPS = 120
QUICK = {"sft": [f"steps={QUICK_SFT_STEPS}", "checkpoint.save_interval_steps=40"], "grpo": ["steps=3"],
         "ppo": ["steps=3"], "dpo": ["steps=3", "schedule.warmup_steps=0"],
         "reward": ["steps=3", "schedule.warmup_steps=0"], "grpo_rm": ["steps=3"],
         "all": ["verifiable.num_train=256", "verifiable.num_eval=32"]}
MAX_NEW_TOKENS = 5  # 3 digits + eos, and one to spare


def task_config(overrides: list[str]) -> verifiable.TaskConfig:
    """The task the presets run on, with the `verifiable.*` overrides applied."""
    return prompts.task_config(load_config("configs/align.py:sft", overrides))


def write_files(root: str, task: verifiable.TaskConfig) -> dict[str, str]:
    """The byte-level tokenizer and the SFT lines of the task's training split."""
    p = align.paths(root)
    os.makedirs(root, exist_ok=True)
    if not os.path.isdir(p["tokenizer"]):
        ByteLevelBPE([bytes([b]) for b in range(256)], [], ("<|endoftext|>",)).save(p["tokenizer"])
    train, _ = verifiable.generate(align.TASK, task)
    with open(p["sft_data"], "w") as f:
        f.writelines(json.dumps({"prompt": q.prompt, "completion": q.completion}) + "\n" for q in train)
    return p


def train_run(preset: str, workdir: str, overrides: list[str]) -> float:
    """Trains `configs/align.py:PRESET` into a fresh `workdir` (as the printed command would);
    returns the minutes it took."""
    from train import trainer

    print(f"$ python -m train --config=configs/align.py:{preset} --workdir={workdir} "
          + " ".join(f"--config.{o}" for o in overrides), flush=True)
    if os.path.isdir(workdir):
        import shutil

        shutil.rmtree(workdir)
    start = time.time()
    trainer.run(load_config(f"configs/align.py:{preset}", overrides), workdir)
    return (time.time() - start) / 60


def completions(loaded, problems, *, temperature: float = 0.0, samples: int = 1, seed: int = 0) -> list[list[int]]:
    """Each problem's completions (token ids, eos cut off), `samples` per problem in a row."""
    tok = loaded.tokenizer
    ids = [prompts.encode_prompt(tok, q.prompt) for q in problems for _ in range(samples)]
    out = []
    for start in range(0, len(ids), 512):
        out += generate(loaded.model, loaded.params, ids[start:start + 512], max_new_tokens=MAX_NEW_TOKENS,
                        temperature=temperature, stop_tokens=(tok.eos_id,), seed=seed + start)
    return [[t for t in row if t != tok.eos_id] for row in out]


def exact_match(loaded, problems) -> float:
    """Held-out greedy exact match under the task's verifier."""
    texts = [loaded.tokenizer.decode(row) for row in completions(loaded, problems)]
    return float(np.mean([verifiable.verify(q.task, t, q.answer) for t, q in zip(texts, problems, strict=True)]))


@jax.jit
def _token_kl(policy_BTV, reference_BTV):
    logp, logq = jax.nn.log_softmax(policy_BTV, -1), jax.nn.log_softmax(reference_BTV, -1)
    return jnp.sum(jnp.exp(logp) * (logp - logq), -1)


def kl_to_reference(policy, reference, problems, seed: int = 1) -> float:
    """Mean over problems of the summed per-token KL(policy || reference) along a completion
    sampled from the policy at temperature 1 (its eos included), in nats."""
    tok = policy.tokenizer
    sampled = completions(policy, problems, temperature=1.0, seed=seed)
    rows = [prompts.encode_prompt(tok, q.prompt) + c + [tok.eos_id] for q, c in zip(problems, sampled, strict=True)]
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.float64)
    for i, (row, q) in enumerate(zip(rows, problems, strict=True)):
        ids[i, :len(row)] = row
        prompt_len = len(prompts.encode_prompt(tok, q.prompt))
        mask[i, prompt_len - 1:len(row) - 1] = 1  # the logits that predict the completion's tokens
    kl = np.asarray(_token_kl(lm_logits(policy.model.apply({"params": policy.params}, ids)),
                              lm_logits(reference.model.apply({"params": reference.params}, ids))), np.float64)
    return float(np.mean(np.sum(kl * mask, -1)))


def write_preferences(sft, train_problems, held_out, path: str, samples: int) -> tuple[int, int]:
    """Pairs {prompt, chosen (a correct sample), rejected (a wrong one)} of the SFT model's own
    samples, the training prompts' then the held-out prompts'; returns (train pairs, held-out pairs)."""
    counts = []
    with open(path, "w") as f:
        for part, problems in enumerate((train_problems, held_out)):
            rows = completions(sft, problems, temperature=1.0, samples=samples, seed=1000 * (part + 1))
            count = 0
            for i, q in enumerate(problems):
                texts = [sft.tokenizer.decode(r) for r in rows[i * samples:(i + 1) * samples]]
                right = [t for t in texts if verifiable.verify(q.task, t, q.answer)]
                # (an empty sample, eos at once, is no response a preference row can hold)
                wrong = [t for t in texts if t and not verifiable.verify(q.task, t, q.answer)]
                if right and wrong:
                    f.write(json.dumps({"prompt": q.prompt, "chosen": right[0], "rejected": wrong[0]}) + "\n")
                    count += 1
            counts.append(count)
    return counts[0], counts[1]


def _summary(workdir: str) -> dict:
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few steps (the test)")
    parser.add_argument("--root", default=align.ROOT, help="where the files and runs are written")
    parser.add_argument("--samples", type=int, default=8, help="SFT samples per prompt for the preference pairs")
    parser.add_argument("--pair_prompts", type=int, default=9000,
                        help="training prompts sampled for pairs (the SFT's 2000 first, then further ones)")
    parser.add_argument("--reuse_sft", action="store_true",
                        help="development: keep ROOT/sft (and its files) from an earlier run instead of training it")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma list of " + ", ".join(METHODS + OPTIONAL))
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    common = QUICK["all"] if args.quick else []
    task = task_config(common)
    p = align.paths(args.root) if args.reuse_sft else write_files(args.root, task)
    _, held_out = verifiable.generate(align.TASK, task)
    warm = QUICK_SFT_STEPS if args.quick else align.WARM_START_STEP
    start = {"sft": ["tokenizer.path=" + p["tokenizer"], f"data.source=files:{p['sft_data']}"],
             "reward": [f"init_from=run:{p['sft']}"]}
    results: dict = {}

    def overrides(preset, more=()):
        return [*common, *start.get(preset, [f"init_from=run:{p['sft']}@{warm}"]), *more,
                *(QUICK[preset] if args.quick else [])]

    minutes = None if args.reuse_sft else train_run("sft", p["sft"], overrides("sft"))
    sft = load_lib.load(p["sft"], step=warm)
    before = exact_match(sft, held_out)
    results["sft"] = {"minutes": minutes, "before": 0.0, "after": before, "kl": None, "step": warm}
    results["sft_final"] = {"minutes": None, "before": 0.0, "after": exact_match(load_lib.load(p["sft"]), held_out),
                            "kl": None}
    pairs_overrides = []
    if {"dpo", "reward"} & set(methods):
        pool = dataclasses.replace(task, num_train=max(args.pair_prompts, task.num_train))
        pairs = write_preferences(sft, verifiable.generate(align.TASK, pool)[0], held_out, p["preferences"],
                                  args.samples)
        results["pairs"] = {"train": pairs[0], "held_out": pairs[1]}
        pairs_overrides = [f"data.source=files:{p['preferences']}",
                           f"data.validation_fraction={pairs[1] / sum(pairs):.6f}"]
    for method in methods:
        workdir = os.path.join(args.root, method)
        more = pairs_overrides if method in ("dpo", "reward") else []
        if method == "grpo_rm":
            more = [f"rl.reward_model=run:{os.path.join(args.root, 'reward')}"]
        minutes = train_run(method, workdir, overrides(method, more))
        summary = _summary(workdir)
        if method == "reward":
            results[method] = {"minutes": minutes, "accuracy": summary.get("val_accuracy")}
            continue
        policy = load_lib.load(workdir)
        results[method] = {"minutes": minutes, "before": before, "after": exact_match(policy, held_out),
                           "kl": kl_to_reference(policy, sft, held_out)}
        if "exact_match" in summary.get("eval_before", {}):
            results[method]["run_eval"] = (summary["eval_before"]["exact_match"], summary["eval_after"]["exact_match"])
    print_table(results, len(held_out))
    return results


def print_table(results: dict, num_held_out: int) -> None:
    """The table of `main`'s results."""
    print(f"\n{align.TASK}, {num_held_out} held-out problems; exact match = greedy decoding checked by the verifier")
    if "pairs" in results:
        print(f"preference pairs from the SFT model's samples: {results['pairs']['train']} train, "
              f"{results['pairs']['held_out']} held-out")
    print(f"{'method':8} {'minutes':>8} {'EM before':>10} {'EM after':>9} {'gain':>7} {'KL to ref':>10}")
    names = {"sft": f"sft@{results['sft']['step']}", "sft_final": "sft@last"}
    for method, r in results.items():
        if method == "pairs":
            continue
        label = names.get(method, method)
        if method == "reward":
            accuracy = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.1%}"
            print(f"{label:8} {r['minutes']:8.2f}   held-out preference accuracy {accuracy}")
            continue
        kl = "" if r["kl"] is None else f"{r['kl']:10.3f}"
        minutes = "" if r["minutes"] is None else f"{r['minutes']:8.2f}"
        print(f"{label:8} {minutes:>8} {r['before']:10.1%} {r['after']:9.1%} "
              f"{100 * (r['after'] - r['before']):+6.1f}pt {kl}")
        if "run_eval" in r:
            print(f"{'':8} (the run's own evaluation: {r['run_eval'][0]:.1%} -> {r['run_eval'][1]:.1%})")


if __name__ == "__main__":
    main()
