"""GRPO and RLOO (`objective=grpo | rloo`): the group-relative clipped policy objective on
rollouts of the current policy (`train.rollout`).

Axis letters: B batch rows (completions), T row width, G completions per prompt.

    per rollout: data.batch_size prompts x G completions (rl.num_generations), scored by
                 rl.rewards (`train.rewards`); old and reference log-probs
    advantages   grpo: A = (r - mean_group(r)) / (std_group(r) + 1e-4)      (rl.scale_rewards)
                       A =  r - mean_group(r)                                (scale_rewards=False:
                                                                               Dr. GRPO)
                 rloo: A = r - mean of the other G - 1 rewards of the group (leave-one-out)
    per token    ratio = exp(logp - logp_old)
                 loss_t = -min(ratio A, clip(ratio, 1 - eps, 1 + eps_high) A)
                          + beta (exp(ref - logp) - (ref - logp) - 1)        (k3, rl.kl_coef)
    updates      rl.epochs passes over rl.minibatches minibatches: one optimizer step each,
                 of data.batch_size x G / minibatches rows (the step's batch)

`rl.loss_type` names TRL's normalizations (trl 1.16 `GRPOTrainer._compute_loss`):
    grpo     each sequence's mean over its completion tokens, then the mean over sequences
    dr_grpo  the sum over tokens / (rows x rl.max_new_tokens)                (Dr. GRPO)
    dapo     the sum over tokens / the rollout's completion tokens per step (its total /
             rl.minibatches: TRL's `num_items_in_batch / steps_per_generation`), token-level
             over the whole batch, with clip-higher (rl.clip_eps_high)
    bnpo     the sum over a micro-batch's tokens / that micro-batch's tokens, averaged over
             the micro-batches (TRL's per-device batch: one SPMD step has no per-process
             batch, so the unit is the micro-batch, optimizer.grad_accum_steps)
Each is the micro-batch's share of the whole batch's loss (the accumulation contract of
`train.objectives.base`). With one update per rollout (epochs = minibatches = 1) the ratio is
1: the old log-probs are the current ones, stopped (no extra forward pass). rl.kl_coef = 0
builds no reference. The log-probs use the logits divided by rl.temperature, as TRL's.

RLOO here is the same clipped token-level objective with the leave-one-out baseline (TRL's
`RLOOTrainer` instead puts the KL into the reward and clips sequence ratios).

Metrics (shares of the step's batch): reward, reward_std (mean within-group std), kl,
clip_low / clip_high (token fractions clipped below with A < 0 / above with A > 0, TRL's),
entropy (nats per completion token), completion_length. Evaluation (`evaluate_run`): greedy
completions of the held-out prompts: exact_match, mean_reward, mean_length
(`train.rollout.evaluate`); the summary holds them before and after training.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from inference.generate import lm_logits
from train import logprobs as logprobs_lib
from train import rollout
from train.objectives import register

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
ADVANTAGE_EPS = 1e-4  # TRL's: (r - mean) / (std + 1e-4)
BATCH_KEYS_BT = ("ids", "completion_mask", "old_logps", "ref_logps")
BATCH_KEYS_B = ("advantages", "rewards", "group_std", "tokens_per_step")


def group_advantages(rewards_B: jax.Array, num_generations: int, *, scale: bool) -> tuple[jax.Array, jax.Array]:
    """(advantages [B], the group's std [B]) of rewards whose G rows per prompt are adjacent:
    r - the group mean, divided by (the group's unbiased std + 1e-4) when `scale` (TRL)."""
    r_PG = rewards_B.reshape(-1, num_generations).astype(jnp.float32)
    mean_P1 = jnp.mean(r_PG, axis=1, keepdims=True)
    std_P1 = jnp.std(r_PG, axis=1, keepdims=True, ddof=1)
    advantages_PG = r_PG - mean_P1
    if scale:
        advantages_PG = advantages_PG / (std_P1 + ADVANTAGE_EPS)
    return advantages_PG.reshape(-1), jnp.broadcast_to(std_P1, r_PG.shape).reshape(-1)


def leave_one_out_advantages(rewards_B: jax.Array, num_generations: int) -> jax.Array:
    """[B] RLOO's advantages: each reward minus the mean of the other G - 1 of its group."""
    r_PG = rewards_B.reshape(-1, num_generations).astype(jnp.float32)
    baseline_PG = (jnp.sum(r_PG, axis=1, keepdims=True) - r_PG) / (num_generations - 1)
    return (r_PG - baseline_PG).reshape(-1)


def per_token_terms(logps_BT, old_logps_BT, ref_logps_BT, advantages_B, *, clip_low: float, clip_high: float,
                    kl_coef: float) -> dict[str, jax.Array]:
    """The per-token clipped objective (+ beta k3) and what the metrics read, all [B, T].

    Args:
      logps_BT: the current policy's token log-probs (differentiated).
      old_logps_BT: the sampling policy's.
      ref_logps_BT: the reference's (ignored when kl_coef is 0).
      advantages_B: one advantage per row.
      clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
      kl_coef: beta.

    Returns:
      {loss, kl (k3; zeros when kl_coef is 0), clipped_low, clipped_high (float 0/1)}.
    """
    a_B1 = advantages_B[:, None]
    ratio_BT = jnp.exp(logps_BT - old_logps_BT)
    clipped_BT = jnp.clip(ratio_BT, 1.0 - clip_low, 1.0 + clip_high)
    loss_BT = -jnp.minimum(ratio_BT * a_B1, clipped_BT * a_B1)
    if kl_coef:
        diff_BT = ref_logps_BT - logps_BT
        kl_BT = jnp.exp(diff_BT) - diff_BT - 1.0
        loss_BT = loss_BT + kl_coef * kl_BT
    else:
        kl_BT = jnp.zeros_like(loss_BT)
    return {"loss": loss_BT, "kl": kl_BT,
            "clipped_low": ((ratio_BT < 1.0 - clip_low) & (a_B1 < 0)).astype(jnp.float32),
            "clipped_high": ((ratio_BT > 1.0 + clip_high) & (a_B1 > 0)).astype(jnp.float32)}


def normalized_loss(loss_BT, mask_BT, totals: dict[str, jax.Array], *, loss_type: str,
                    max_completion_len: int) -> jax.Array:
    """The micro-batch's share of the whole batch's loss under `loss_type` (module docstring).

    Args:
      loss_BT: per-token losses.
      mask_BT: float 1 on the completion tokens.
      totals: the whole batch's `rows`, `tokens_per_step` and `micro_batches`.
      loss_type: grpo | dr_grpo | dapo | bnpo.
      max_completion_len: rl.max_new_tokens (dr_grpo's constant).
    """
    summed_B = jnp.sum(loss_BT * mask_BT, axis=1)
    if loss_type == "grpo":
        return jnp.sum(summed_B / jnp.maximum(jnp.sum(mask_BT, axis=1), 1.0)) / totals["rows"]
    if loss_type == "dr_grpo":
        return jnp.sum(summed_B) / (totals["rows"] * max_completion_len)
    if loss_type == "dapo":
        return jnp.sum(summed_B) / jnp.maximum(totals["tokens_per_step"], 1.0)
    if loss_type == "bnpo":
        return jnp.sum(summed_B) / jnp.maximum(jnp.sum(mask_BT), 1.0) / totals["micro_batches"]
    raise ValueError(f"rl.loss_type={loss_type!r}; expected one of {LOSS_TYPES}")


def experience_batch(exp: rollout.Experience, *, num_generations: int, minibatches: int, scale: bool,
                     leave_one_out: bool) -> dict[str, jax.Array]:
    """The step's batch keys of a whole rollout (traced; rows still grouped): advantages,
    the groups' stds, the completion tokens per optimizer step, zeros for absent log-probs."""
    if leave_one_out:
        advantages_B = leave_one_out_advantages(exp.rewards, num_generations)
        _, std_B = group_advantages(exp.rewards, num_generations, scale=False)
    else:
        advantages_B, std_B = group_advantages(exp.rewards, num_generations, scale=scale)
    zeros_BT = jnp.zeros(exp.ids.shape, jnp.float32)
    tokens = jnp.sum(exp.completion_mask).astype(jnp.float32) / minibatches
    return {"ids": exp.ids, "completion_mask": exp.completion_mask,
            "old_logps": zeros_BT if exp.old_logps is None else exp.old_logps,
            "ref_logps": zeros_BT if exp.ref_logps is None else exp.ref_logps,
            "advantages": advantages_B, "rewards": exp.rewards.astype(jnp.float32), "group_std": std_B,
            "tokens_per_step": jnp.full(exp.rewards.shape, tokens)}


@dataclasses.dataclass(frozen=True)
class GRPOObjective:
    """GRPO / RLOO (see the module docstring); the rollout settings come from the run config.

    Attributes:
      model: the policy (models/gpt.py).
      name: grpo | rloo.
      num_generations, max_new_tokens, epochs, minibatches, clip_eps, clip_eps_high, kl_coef,
        loss_type, scale_rewards: the `rl.*` keys.
      logit_scale: 1 / rl.temperature (the log-probs of the sampling distribution).
    """

    model: Any
    name: str = "grpo"
    num_generations: int = 8
    max_new_tokens: int = 32
    epochs: int = 1
    minibatches: int = 1
    clip_eps: float = 0.2
    clip_eps_high: float = 0.0
    kl_coef: float = 0.04
    loss_type: str = "grpo"
    scale_rewards: bool = True
    logit_scale: float = 1.0

    @property
    def on_policy(self) -> bool:
        """One update per rollout: the ratio is 1 and the old log-probs are the current ones."""
        return self.epochs * self.minibatches == 1

    def batch_spec(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """One optimizer step's rows: `batch_size` prompts x G completions / rl.minibatches."""
        rows = batch_size * self.num_generations // self.minibatches
        spec = {k: jax.ShapeDtypeStruct((rows, seq_len), jnp.float32) for k in BATCH_KEYS_BT}
        spec.update(ids=jax.ShapeDtypeStruct((rows, seq_len), jnp.int32),
                    completion_mask=jax.ShapeDtypeStruct((rows, seq_len), jnp.int32))
        spec.update({k: jax.ShapeDtypeStruct((rows,), jnp.float32) for k in BATCH_KEYS_B})
        return spec

    def prepare(self, batch, rng):
        return batch

    def totals(self, batch):
        return {"rows": jnp.float32(batch["ids"].shape[0]),
                "tokens": jnp.maximum(jnp.sum(batch["completion_mask"]), 1).astype(jnp.float32),
                "tokens_per_step": jnp.mean(batch["tokens_per_step"])}

    def policy_loss(self, logps_BT, entropy_BT, batch, totals) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(the micro-batch's share of the loss, its stats) from the current token log-probs."""
        mask_BT = batch["completion_mask"].astype(jnp.float32)
        old_BT = jax.lax.stop_gradient(logps_BT) if self.on_policy else batch["old_logps"]
        terms = per_token_terms(logps_BT, old_BT, batch["ref_logps"], batch["advantages"], clip_low=self.clip_eps,
                                clip_high=self.clip_eps_high or self.clip_eps, kl_coef=self.kl_coef)
        loss = normalized_loss(terms["loss"], mask_BT, totals, loss_type=self.loss_type,
                               max_completion_len=self.max_new_tokens)

        def token_share(x_BT):
            return jnp.sum(jax.lax.stop_gradient(x_BT) * mask_BT) / totals["tokens"]

        rows = totals["rows"]
        stats = {"loss": loss, "reward": jnp.sum(batch["rewards"]) / rows,
                 "reward_std": jnp.sum(batch["group_std"]) / rows,
                 "completion_length": jnp.sum(mask_BT) / rows, "entropy": token_share(entropy_BT),
                 "clip_low": token_share(terms["clipped_low"]), "clip_high": token_share(terms["clipped_high"])}
        if self.kl_coef:
            stats["kl"] = token_share(terms["kl"])
        return loss, stats

    def loss(self, params, batch, rng, totals):
        del rng  # no dropout in RL updates: the ratio compares deterministic policies
        logits_BTV = lm_logits(self.model.apply({"params": params}, batch["ids"], deterministic=True))
        logits_BTV = logits_BTV.astype(jnp.float32) * self.logit_scale
        logps_BT = logprobs_lib.token_logprobs(logits_BTV, batch["ids"])
        loss, stats = self.policy_loss(logps_BT, logprobs_lib.token_entropy(logits_BTV), batch, totals)
        return loss, (stats, {})

    def after_update(self, params, aux, accum_steps):
        return params, {}

    def eval_sums(self, params, batch, rng):
        raise TypeError(f"objective {self.name} evaluates by generation (evaluate_run), not by eval_sums")

    def eval_metrics(self, sums):
        return rollout.eval_metrics(sums)

    # ---------------------------------------------------------------- host side: data, rollouts, evaluation

    def train_iterator(self, config, data_cfg, tokenizer):
        from data import prompts

        return prompts.train_iterator(data_cfg, prompts.prompt_config(config), tokenizer)

    def eval_batches(self, config, data_cfg, tokenizer):
        from data import prompts

        return prompts.eval_dataset(data_cfg, prompts.prompt_config(config), tokenizer)

    def batches(self, run, train_iter, state_fn):
        """Rollouts of the current policy scored by rl.rewards, then their minibatches."""
        return self.rollout_batches(run, train_iter, state_fn, scorer(run))

    def rollout_batches(self, run, train_iter, state_fn, scoring: rollout.Scorer):
        """`batches` with the given scorer (`train.rollout.rl_batches`); the reference is built
        once (rl.kl_coef > 0)."""
        from train import reference

        roller = rollout.Roller(run, rollout.settings(run.config, run.tokenizer), scoring)
        ref = reference.build(run) if self.kl_coef else None
        make = jax.jit(functools.partial(experience_batch, num_generations=self.num_generations,
                                         minibatches=self.minibatches, scale=self.scale_rewards,
                                         leave_one_out=self.name == "rloo"),
                       in_shardings=run.layout.batch, out_shardings=run.layout.batch)
        yield from rollout.rl_batches(run, train_iter, state_fn, roller=roller, make_batch=make, epochs=self.epochs,
                                      count=self.minibatches, reference=ref)

    def evaluate_run(self, run, state, eval_batches):
        """Greedy completions of the held-out prompts: exact match, mean reward, mean length."""
        from train import rewards as rewards_lib

        roller = _greedy_roller(run)
        accuracy = rewards_lib.RewardSet(("accuracy",), (1.0,), (rewards_lib.accuracy_reward,))
        return rollout.evaluate(run, state, eval_batches, roller=roller, accuracy=accuracy,
                                max_batches=run.config.eval.max_batches)


def scorer(run) -> rollout.Scorer:
    """The run's reward scorer: rl.rewards over the training prompts' host table."""
    from data import prompts

    train, _ = prompts.splits(run.data, prompts.prompt_config(run.config), run.tokenizer)
    return rollout.Scorer(run.tokenizer, _run_state(run)["rewards"], train.examples,
                          rollout.stop_tokens(run.tokenizer, run.config.sft.chat_template))


_RUNS: dict[int, dict[str, Any]] = {}  # id(run) -> what is built once per run (one run at a time)


def _run_state(run) -> dict[str, Any]:
    """The run's rewards (a reward model is loaded once, for training and evaluation) and its
    greedy evaluation roller (its generator compiled once)."""
    if id(run) not in _RUNS or _RUNS[id(run)]["run"] is not run:
        from train import rewards as rewards_lib

        _RUNS.clear()
        _RUNS[id(run)] = {"run": run, "rewards": rewards_lib.build(run.config, run=run)}
    return _RUNS[id(run)]


def _greedy_roller(run) -> rollout.Roller:
    """The run's greedy one-completion roller, scoring the held-out prompts with rl.rewards."""
    from data import prompts

    state = _run_state(run)
    if "greedy" not in state:
        _, held_out = prompts.splits(run.data, prompts.prompt_config(run.config), run.tokenizer)
        scoring = rollout.Scorer(run.tokenizer, state["rewards"], held_out.examples,
                                 rollout.stop_tokens(run.tokenizer, run.config.sft.chat_template))
        state["greedy"] = rollout.Roller(run, rollout.settings(run.config, run.tokenizer, greedy=True), scoring)
    return state["greedy"]


def check_config(config, workdir: str) -> None:
    """The rl keys of grpo / rloo and the prompt data, before any work.

    Raises:
      ValueError: one line naming the config key and the fix.
    """
    from data import prompts
    from train import rewards as rewards_lib

    rl, name = config.rl, config.objective
    if rl.num_generations < 2:
        raise ValueError(f"config key `rl.num_generations`={rl.num_generations}: {name} compares the completions of "
                         "a prompt with each other (its baseline is their mean), so it needs 2 or more")
    if rl.loss_type not in LOSS_TYPES:
        raise ValueError(f"config key `rl.loss_type`={rl.loss_type!r}; expected one of {LOSS_TYPES}")
    for key in ("epochs", "minibatches"):
        if rl[key] < 1:
            raise ValueError(f"config key `rl.{key}`={rl[key]} must be >= 1")
    rows = config.data.batch_size * rl.num_generations
    if rows % rl.minibatches or (rows // rl.minibatches) % config.optimizer.grad_accum_steps:
        raise ValueError(f"config key `rl.minibatches`={rl.minibatches}: a rollout's data.batch_size x "
                         f"rl.num_generations = {rows} rows must split into minibatches, and each minibatch into "
                         f"optimizer.grad_accum_steps={config.optimizer.grad_accum_steps} micro-batches")
    if not rl.temperature > 0:
        raise ValueError(f"config key `rl.temperature`={rl.temperature}: the G completions of a prompt must be "
                         "sampled (> 0); greedy decoding would make them identical")
    if not rl.clip_eps > 0 or rl.clip_eps_high < 0 or rl.kl_coef < 0:
        raise ValueError(f"config keys `rl.clip_eps`={rl.clip_eps} (> 0), `rl.clip_eps_high`={rl.clip_eps_high} "
                         f"and `rl.kl_coef`={rl.kl_coef} (>= 0) are out of range")
    rewards_lib.check(config)
    prompts.check_source(config, workdir)


def prepare_data(config, workdir: str, data_cfg):
    from data import prompts

    return prompts.prepare(config, workdir, data_cfg)


def _make(config, model, tokenizer, name: str) -> GRPOObjective:
    del tokenizer
    rl = config.rl
    return GRPOObjective(model, name=name, num_generations=rl.num_generations, max_new_tokens=rl.max_new_tokens,
                         epochs=rl.epochs, minibatches=rl.minibatches, clip_eps=rl.clip_eps,
                         clip_eps_high=rl.clip_eps_high, kl_coef=rl.kl_coef, loss_type=rl.loss_type,
                         scale_rewards=rl.scale_rewards,
                         logit_scale=1.0 / rl.temperature if rl.temperature > 0 else 1.0)


@register("grpo", check=check_config, prepare=prepare_data)
def make_grpo(config, model, tokenizer) -> GRPOObjective:
    """The grpo objective of a run config (`rl.*`)."""
    return _make(config, model, tokenizer, "grpo")


@register("rloo", check=check_config, prepare=prepare_data)
def make_rloo(config, model, tokenizer) -> GRPOObjective:
    """The rloo objective of a run config (`rl.*`; the leave-one-out baseline)."""
    return _make(config, model, tokenizer, "rloo")
