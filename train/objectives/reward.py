"""Reward modelling (`objective=reward`): a decoder under a scalar `score` head, trained with the
Bradley-Terry loss on preference pairs.

Axis letters: B pairs (rows), T length, S scores.

    r(x)      = score head at the last non-padding token of x (index len - 1), as transformers'
                *ForSequenceClassification reads the last non-pad token
    loss      = mean over pairs of -log sigmoid(r(chosen) - r(rejected) - margin)
    accuracy  = share of pairs with r(chosen) > r(rejected);  margin = mean r(chosen) - r(rejected)

`margin` is the batch's per-pair margin (`preference.margin_key`; 0 without it), as TRL's
RewardTrainer subtracts it (Llama 2's margin loss). The model is `models.gpt.GPT` with
`GPTConfig.head="score"` (`train.build.decoder_head`); it starts from a causal LM (`init_from`,
the score head fresh) or a reward model (`hf:DIR` of a *ForSequenceClassification, `run:` of a
reward run), and `train.export` writes a *ForSequenceClassification directory.

Rows are right-padded; each pair's chosen and rejected rows run through the model as adjacent
rows of one [2B, T] batch (interleaved, so a device's pairs stay on that device under any batch
sharding). Pairs whose lengths are 0 (an evaluation's padding) count for nothing.
Accumulation (`train.objectives.base`): a micro-batch returns sum(pair losses) / (pairs in the
whole batch), its stats as shares alike. The data are `data.preference`'s paired batches.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from data import preference
from train.objectives import register

# The paired preference batch (`data.preference.PAIRED_KEYS`): [B, T] int32 token rows and
# masks, [B] int32 lengths and dataset rows, [B] float32 margins.
PAIR_ROWS = ("chosen_ids", "rejected_ids", "chosen_mask", "rejected_mask")
PAIR_COUNTS = ("chosen_len", "rejected_len", "index")


def pair_batch_spec(batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The paired preference batch's keys, shapes and dtypes."""
    spec = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32) for k in PAIR_ROWS}
    spec |= {k: jax.ShapeDtypeStruct((batch_size,), jnp.int32) for k in PAIR_COUNTS}
    return spec | {"margin": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}


def last_token_scores(scores_BTS: jax.Array, len_B: jax.Array) -> jax.Array:
    """[B] float32: the first score of each row at its last non-padding token (len - 1; a row
    of length 0 reads position 0 and must be masked by the caller)."""
    index_B = jnp.clip(len_B - 1, 0, scores_BTS.shape[1] - 1)
    return jnp.take_along_axis(scores_BTS[..., 0], index_B[:, None], axis=1)[:, 0].astype(jnp.float32)


def sequence_scores(model: nn.Module, params, ids_BT: jax.Array, len_B: jax.Array, *, deterministic: bool = True,
                    rngs: dict | None = None) -> jax.Array:
    """[B] float32 scores of right-padded rows under a decoder with a score head.

    Args:
      model: a `models.gpt.GPT` with `head="score"` (or "lm_score": its scores).
      params: its whole parameters.
      ids_BT: token rows, right-padded (what follows a row's length is never attended to).
      len_B: tokens before the padding of each row.
      deterministic, rngs: dropout off, or on with these rngs.

    Returns:
      The score head's first output at each row's token len - 1.
    """
    out = model.apply({"params": params}, ids_BT, deterministic=deterministic, rngs=rngs or {})
    return last_token_scores(out[1] if isinstance(out, tuple) else out, len_B)


def bradley_terry(chosen_B: jax.Array, rejected_B: jax.Array, margin_B: jax.Array | None = None) -> jax.Array:
    """[B] -log sigmoid(chosen - rejected - margin) in float32 (stable for any difference)."""
    diff_B = chosen_B.astype(jnp.float32) - rejected_B.astype(jnp.float32)
    if margin_B is not None:
        diff_B = diff_B - margin_B.astype(jnp.float32)
    return -jax.nn.log_sigmoid(diff_B)


