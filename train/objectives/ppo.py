"""PPO (`objective=ppo`): a policy and a value function trained on its own rollouts.

Axis letters: B rows (one completion per prompt), T sequence (data.seq_len), V vocabulary.

    per rollout (the `batches` hook, between optimizer steps):
      rows      <- next(train_iter)                 data.batch_size prompts (data.prompts)
      generate  one completion per prompt from the current, still-sharded policy (train.rollout)
      score     rl.rewards on each process's own rows (train.rewards)
      once      old log-probs and old values (one forward of the policy as it sampled), the
                reference's log-probs (train.reference)
      rewards   -beta * KL per token, the score at the last completion token (rl_math.shaped_rewards);
                whitened if rl.whiten_rewards
      GAE       advantages and returns (rl.gamma, rl.lam); advantages whitened over the rollout
      beta      the KL controller's next coefficient (fixed: rl.kl_coef; adaptive: rl.kl_target > 0)
      then rl.epochs x rl.minibatches optimizer steps on its minibatches (the last one a boundary)

    loss (one minibatch, per completion token, averaged over the minibatch's tokens):
      clipped surrogate (rl.clip_eps) + rl.vf_coef * clipped value loss (rl.vf_clip)

The value head (`rl.value_head`): `shared` is a `score` head on the policy's trunk
(`GPTConfig.head="lm_score"`); `separate` a value model of the policy's architecture with its
own trunk (`models.policy_value`: the policy's params stay where a plain GPT keeps them, the
value model under `value_model/`). Under LoRA the value head (`score`, either) trains with the
adapters (`trainable_head`), and a separate value model has adapters of its own.

Log-probs (old, reference, new) are of the logits divided by the sampling temperature, as TRL
does; the loss runs without dropout (the ratio compares with the rollout's deterministic
log-probs; TRL disables dropout for PPO too).

Where the adaptive KL coefficient lives: in the prompt iterator's checkpointed state
(`KLStateIterator.get_state()` = {"prompts": ..., "kl_coef": beta}), which the trainer saves
with every checkpoint and restores on resume. It changes only between rollouts and the loop
saves only at rollout boundaries, so the saved beta is always the one the next rollout uses:
a resumed run continues with the coefficient an uninterrupted one would have. Every process
updates it from the same replicated KL, so all hold the same float.

Metrics per step: reward (mean score of the rollout's rows in the step), kl (summed per-token
KL to the reference per completion), kl_coef, clip_fraction, value_clip_fraction,
explained_variance (of the rollout's values for its returns), entropy (nats per completion
token), policy_loss, value_loss, approx_kl, completion_length. The evaluation is the shared RL
evaluation (`train.rollout.evaluate`): greedy completions of held-out prompts -> exact match,
mean reward, mean length (before and after training in the summary).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.policy_value import policy_model
from train import logprobs as logprobs_lib
from train import rl_math
from train import trainable as trainable_lib
from train.objectives import register

VALUE_HEADS = ("shared", "separate")
# Per-row rollout figures the batch carries so the step reports them (means over rows).
ROLLOUT_KEYS = ("reward", "kl", "kl_coef", "explained_variance", "completion_length")


@dataclasses.dataclass(frozen=True)
class PPOSettings:
    """The `rl.*` keys PPO reads (configs/base.py)."""

    clip_eps: float = 0.2
    vf_clip: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    epochs: int = 1
    minibatches: int = 1
    logit_scale: float = 1.0  # 1 / rl.temperature (1 if greedy)
    kl: rl_math.KLController = dataclasses.field(default_factory=lambda: rl_math.KLController(0.04))


def settings_of(config) -> PPOSettings:
    """The PPO settings of a run config."""
    rl = config.rl
    return PPOSettings(clip_eps=rl.clip_eps, vf_clip=rl.vf_clip, vf_coef=rl.vf_coef, gamma=rl.gamma, lam=rl.lam,
                       whiten_rewards=rl.whiten_rewards, epochs=rl.epochs, minibatches=rl.minibatches,
                       logit_scale=1.0 / rl.temperature if rl.temperature > 0 else 1.0,
                       kl=rl_math.KLController(rl.kl_coef, rl.kl_target, float(rl.kl_horizon)))


def policy_outputs(model: nn.Module, params, ids_BT: jax.Array, logit_scale: float = 1.0):
    """(token log-probs [B, T], scaled logits [B, T, V], values [B, T]) of the rows under the
    policy with its value head (`from_outputs`)."""
    logits_BTV, scores_BTS = model.apply({"params": params}, ids_BT, deterministic=True)
    return from_outputs(logits_BTV, scores_BTS, ids_BT, logit_scale)


def from_outputs(logits_BTV: jax.Array, scores_BTS: jax.Array, ids_BT: jax.Array, logit_scale: float = 1.0):
    """(token log-probs [B, T], logits x logit_scale [B, T, V], values [B, T]) from the model's
    (logits, scores), all indexed like `ids` (`train.rl_math`): values[t] = V(ids[< t]), the
    value head at t - 1 (0 at t = 0)."""
    logits_BTV = logits_BTV.astype(jnp.float32) * logit_scale
    values_BT = jnp.pad(scores_BTS[:, :-1, 0].astype(jnp.float32), ((0, 0), (1, 0)))
    return logprobs_lib.token_logprobs(logits_BTV, ids_BT), logits_BTV, values_BT


def experience_batch(params, frozen, ids_BT, mask_BT, ref_logps_BT, score_B, kl_coef, *, model: nn.Module,
                     settings: PPOSettings) -> tuple[dict[str, jax.Array], jax.Array]:
    """(the step's batch of one rollout, its mean sequence KL): old log-probs and values from
    one forward of the sampling policy, KL-shaped (optionally whitened) rewards, GAE and
    whitened advantages (module docstring). Pure; the caller jits it on the run's layout."""
    s = settings
    m_BT = mask_BT.astype(jnp.float32)
    logps_BT, _, values_BT = policy_outputs(model, trainable_lib.combine(params, frozen), ids_BT, s.logit_scale)
    logps_BT, values_BT = logps_BT * m_BT, values_BT * m_BT
    rewards_BT, kl_BT = rl_math.shaped_rewards(score_B, logps_BT, ref_logps_BT, mask_BT, kl_coef)
    if s.whiten_rewards:
        rewards_BT = rl_math.whiten_rewards(rewards_BT, mask_BT)
    advantages_BT, returns_BT = rl_math.gae(rewards_BT, values_BT, mask_BT, s.gamma, s.lam)
    advantages_BT = rl_math.masked_whiten(advantages_BT, mask_BT) * m_BT
    kl_B = jnp.sum(kl_BT, axis=1)
    B = ids_BT.shape[0]
    batch = {
        "ids": ids_BT, "completion_mask": mask_BT.astype(jnp.int32), "old_logps": logps_BT, "old_values": values_BT,
        "advantages": advantages_BT, "returns": returns_BT,
        "reward": score_B.astype(jnp.float32), "kl": kl_B, "kl_coef": jnp.full((B,), kl_coef, jnp.float32),
        "explained_variance": jnp.full((B,), rl_math.explained_variance(values_BT, returns_BT, mask_BT)),
        "completion_length": jnp.sum(m_BT, axis=1),
    }
    return batch, jnp.mean(kl_B)


class KLStateIterator:
    """The prompt iterator with the KL coefficient in its checkpointed state (module docstring)."""

    def __init__(self, prompts, kl_coef: float):
        self.prompts, self.kl_coef = prompts, float(kl_coef)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self.prompts)

    def get_state(self) -> dict:
        return {"prompts": self.prompts.get_state(), "kl_coef": self.kl_coef}

    def set_state(self, state: dict) -> None:
        self.prompts.set_state(state["prompts"])
        self.kl_coef = float(state["kl_coef"])


