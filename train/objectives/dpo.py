"""Offline preference optimization (`objective=dpo`): DPO, conservative DPO, IPO, SimPO, ORPO, KTO.

    config.data.source = files:PATH.jsonl   (data.preference: {prompt, chosen, rejected} pairs, or
                                             {prompt, completion, label} rows for kto)
    config.dpo.loss    = sigmoid | ipo | simpo | orpo | kto      (train/preference_losses.py)
    config.dpo.precompute_reference = True (the reference's log-probs once per split) | False
    config.reference   = "" (the starting weights) | hf:DIR | run:WORKDIR[@STEP]

    python -m train --config=configs/gpt.py:tiny --config.objective=dpo \\
        --config.init_from=run:SFT_WORKDIR --config.data.source=files:pairs.jsonl --workdir=/tmp/dpo

The loss of a batch is the mean over its rows of the method's per-row loss (ORPO adds the NLL
of the chosen responses per token), on the policy's summed log-probs of each response
(`train.logprobs`; SimPO and ORPO on their per-token means). Dropout is off, as in TRL
(`disable_dropout`). sigmoid, ipo and kto compare with the frozen reference
(`train.preference_reference`: precomputed or on the fly, sharded like the policy; under LoRA
the base with the adapters at init); simpo and orpo build none. KTO's reference point is
the clamped mean log-ratio of the batch's mismatched (prompt, completion) rows (TRL's KL
estimate), taken per micro-batch as TRL takes it per device batch.

Metrics (metrics.jsonl, and the validation's in the summary), as TRL names them with `_`
for `/`: `rewards_chosen`, `rewards_rejected`, `rewards_margins`, `rewards_accuracies`
(not for kto, as in TRL), `logps_chosen`, `logps_rejected`; orpo adds `nll_loss`,
`log_odds_ratio`, `log_odds_chosen`; kto `kl`. The run is evaluated on the held-out rows
before its first step and at its end (`eval_before`, `eval_after` in summary.json).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from data import pipeline, preference
from sharding import rules as rules_lib
from train import logprobs as logprobs_lib
from train import preference_losses as losses
from train.objectives import register

PAIRED_COUNTS = ("rows", "chosen_tokens")
UNPAIRED_COUNTS = ("rows", "desirable", "undesirable", "batches")
# Which count each kto metric is a mean over (the rest: rows).
KTO_MEANS = {"rewards_chosen": "desirable", "logps_chosen": "desirable", "rewards_rejected": "undesirable",
             "logps_rejected": "undesirable", "kl": "batches"}


@dataclasses.dataclass(frozen=True)
class DPOObjective:
    """Preference optimization of a decoder (see the module docstring).

    Attributes:
      model: the decoder (its lm head).
      loss_type: one of `train.preference_losses.LOSSES`.
      beta, label_smoothing, simpo_gamma, desirable_weight, undesirable_weight: the losses' settings.
      precompute_reference: the reference's log-probs once per split (else per batch).
      options: how preference lines become rows.
    """

    model: nn.Module
    loss_type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    precompute_reference: bool = True
    options: preference.PreferenceConfig = dataclasses.field(default_factory=preference.PreferenceConfig)
    name: str = "dpo"
    # The run's reference log-probs (`train.preference_reference.ReferenceLogps`), made on first use.
    cache: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def unpaired(self) -> bool:
        return self.loss_type == "kto"

    @property
    def uses_reference(self) -> bool:
        return self.loss_type not in losses.REFERENCE_FREE

    def batch_spec(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        """data.preference's rows (+ the reference's [B] log-probs for the methods that use one)."""
        from train import preference_reference

        keys = preference.UNPAIRED_KEYS if self.unpaired else preference.PAIRED_KEYS
        spec = {k: jax.ShapeDtypeStruct((batch_size, seq_len) if k.endswith(("ids", "mask")) else (batch_size,),
                                        jnp.float32 if k == "margin" else jnp.int32) for k in keys}
        if self.uses_reference:
            spec.update({k: jax.ShapeDtypeStruct((batch_size,), jnp.float32)
                         for k in preference_reference.output_keys(self.unpaired)})
        return spec

    def prepare(self, batch, rng):
        return batch

    def tokens_per_step(self, batch_size: int, seq_len: int) -> int:
        """Paired rows are two sequences each (KTO's: the row and its KL row)."""
        return 2 * batch_size * seq_len

    def totals(self, batch) -> dict[str, jax.Array]:
        """The whole batch's counts (each at least 1): rows; chosen tokens (orpo's NLL); kto's
        desirable and undesirable rows."""
        return {k: jnp.maximum(v, 1.0) for k, v in _counts(batch, self.unpaired).items() if k != "batches"}

    # ------------------------------------------------------------------ the policy's terms

    def _logps(self, params, ids_BT, mask_BT) -> tuple[jax.Array, jax.Array]:
        """(summed log-probs [B], scored tokens [B]) of each row under the policy."""
        token_logps_BT, _ = logprobs_lib.of_model(self.model, params, ids_BT)
        return logprobs_lib.sequence_logprobs(token_logps_BT, mask_BT), jnp.sum(mask_BT, -1).astype(jnp.float32)

    def _paired_rows(self, params, batch) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """(per-row values [B], sums) of a paired batch: the loss and what TRL reports."""
        chosen, chosen_n = self._logps(params, batch["chosen_ids"], batch["chosen_mask"])
        rejected, rejected_n = self._logps(params, batch["rejected_ids"], batch["rejected_mask"])
        rows, sums, beta = {}, {}, self.beta
        if self.loss_type in losses.LENGTH_NORMALIZED:
            sums["nll_loss"] = -jnp.sum(chosen * (batch["chosen_len"] > 0))
            chosen, rejected = chosen / jnp.maximum(chosen_n, 1.0), rejected / jnp.maximum(rejected_n, 1.0)
            rewards_chosen, rewards_rejected = beta * chosen, beta * rejected
            if self.loss_type == "simpo":
                rows["loss"] = losses.simpo(chosen, rejected, beta=beta, gamma=self.simpo_gamma,
                                            label_smoothing=self.label_smoothing)
                del sums["nll_loss"]
            else:
                log_odds = losses.orpo_log_odds(chosen, rejected)
                ratio = jax.nn.log_sigmoid(log_odds)
                rows.update(odds_ratio_loss=-beta * ratio, log_odds_ratio=ratio, log_odds_chosen=log_odds)
        else:
            chosen_ratio = chosen - batch["ref_chosen_logps"]
            rejected_ratio = rejected - batch["ref_rejected_logps"]
            rewards_chosen, rewards_rejected = beta * chosen_ratio, beta * rejected_ratio
            rows["loss"] = (losses.ipo(chosen_ratio, rejected_ratio, chosen_n, rejected_n, beta=beta)
                            if self.loss_type == "ipo" else
                            losses.dpo_sigmoid(chosen_ratio, rejected_ratio, beta=beta,
                                               label_smoothing=self.label_smoothing))
        rows.update(rewards_chosen=rewards_chosen, rewards_rejected=rewards_rejected,
                    rewards_margins=rewards_chosen - rewards_rejected,
                    rewards_accuracies=(rewards_chosen > rewards_rejected).astype(jnp.float32),
                    logps_chosen=chosen, logps_rejected=rejected)
        return rows, sums

    def _unpaired_rows(self, params, batch) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """(per-row values [B], the batch's KL estimate) of a kto batch."""
        logps, _ = self._logps(params, batch["ids"], batch["mask"])
        kl_logps, _ = self._logps(params, batch["kl_ids"], batch["kl_mask"])
        valid = batch["len"] > 0
        kl = losses.kl_estimate(jax.lax.stop_gradient(kl_logps) - batch["ref_kl_logps"], valid)
        logratios = logps - batch["ref_logps"]
        loss = losses.kto(logratios, batch["label"], kl, beta=self.beta, desirable_weight=self.desirable_weight,
                          undesirable_weight=self.undesirable_weight)
        desirable = batch["label"].astype(jnp.float32)
        rows = {"loss": loss, "rewards_chosen": self.beta * logratios * desirable,
                "rewards_rejected": self.beta * logratios * (1.0 - desirable),
                "logps_chosen": logps * desirable, "logps_rejected": logps * (1.0 - desirable)}
        return rows, {"kl": kl}

    def _sums(self, params, batch) -> dict[str, jax.Array]:
        """Every metric summed over the batch's valid rows (kto's kl: the batch's estimate)."""
        rows, sums = (self._unpaired_rows if self.unpaired else self._paired_rows)(params, batch)
        valid = ((batch["len"] if self.unpaired else batch["chosen_len"]) > 0).astype(jnp.float32)
        return {**{k: jnp.sum(v * valid) for k, v in rows.items()}, **sums}

    # ------------------------------------------------------------------ loss and evaluation

    def loss(self, params, batch, rng, totals):
        """(share of the whole batch's loss, (stats, None)) of a micro-batch."""
        del rng
        sums = self._sums(params, batch)
        means = dict(KTO_MEANS, kl="micro_batches") if self.unpaired else {"nll_loss": "chosen_tokens"}
        stats = {k: v / totals[means.get(k, "rows")] for k, v in sums.items()}
        if self.loss_type == "orpo":
            stats["loss"] = stats["nll_loss"] + stats["odds_ratio_loss"]
        if self.unpaired:
            stats["rewards_margins"] = stats["rewards_chosen"] - stats["rewards_rejected"]
        return stats["loss"], (stats, None)

    def after_update(self, params, aux, accum_steps):
        return params, {}

    def eval_sums(self, params, batch, rng):
        del rng
        return {**self._sums(params, batch), **_counts(batch, self.unpaired)}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """Each metric's mean over its rows (the same means as the training metrics)."""
        counts = UNPAIRED_COUNTS if self.unpaired else PAIRED_COUNTS
        means = KTO_MEANS if self.unpaired else {"nll_loss": "chosen_tokens"}
        out = {k: v / max(sums[means.get(k, "rows")], 1.0) for k, v in sums.items() if k not in counts}
        if self.loss_type == "orpo":
            out["loss"] = out["nll_loss"] + out["odds_ratio_loss"]
        if self.unpaired:
            out["rewards_margins"] = out["rewards_chosen"] - out["rewards_rejected"]
        return out

    # ------------------------------------------------------------------ host side: data, reference

    def train_iterator(self, config, data_cfg: pipeline.DataConfig, tokenizer):
        return preference.train_iterator(data_cfg, self.options, tokenizer)

    def eval_batches(self, config, data_cfg: pipeline.DataConfig, tokenizer):
        # A grain dataset: each evaluation iterates it again from the start.
        return preference.eval_dataset(data_cfg, self.options, tokenizer)

    def _reference(self, run):
        from train import preference_reference

        if "reference" not in self.cache:
            self.cache["reference"] = preference_reference.ReferenceLogps(
                run, self.options, precompute=self.precompute_reference)
        return self.cache["reference"]

    def _place(self, run, rows, split: str, state_fn) -> dict[str, jax.Array]:
        if not self.uses_reference:
            return rules_lib.device_put_batch(rows, run.batch_sharding)
        return self._reference(run).attach(rows, split, state_fn)

    def batches(self, run, train_iter, state_fn):
        """The training batches with the reference's log-probs (`train.preference_reference`)."""
        for rows in train_iter:
            yield self._place(run, rows, "train", state_fn), True

    def evaluate_run(self, run, state, eval_batches) -> tuple[dict[str, float], dict[str, float]]:
        """`eval_sums` over the validation batches (eval.max_batches of them), each with the
        reference's log-probs."""
        sums: dict[str, float] = {}
        for i, rows in enumerate(eval_batches):
            if run.config.eval.max_batches and i >= run.config.eval.max_batches:
                break
            batch = self._place(run, rows, "validation", lambda: state)
            for key, value in run.eval_fn(state.params, state.frozen, batch, jax.random.key(i)).items():
                sums[key] = sums.get(key, 0.0) + float(value)
        return sums, self.eval_metrics(sums)


def _counts(batch, unpaired: bool) -> dict[str, jax.Array]:
    """Valid rows (a padding row has length 0), chosen tokens; kto: desirable and undesirable rows, 1 batch."""
    if unpaired:
        valid = (batch["len"] > 0).astype(jnp.float32)
        desirable = jnp.sum(valid * batch["label"])
        return {"rows": jnp.sum(valid), "desirable": desirable, "undesirable": jnp.sum(valid) - desirable,
                "batches": jnp.ones((), jnp.float32)}
    valid = (batch["chosen_len"] > 0).astype(jnp.float32)
    return {"rows": jnp.sum(valid), "chosen_tokens": jnp.sum(batch["chosen_mask"] * valid[:, None]).astype(jnp.float32)}


# ------------------------------------------------------------------------------ config


def check_config(config, workdir: str) -> None:
    """The dpo keys before any work: the loss and its settings, the preference files and every
    line's fields (`data.preference.check_lines`, no tokenizer), a validation share, a starting
    checkpoint or tokenizer, the template, and `reference`'s architecture
    (`train.preference_reference.check_architecture`).

    Raises:
      ValueError: one line naming the config key and the fix.
    """
    from train import build, preference_reference

    d = config.dpo
    if d.loss not in losses.LOSSES:
        raise ValueError(f"config key `dpo.loss`={d.loss!r}; expected one of {losses.LOSSES}")
    for key, value, ok, want in (
            ("beta", d.beta, d.beta > 0, "> 0"), ("simpo_gamma", d.simpo_gamma, d.simpo_gamma >= 0, ">= 0"),
            ("label_smoothing", d.label_smoothing, 0 <= d.label_smoothing < 0.5, "in [0, 0.5)"),
            ("kto_desirable_weight", d.kto_desirable_weight, d.kto_desirable_weight > 0, "> 0"),
            ("kto_undesirable_weight", d.kto_undesirable_weight, d.kto_undesirable_weight > 0, "> 0")):
        if not ok:
            raise ValueError(f"config key `dpo.{key}`={value} must be {want}")
    if d.label_smoothing and d.loss not in ("sigmoid", "simpo"):
        raise ValueError(f"config key `dpo.label_smoothing`={d.label_smoothing} applies to dpo.loss=sigmoid "
                         f"(conservative DPO) or simpo, not {d.loss!r}; set it to 0")
    if config.reference and d.loss in losses.REFERENCE_FREE:
        raise ValueError(f"config key `reference`={config.reference!r} is set but dpo.loss={d.loss!r} uses no "
                         "reference model; leave it empty")
    if config.model.family == "bert":
        raise ValueError("config key `objective`='dpo' trains a decoder, but model.family='bert'; use a decoder family")
    preference.check_run(config, build.data_config(config, workdir), objective="dpo", unpaired=d.loss == "kto")
    preference_reference.check_architecture(config, workdir)


def prepare_data(config, workdir: str, data_cfg: pipeline.DataConfig):
    """The run's tokenizer (`init_from`'s or `tokenizer.path`); every process reads the
    preference files itself (nothing shared is written)."""
    from train import build

    return build.tokenizer(config, workdir, data_cfg)


@register("dpo", check=check_config, prepare=prepare_data)
def make(config, model, tokenizer) -> DPOObjective:
    """The dpo objective of a run config (`dpo.*`, `preference.*`, `sft.chat_template`)."""
    del tokenizer
    d = config.dpo
    if d.loss not in losses.LOSSES:
        raise ValueError(f"config key `dpo.loss`={d.loss!r}; expected one of {losses.LOSSES}")
    return DPOObjective(model, loss_type=d.loss, beta=d.beta, label_smoothing=d.label_smoothing,
                        simpo_gamma=d.simpo_gamma, desirable_weight=d.kto_desirable_weight,
                        undesirable_weight=d.kto_undesirable_weight, precompute_reference=d.precompute_reference,
                        options=preference.preference_config(config, unpaired=d.loss == "kto"))

