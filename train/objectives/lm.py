"""The next-token objective (`objective=lm`, the decoder families' default): pretraining.

Axis letters: B batch, T length, V vocabulary.

The loss is the token cross-entropy (+ z-loss, with label smoothing) on `targets` over the
tokens `loss_mask` counts. To it the objective adds what the model sows into `intermediates`:
  * MoE layers' `router_stats`: their weighted auxiliary losses (`moe_aux_loss`); the
    routing statistics are reported, and with `bias_update_rate > 0` the experts'
    correction biases move towards balanced loads after the update (`after_update`,
    `models.layers.moe.update_correction_bias`, DeepSeek-V3);
  * `mtp_logits` (multi-token prediction, `model.config.mtp_depth > 0`):
    `mtp_loss_weight` times the mean over depths of their cross-entropy (`mtp_loss`).

With `loss_chunk_size` C > 0 (config key `model.loss_chunk_size`) the model returns its final
normed hidden states and its LM head (`GPT(return_hidden=True)`), and the cross-entropy (the
multi-token terms' too, from `mtp_hidden`) applies the head C positions at a time
(`train.losses.chunked_cross_entropy`): the same loss without ever holding [B, T, V] logits.

Accumulation (`train.objectives.base`): each micro-batch's loss is sum(token losses) / (tokens
in the whole batch), so an accumulated step is the same update as one step on the whole batch
whatever the padding in each micro-batch; the multi-token terms are normalised by the whole
batch's counts alike. The MoE losses are per micro-batch (a layer's balance over the tokens it
routed together), each counting 1 / A.

The data are `data.pipeline`'s packed documents; the evaluation reports the loss in bits per
byte of exactly the validation text it covers, beside xz on the same text, and samples.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from data import pipeline
from models.layers import moe as moe_lib
from train import losses
from train.objectives import register

LM_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def token_batch_spec(batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
    """A packed token batch: inputs, targets, segment_ids, positions, loss_mask, [B, T] int32."""
    return {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32) for k in LM_KEYS}


def _sows_losses(model: nn.Module) -> bool:
    """Whether the model sows losses the objective adds (MoE router statistics, MTP logits). Only
    then is `intermediates` made mutable: it also makes attention return its weights."""
    config = model.config
    return getattr(config, "mtp_depth", 0) > 0 or getattr(getattr(config, "block", None), "moe", None) is not None


def routing_metrics(router_stats: Mapping) -> dict[str, jax.Array]:
    """Mean dropped fraction over the MoE layers, and the most and least loaded expert of any
    layer as a multiple of its layer's mean load (1 and 1 when perfectly balanced)."""
    per_layer = []

    def visit(node):
        for key, value in node.items():
            if key == "router_stats":
                per_layer.extend(value)
            else:
                visit(value)

    visit(router_stats)
    tokens_LE = jnp.concatenate([jnp.reshape(s["tokens_per_expert"], (-1, s["tokens_per_expert"].shape[-1]))
                                 for s in per_layer])
    load_LE = tokens_LE / jnp.maximum(jnp.mean(tokens_LE, -1, keepdims=True), 1e-9)
    dropped = jnp.concatenate([jnp.ravel(s["dropped_fraction"]) for s in per_layer])
    return {"moe_dropped_fraction": jnp.mean(dropped), "moe_load_max": jnp.max(load_LE),
            "moe_load_min": jnp.min(load_LE)}


def token_loss(chunk_size: int, head=None):
    """The per-token loss of `train.losses` the model's output goes to: `cross_entropy` on
    logits, or (chunk_size > 0) `chunked_cross_entropy` on hidden states through `head`."""
    if not chunk_size:
        return losses.cross_entropy

    def chunked(hidden_BTD, targets_BT, **kw):
        return losses.chunked_cross_entropy(hidden_BTD, head, targets_BT, chunk_size=chunk_size, **kw)

    return chunked


def apply_for_loss(model: nn.Module, params, inputs, chunk_size: int = 0, **kw):
    """(model output, per-token loss of it): logits and `cross_entropy`, or (chunk_size > 0)
    the final hidden states and `chunked_cross_entropy` through the model's head. With
    `mutable` in `kw` the output is (output, variables) as `apply` gives it."""
    if not chunk_size:
        return model.apply({"params": params}, inputs, **kw), token_loss(0)
    out = model.apply({"params": params}, inputs, return_hidden=True, **kw)
    (hidden_BTD, head), rest = (out[0], out[1:]) if "mutable" in kw else (out, ())
    return (hidden_BTD, *rest) if rest else hidden_BTD, token_loss(chunk_size, head)