def pair_scores(model: nn.Module, params, batch: dict[str, jax.Array], *, rng: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
    """(chosen [B], rejected [B]) scores of a paired batch, in one forward pass over the pairs'
    rows interleaved (row 2b chosen, 2b + 1 rejected)."""
    B, T = batch["chosen_ids"].shape
    ids = jnp.stack([batch["chosen_ids"], batch["rejected_ids"]], axis=1).reshape(2 * B, T)
    lens = jnp.stack([batch["chosen_len"], batch["rejected_len"]], axis=1).reshape(2 * B)
    kw = {} if rng is None else {"deterministic": False, "rngs": {"dropout": rng}}
    scores = sequence_scores(model, params, ids, lens, **kw).reshape(B, 2)
    return scores[:, 0], scores[:, 1]


def pair_sums(chosen_B: jax.Array, rejected_B: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums over the counted pairs: Bradley-Terry loss, correct orderings, margins, the chosen
    and rejected rewards, and the number of pairs."""
    counted_B = ((batch["chosen_len"] > 0) & (batch["rejected_len"] > 0)).astype(jnp.float32)
    diff_B = chosen_B - rejected_B
    return {"loss_sum": jnp.sum(bradley_terry(chosen_B, rejected_B, batch["margin"]) * counted_B),
            "correct_sum": jnp.sum((diff_B > 0) * counted_B), "margin_sum": jnp.sum(diff_B * counted_B),
            "chosen_sum": jnp.sum(chosen_B * counted_B), "rejected_sum": jnp.sum(rejected_B * counted_B),
            "pairs": jnp.sum(counted_B)}


def pair_metrics(sums: dict) -> dict:
    """Means per pair of `pair_sums` (or their totals over batches): loss, accuracy, margin,
    reward_chosen, reward_rejected."""
    count = jnp.maximum(sums["pairs"], 1.0) if isinstance(sums["pairs"], jax.Array) else max(sums["pairs"], 1.0)
    return {"loss": sums["loss_sum"] / count, "accuracy": sums["correct_sum"] / count,
            "margin": sums["margin_sum"] / count, "reward_chosen": sums["chosen_sum"] / count,
            "reward_rejected": sums["rejected_sum"] / count}


@dataclasses.dataclass(frozen=True)
class RewardObjective:
    """The Bradley-Terry loss of a reward model (see the module docstring)."""

    model: nn.Module
    name: str = "reward"
    # The score head trains under every PEFT method (`train.trainable.split`'s objective_head).
    trainable_head: str = r"^score$"

    def batch_spec(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        return pair_batch_spec(batch_size, seq_len)

    def prepare(self, batch, rng):
        return batch

    def totals(self, batch):
        counted = (batch["chosen_len"] > 0) & (batch["rejected_len"] > 0)
        return {"pairs": jnp.maximum(jnp.sum(counted), 1).astype(jnp.float32)}

    def loss(self, params, batch, rng, totals):
        """(share of the whole batch's mean pair loss, (stats, None)) of a micro-batch."""
        chosen, rejected = pair_scores(self.model, params, batch, rng=rng)
        sums = pair_sums(chosen, rejected, batch)
        stats = {k: v / totals["pairs"] for k, v in pair_metrics({**sums, "pairs": jnp.ones(())}).items()}
        return stats["loss"], ({**stats, "pairs": sums["pairs"]}, None)

    def after_update(self, params, aux, accum_steps):
        return params, {}

    def eval_sums(self, params, batch, rng):
        return pair_sums(*pair_scores(self.model, params, batch), batch)

    def eval_metrics(self, sums):
        return {k: float(v) for k, v in pair_metrics(sums).items()}

    # ---------------------------------------------------------------- host side: data

    def train_iterator(self, config, data_cfg, tokenizer):
        return preference.train_iterator(data_cfg, preference.preference_config(config), tokenizer)

    def eval_batches(self, config, data_cfg, tokenizer):
        # A grain dataset: each evaluation iterates it again from the start.
        return preference.eval_dataset(data_cfg, preference.preference_config(config), tokenizer)


def check_data(config, workdir: str) -> None:
    """The reward run's keys before any work: a preference JSONL source whose every line has its
    fields (`data.preference.check_lines`, no tokenizer), a validation share, a tokenizer to come
    from `init_from` or `tokenizer.path`, the prompt cut, a chat template that compiles.

    Raises:
      ValueError: one line naming the config key and the fix.
    """
    from data import chat
    from train import build

    paths = preference.check_source(build.data_config(config, workdir))
    if preference.check_lines(paths, preference.preference_config(config)) < 2:
        raise ValueError(f"config key `data.source`={config.data.source!r} holds fewer than 2 preference pairs; a "
                         "train/validation split needs at least 2")
    if not 0.0 < config.data.validation_fraction < 1.0:
        raise ValueError(f"config key `data.validation_fraction`={config.data.validation_fraction} must lie in (0, 1): "
                         "the share of the pairs held out for the accuracy")
    if not config.init_from and not config.tokenizer.path:
        raise ValueError("objective=reward scores text with a pretrained model's tokenizer: set config key "
                         "`init_from` (run:WORKDIR or hf:DIR), or `tokenizer.path` to train from scratch")
    if not 0 <= config.preference.max_prompt_len < config.data.seq_len:
        raise ValueError(f"config key `preference.max_prompt_len`={config.preference.max_prompt_len} must lie in "
                         f"[0, data.seq_len={config.data.seq_len}) (0: no cut)")
    template = config.sft.chat_template
    if template:
        try:
            chat.compile_template(chat.BUILTIN_TEMPLATES.get(template, template))
        except ValueError as e:
            raise ValueError(f"config key `sft.chat_template`: {e}; give chatml, llama3 or a valid Jinja "
                             "template") from None


def prepare_data(config, workdir: str, data_cfg):
    """The run's tokenizer, with every preference line read and tokenized once (cached for the
    iterators), so that a bad line fails in one line naming it before the model is built."""
    from train import build

    tokenizer = build.tokenizer(config, workdir, data_cfg)
    preference.splits(data_cfg, preference.preference_config(config), tokenizer)
    return tokenizer


@register("reward", check=check_data, prepare=prepare_data)
def make(config, model, tokenizer) -> RewardObjective:
    """The reward objective of a decoder with a one-output score head."""
    del tokenizer
    cfg = getattr(model, "config", None)
    if config.model.family == "bert" or getattr(cfg, "head", None) != "score":
        raise ValueError(f"config key `objective`='reward' trains a decoder under a score head, got a "
                         f"{type(model).__name__}{'' if cfg is None else ' with head=' + repr(getattr(cfg, 'head', None))}"
                         "; use a decoder family (gpt, llama, qwen, ...) or init_from of a causal LM / reward model")
    if cfg.num_scores != 1:
        raise ValueError(f"objective=reward needs one score per sequence; the model's score head has "
                         f"{cfg.num_scores} (num_labels of its checkpoint)")
    return RewardObjective(model)