def _roller(run, *, split: str):
    """The run's `train.rollout.Roller` generating with the policy alone (`models.policy_value.
    policy_model`: a separate value model is not run while decoding): one sampled completion per
    prompt scored by rl.rewards on the training prompts (split "train"), or greedy on the
    held-out ones ("eval"). One per run and split, so each compiles once."""
    from data import prompts
    from train import rewards, rollout

    cache = run.__dict__.setdefault("_ppo_rollers", {})  # lives and dies with the run
    if split not in cache:
        config = run.config
        train, held_out = prompts.splits(run.data, prompts.prompt_config(config), run.tokenizer)
        if "rewards" not in cache:  # one RewardSet (a reward model loads once) for both splits
            cache["rewards"] = rewards.build(config, run=run)
        scorer = rollout.Scorer(run.tokenizer, cache["rewards"],
                                (train if split == "train" else held_out).examples,
                                rollout.stop_tokens(run.tokenizer, config.sft.chat_template))
        settings = rollout.settings(config, run.tokenizer, num_generations=1, greedy=split == "eval")
        cache[split] = rollout.Roller(_with_model(run, policy_model(run.model)), settings, scorer)
    return cache[split]


def _with_model(run, model):
    """`run` whose `model` is the generating policy (a `train.trainer.Run` or a test's namespace)."""
    if dataclasses.is_dataclass(run):
        return dataclasses.replace(run, model=model)
    return types.SimpleNamespace(**{**vars(run), "model": model})