def token_eval_sums(model: nn.Module, params, batch: dict[str, jax.Array], chunk_size: int = 0
                    ) -> dict[str, jax.Array]:
    """Summed NLL (nats, no z-loss or smoothing), correct argmax predictions and counted tokens
    (chunk_size > 0: the loss applies the head that many positions at a time)."""
    out, loss_fn = apply_for_loss(model, params, batch["inputs"], chunk_size, positions=batch["positions"],
                                  segment_ids=batch["segment_ids"], deterministic=True)
    _, aux = loss_fn(out, batch["targets"], mask_BT=batch["loss_mask"])
    num_tokens = aux["num_tokens"].astype(jnp.float32)
    return {"nll_sum": jnp.sum(aux["per_token"]), "num_tokens": num_tokens, "correct_sum": aux["accuracy"] * num_tokens}


def token_eval_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Mean loss and accuracy per counted token."""
    count = max(sums["num_tokens"], 1.0)
    return {"loss": sums["nll_sum"] / count, "accuracy": sums["correct_sum"] / count}


def token_totals(batch: dict[str, jax.Array], mtp_depth: int = 0) -> dict[str, jax.Array]:
    """The whole batch's counted tokens (at least 1), and with multi-token prediction each depth's."""
    totals = {"num_tokens": jnp.maximum(jnp.sum(batch["loss_mask"] > 0), 1).astype(jnp.float32)}
    if mtp_depth:
        totals["mtp_tokens"] = losses.multi_token_prediction_counts(batch["loss_mask"], batch["segment_ids"],
                                                                    mtp_depth)
    return totals


@dataclasses.dataclass(frozen=True)
class LMObjective:
    """Next-token prediction of a decoder (see the module docstring).

    Attributes:
      model: the decoder (models/gpt.py).
      z_loss: coefficient of the z-loss.
      label_smoothing: eps of the label smoothing.
      mtp_loss_weight: weight of the multi-token prediction loss, if the model sows one.
      bias_update_rate: step of the MoE correction biases after the update (0: none).
      loss_chunk_size: C > 0: the loss applies the LM head C positions at a time (module
        docstring); 0: on the model's whole logits.
    """

    model: nn.Module
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    mtp_loss_weight: float = 0.0
    bias_update_rate: float = 0.0
    loss_chunk_size: int = 0
    name: str = "lm"
    token_nll: ClassVar[bool] = True  # the logged metrics add exp(loss) (`train.objectives.base`)

    def batch_spec(self, batch_size: int, seq_len: int) -> dict[str, jax.ShapeDtypeStruct]:
        return token_batch_spec(batch_size, seq_len)

    def prepare(self, batch, rng):
        return batch

    def totals(self, batch):
        return token_totals(batch, getattr(self.model.config, "mtp_depth", 0))

    def loss(self, params, batch, rng, totals):
        """(share of the whole batch's loss, (stats, router statistics)) of a micro-batch."""
        model = self.model
        kw = {"positions": batch["positions"], "segment_ids": batch["segment_ids"], "deterministic": False,
              "rngs": {"dropout": rng}}
        chunk = self.loss_chunk_size
        if _sows_losses(model):
            (out, variables), loss_fn = apply_for_loss(model, params, batch["inputs"], chunk,
                                                       mutable=["intermediates"], **kw)
            intermediates = variables.get("intermediates", {})
        else:
            (out, loss_fn), intermediates = apply_for_loss(model, params, batch["inputs"], chunk, **kw), {}
        _, aux = loss_fn(out, batch["targets"], mask_BT=batch["loss_mask"], label_smoothing=self.label_smoothing,
                         z_loss=self.z_loss)
        share = aux["num_tokens"] / totals["num_tokens"]
        stats = {"loss": aux["cross_entropy"] * share, "z_loss": aux["z_loss"] * share,
                 "accuracy": aux["accuracy"] * share,
                 "num_tokens": jnp.sum(batch["loss_mask"] > 0).astype(jnp.float32)}
        # per_token holds cross-entropy + z-loss, zero on masked tokens.
        loss = jnp.sum(aux["per_token"]) / totals["num_tokens"]
        router = moe_lib.router_stats_tree(intermediates)
        if router:
            # The accumulation count is the number of micro-batches the totals were split over.
            stats["moe_aux_loss"] = moe_lib.total_aux_loss(router) / totals["micro_batches"]
            loss += stats["moe_aux_loss"]
        mtp_key = "mtp_hidden" if chunk else "mtp_logits"
        if mtp_key in intermediates:
            stats["mtp_loss"], _ = losses.multi_token_prediction_loss(
                jax.tree_util.tree_leaves(intermediates[mtp_key]), batch["targets"], batch["loss_mask"],
                batch["segment_ids"], num_tokens=totals.get("mtp_tokens"), token_loss=loss_fn)
            loss += self.mtp_loss_weight * stats["mtp_loss"]
        return loss, (stats, router)

    def after_update(self, params, aux, accum_steps):
        """The MoE correction-bias step from the step's mean loads, and the routing metrics."""
        if not aux:
            return params, {}
        router = jax.tree_util.tree_map(lambda x: x / accum_steps, aux) if accum_steps > 1 else aux
        if self.bias_update_rate:
            params = moe_lib.update_correction_bias(params, router, self.bias_update_rate)
        return params, routing_metrics(router)

    def eval_sums(self, params, batch, rng):
        return token_eval_sums(self.model, params, batch, self.loss_chunk_size)

    def eval_metrics(self, sums):
        return token_eval_metrics(sums)

    # ---------------------------------------------------------------- host side: data, report

    def train_iterator(self, config, data_cfg: pipeline.DataConfig, tokenizer) -> Iterator[dict]:
        return pipeline.train_iterator(data_cfg, tokenizer)

    def eval_batches(self, config, data_cfg: pipeline.DataConfig, tokenizer) -> ValidationText:
        # The text eval.max_batches covers, so that bits per byte and xz measure exactly it;
        # streamed: each evaluation reads and tokenizes it again, nothing is held in between.
        documents = pipeline.eval_documents(data_cfg, tokenizer, config.eval.max_batches)
        return ValidationText(pipeline.eval_dataset(data_cfg, tokenizer, documents=documents), documents, data_cfg)

    def report(self, run, params_fn, sums, metrics, eval_data) -> tuple[dict[str, Any], str]:
        """Bits per byte of the evaluated text beside xz on the same text, and samples (the lead
        samples from the whole parameters `params_fn()` gives every process)."""
        from train.samples import sample_continuations  # the trainer's host side only
        from train.trainer import xz_bits_per_byte

        config = run.config
        raw = pipeline.validation_text(eval_data.data_cfg, eval_data.documents)
        extra = {"val_tokens": int(sums["num_tokens"]), "val_documents": len(raw.documents),
                 "val_bytes": raw.num_bytes, "val_bits_per_byte": sums["nll_sum"] / math.log(2) / raw.num_bytes,
                 "xz_bits_per_byte": xz_bits_per_byte(raw.documents, raw.num_bytes)}
        params = params_fn()
        if run.is_lead:  # a small local computation: the lead prints and saves the samples
            extra["samples"] = sample_continuations(
                self.model, params, run.tokenizer, config.eval.prompt, num_samples=config.eval.num_samples,
                num_tokens=config.eval.sample_tokens, temperature=config.eval.temperature,
                max_len=self.model.config.max_len, seed=config.seed)
        return extra, f"{extra['val_bits_per_byte']:.3f} bits/byte (xz -9: {extra['xz_bits_per_byte']:.3f})"


@dataclasses.dataclass(frozen=True)
class ValidationText:
    """The validation batches (re-iterable) and which text they cover (for bits per byte)."""

    dataset: Any
    documents: pipeline.EvalDocuments
    data_cfg: pipeline.DataConfig

    def __iter__(self):
        return iter(self.dataset)


@register("lm")
def make(config, model, tokenizer) -> LMObjective:
    """The lm objective of a run config: its z-loss, label smoothing, MTP weight and bias rate."""
    from models.bert import BertForMaskedLM

    if isinstance(model, BertForMaskedLM) or config.model.family == "bert":
        raise ValueError("config key `objective`='lm' (next tokens) needs a decoder, but model.family='bert'; "
                         "use objective=mlm (or leave it empty)")
    check_loss_chunking(config, model)
    return LMObjective(model, z_loss=config.optimizer.z_loss, label_smoothing=config.optimizer.label_smoothing,
                       mtp_loss_weight=config.model.mtp_loss_weight, bias_update_rate=config.model.moe.bias_update_rate,
                       loss_chunk_size=config.model.loss_chunk_size)


def check_loss_chunking(config, model) -> None:
    """`model.loss_chunk_size` > 0 applies the LM head outside the model: a GPT with an LM head,
    and no LoRA on an untied `lm_head` (its low-rank branch lives in the module)."""
    from models.gpt import GPT

    if not config.model.loss_chunk_size:
        return
    cfg = getattr(model, "config", None)
    if not isinstance(model, GPT) or cfg.head != "lm":
        raise ValueError(f"config key `model.loss_chunk_size`={config.model.loss_chunk_size} chunks a decoder's LM "
                         "head, which this model does not have; set model.loss_chunk_size=0")
    lora = cfg.block.lora
    if lora is not None and not cfg.tie_embeddings and re.search(lora.targets, "lm_head"):
        raise ValueError(f"config key `model.loss_chunk_size`={config.model.loss_chunk_size} applies the LM head "
                         f"outside the model, but finetune.lora.targets={lora.targets!r} puts LoRA on the untied "
                         "lm_head; exclude lm_head from the targets or set model.loss_chunk_size=0")
