"""The masked-LM objective (`objective=mlm`, bert's default; Devlin et al. 2018).

`prepare` corrupts the whole packed batch with `train.mlm.mask_batch`, drawn from the step's
rng folded with `MLM_RNG_SALT` (so every epoch sees fresh masks), before it is split into
micro-batches; the loss is then the token cross-entropy of the original ids at the chosen
positions (the lm objective's loss, BertForMaskedLM sows nothing). The evaluation masks batch
i with `key(i)`, so every evaluation scores the same positions; it reports the masked-token
loss and accuracy (no bits per byte, xz baseline or samples: an encoder does not generate).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from train import mlm as mlm_lib
from train.objectives import lm, register

# Folded into the step's rng for the masked-LM choice (dropout uses the step's rng itself,
# and its micro-batches fold in 0..A-1).
MLM_RNG_SALT = 0x4D4C4D


@dataclasses.dataclass(frozen=True)
class MLMObjective(lm.LMObjective):
    """lm's loss on the positions `mlm` corrupts (see the module docstring).

    Attributes:
      mlm: the corruption (mask token, vocabulary, probabilities).
      The others: `train.objectives.lm.LMObjective`'s.
    """

    mlm: mlm_lib.MLMConfig | None = None
    name: str = "mlm"

    def prepare(self, batch, rng):
        return mlm_lib.mask_batch(jax.random.fold_in(rng, MLM_RNG_SALT), batch, self.mlm)

    def after_update(self, params, aux, accum_steps):
        return params, {}

    def eval_sums(self, params, batch, rng):
        return lm.token_eval_sums(self.model, params, mlm_lib.mask_batch(rng, batch, self.mlm))

    def eval_batches(self, config, data_cfg, tokenizer):
        from data import pipeline

        return pipeline.eval_dataset(data_cfg, tokenizer,
                                     documents=pipeline.eval_documents(data_cfg, tokenizer, config.eval.max_batches))

    def report(self, run, params_fn, sums, metrics, eval_data) -> tuple[dict[str, Any], str]:
        if run.is_lead:
            print("no samples: a masked LM (model.family=bert) does not generate text", flush=True)
        return {"val_tokens": int(sums["num_tokens"])}, f"masked-token accuracy {metrics['accuracy']:.1%}"


@register("mlm")
def make(config, model, tokenizer) -> MLMObjective:
    """The masked LM of BERT: its mask token from the tokenizer, the z-loss and label smoothing
    of the run config. Without a tokenizer (`train.validate` before the BPE is trained, the
    sharding plans) the last id stands in for the mask token: the compiled program is the same
    whatever the id, only a run needs the tokenizer's."""
    from models.bert import BertForMaskedLM

    if not isinstance(model, BertForMaskedLM):
        raise ValueError(f"config key `objective`='mlm' (masked LM) needs model.family='bert', got "
                         f"{config.model.family!r}; use objective=lm (or leave it empty)")
    from train import build

    return MLMObjective(model, z_loss=config.optimizer.z_loss, label_smoothing=config.optimizer.label_smoothing,
                        mlm=build.mlm(config, tokenizer) if tokenizer is not None else
                        mlm_lib.MLMConfig(mask_id=model.config.vocab_size - 1, vocab_size=model.config.vocab_size))