@dataclasses.dataclass(frozen=True)
class PPOObjective:
    """PPO's clipped policy and value losses on rollout minibatches (module docstring).

    Attributes:
      model: the policy with its value head: a `lm_score` GPT or a `PolicyWithValueModel`,
        both returning (logits, values).
      settings: the rl keys.
    """

    model: nn.Module
    settings: PPOSettings = dataclasses.field(default_factory=PPOSettings)
    name: str = "ppo"
    # The value head trains under every PEFT method (`train.trainable.split`'s objective_head).
    trainable_head: str = r"(^|/)score$"

    def batch_spec(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """A minibatch: data.batch_size prompts' rollout rows / rl.minibatches."""
        B = batch_size // self.settings.minibatches
        f32, i32 = jnp.float32, jnp.int32
        spec = {"ids": (i32, 2), "completion_mask": (i32, 2), "old_logps": (f32, 2), "old_values": (f32, 2),
                "advantages": (f32, 2), "returns": (f32, 2), **{k: (f32, 1) for k in ROLLOUT_KEYS}}
        return {k: jax.ShapeDtypeStruct((B, seq_len)[:rank], dtype) for k, (dtype, rank) in spec.items()}

    def prepare(self, batch, rng):
        return batch

    def totals(self, batch):
        return {"tokens": jnp.maximum(jnp.sum(batch["completion_mask"]), 1).astype(jnp.float32),
                "rows": jnp.float32(batch["ids"].shape[0])}

    def loss(self, params, batch, rng, totals):
        """(this micro-batch's share of the minibatch's PPO loss, (stats, None)) (`loss_of_outputs`)."""
        del rng  # no dropout (module docstring)
        logits_BTV, scores_BTS = self.model.apply({"params": params}, batch["ids"], deterministic=True)
        loss, stats = self.loss_of_outputs(logits_BTV, scores_BTS, batch, totals)
        return loss, (stats, None)

    def loss_of_outputs(self, logits_BTV, scores_BTS, batch, totals) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss, stats) from the model's (logits, scores) on `batch`: the minibatch's token means
        (sums over this micro-batch / totals["tokens"]) of the clipped surrogate plus vf_coef x
        the clipped value loss; rollout figures as means over rows."""
        s = self.settings
        logps_BT, logits_BTV, values_BT = from_outputs(logits_BTV, scores_BTS, batch["ids"], s.logit_scale)
        mask_BT = batch["completion_mask"]
        pg_BT, pg_clipped_BT = rl_math.clipped_surrogate(logps_BT, batch["old_logps"], batch["advantages"],
                                                         s.clip_eps)
        vf_BT, vf_clipped_BT = rl_math.clipped_value_loss(values_BT, batch["old_values"], batch["returns"], s.vf_clip)

        def token_mean(x_BT):  # this micro-batch's share of the minibatch's token mean
            return rl_math.masked_sum(x_BT, mask_BT) / totals["tokens"]

        policy_loss, value_loss = token_mean(pg_BT), token_mean(vf_BT)
        loss = policy_loss + s.vf_coef * value_loss
        stats = {"loss": loss, "policy_loss": policy_loss, "value_loss": value_loss,
                 "clip_fraction": token_mean(pg_clipped_BT), "value_clip_fraction": token_mean(vf_clipped_BT),
                 "entropy": token_mean(logprobs_lib.token_entropy(logits_BTV)),
                 "approx_kl": token_mean(rl_math.approx_kl(logps_BT, batch["old_logps"])),
                 **{k: jnp.sum(batch[k]) / totals["rows"] for k in ROLLOUT_KEYS}}
        return loss, stats

    def after_update(self, params, aux, accum_steps):
        return params, {}

    # ---------------------------------------------------------------- host side: prompts, rollouts, evaluation

    def train_iterator(self, config, data_cfg, tokenizer) -> KLStateIterator:
        """This process's prompt rows of each rollout (`data.prompts`), with the KL coefficient."""
        from data import prompts

        return KLStateIterator(prompts.train_iterator(data_cfg, prompts.prompt_config(config), tokenizer),
                               self.settings.kl.init)

    def eval_batches(self, config, data_cfg, tokenizer):
        """The held-out prompt rows (a grain dataset: each evaluation iterates it again)."""
        from data import prompts

        return prompts.eval_dataset(data_cfg, prompts.prompt_config(config), tokenizer)

    def batches(self, run, train_iter: KLStateIterator, state_fn) -> Iterator[tuple[dict, bool]]:
        """The trainer's hook (`train.objectives.base`): rollouts of the current policy and
        their minibatches (`rollout_batches`), against the run's reference."""
        from train import reference as reference_lib

        roller = _roller(run, split="train")
        yield from self.rollout_batches(run, train_iter, state_fn, roller=roller, reference=reference_lib.build(run))

    def evaluate_run(self, run, state, eval_batches) -> tuple[dict[str, float], dict[str, float]]:
        """The shared RL evaluation (`train.rollout.evaluate`): greedy completions of the
        held-out prompts -> exact match, mean reward, mean length."""
        from train import rewards, rollout

        accuracy = rewards.RewardSet(("accuracy",), (1.0,), (rewards.accuracy_reward,))
        return rollout.evaluate(run, state, eval_batches, roller=_roller(run, split="eval"), accuracy=accuracy,
                                max_batches=run.config.eval.max_batches)

    def eval_sums(self, params, batch, rng):
        raise TypeError("objective ppo evaluates by generation (evaluate_run), not by eval_sums")

    def eval_metrics(self, sums):
        from train import rollout

        return rollout.eval_metrics(sums)

    def experience_fn(self, layout):
        """`experience_batch` jitted on `layout` (params and frozen in the state's shardings, rows batch-sharded)."""

        def traced(*args):
            with layout.tracing():
                return experience_batch(*args, model=self.model, settings=self.settings)

        state = layout.state
        return jax.jit(traced, in_shardings=(state.params, state.frozen, layout.batch, layout.batch, layout.batch,
                                             layout.batch, layout.replicated),
                       out_shardings=(layout.batch, layout.replicated))

    def rollout_batches(self, run, train_iter: KLStateIterator, state_fn, *, roller, reference) \
            -> Iterator[tuple[dict, bool]]:
        """Per rollout: generate and score (`roller`), the experience batch, the next KL
        coefficient into `train_iter`, then rl.epochs x rl.minibatches (minibatch, boundary)."""
        from train import rollout

        s = self.settings
        experience = self.experience_fn(run.layout)
        per_rollout = s.epochs * s.minibatches
        while True:
            rows = next(train_iter)
            state = state_fn()
            index = int(state.step) // per_rollout
            exp = roller.rollout(state, rows, rollout.rollout_rng(run.config.seed, index), reference, old_logps=False)
            batch, kl_mean = experience(state.params, state.frozen, exp.ids, exp.completion_mask, exp.ref_logps,
                                        exp.rewards, jnp.float32(train_iter.kl_coef))
            del state  # donated by the next step
            train_iter.kl_coef = s.kl.update(train_iter.kl_coef, float(kl_mean), int(exp.ids.shape[0]))
            yield from rollout.minibatches(batch, roller.select, epochs=s.epochs, count=s.minibatches)


def check_config(config, workdir: str | None) -> None:
    """PPO's own keys, then (with a workdir) the rewards' and the prompt data's
    (`train.rewards.check`, `data.prompts.check_source`).

    Raises:
      ValueError: one line naming the config key and the fix.
    """
    rl = config.rl
    if rl.value_head not in VALUE_HEADS:
        raise ValueError(f"config key `rl.value_head`={rl.value_head!r}; expected one of {VALUE_HEADS}")
    for key in ("epochs", "minibatches"):
        if rl[key] < 1:
            raise ValueError(f"config key `rl.{key}`={rl[key]} must be >= 1")
    rows, accum = config.data.batch_size, config.optimizer.grad_accum_steps
    if rows % rl.minibatches or (rows // rl.minibatches) % accum:
        raise ValueError(f"config key `rl.minibatches`={rl.minibatches}: a rollout's data.batch_size={rows} rows (one "
                         "completion per prompt) must split into minibatches, and each minibatch into "
                         f"optimizer.grad_accum_steps={accum} micro-batches")
    if not rl.temperature > 0:
        raise ValueError(f"config key `rl.temperature`={rl.temperature}: PPO learns from sampled completions; "
                         "give a temperature > 0 (1.0: the policy's own distribution)")
    for key in ("kl_coef", "kl_target", "vf_coef", "vf_clip", "clip_eps"):
        if rl[key] < 0:
            raise ValueError(f"config key `rl.{key}`={rl[key]} must be >= 0")
    if rl.kl_target > 0 and (rl.kl_horizon <= 0 or rl.kl_coef <= 0):
        raise ValueError(f"an adaptive KL coefficient (rl.kl_target={rl.kl_target}) needs rl.kl_coef > 0 and "
                         f"rl.kl_horizon > 0, got {rl.kl_coef} and {rl.kl_horizon}")
    if not (0.0 <= rl.gamma <= 1.0 and 0.0 <= rl.lam <= 1.0):
        raise ValueError(f"config keys `rl.gamma`={rl.gamma}, `rl.lam`={rl.lam} must lie in [0, 1]")
    if workdir is None:  # the keys only (the factory)
        return
    from data import prompts
    from train import rewards

    rewards.check(config)
    prompts.check_source(config, workdir)


def prepare_data(config, workdir: str, data_cfg):
    """The run's tokenizer, every prompt tokenized and checked (`data.prompts.prepare`)."""
    from data import prompts

    return prompts.prepare(config, workdir, data_cfg)


@register("ppo", check=check_config, prepare=prepare_data)
def make(config, model, tokenizer) -> PPOObjective:
    """The ppo objective of a run config: a decoder with its value head (`rl.value_head`)."""
    del tokenizer
    if config.model.family == "bert":
        raise ValueError("config key `objective`='ppo' trains a decoder policy, but model.family='bert'; use a "
                         "decoder family (gpt, llama, qwen, ...)")
    check_config(config, None)
    return PPOObjective(model, settings_of(config))
