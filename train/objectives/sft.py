"""Supervised fine-tuning (`objective=sft`): the lm objective's loss on chat rows.

The loss, its accumulation and its evaluation are the lm objective's (`train.objectives.lm`):
token cross-entropy over the tokens `loss_mask` counts, which `data.sft` sets to exactly the
assistant's tokens (rendered with the chat template, `data.chat`), on rows that pack whole
conversations with segment ids. What differs is the data:

    config.data.source = files:PATH.jsonl  ({"messages": [...]} or {"prompt", "completion"} lines)
                       | pydoc_chat        (lmlab's chat data, written under data.data_dir)
    config.sft.chat_template  "" (the tokenizer's, else ChatML) | chatml | llama3 | a Jinja string
    config.sft.packing        none | greedy | bfd  (config.sft.pack_window conversations at a time)

and the report: the validation loss per assistant token, and the padding share of the
training rows under each packing strategy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from data import pipeline
from data import sft as sft_data
from train.objectives import register
from train.objectives.lm import LMObjective


def sft_config(config) -> sft_data.SFTConfig:
    """The `sft.*` keys of a run config as a `data.sft.SFTConfig`."""
    return sft_data.SFTConfig(template=config.sft.chat_template, packing=config.sft.packing,
                              pack_window=config.sft.pack_window)


@dataclasses.dataclass(frozen=True)
class SFTObjective(LMObjective):
    """The lm objective's loss on `data.sft` rows (see the module docstring).

    Attributes:
      sft: the chat template and packing of the data.
    """

    name: str = "sft"
    sft: sft_data.SFTConfig = dataclasses.field(default_factory=sft_data.SFTConfig)

    def train_iterator(self, config, data_cfg: pipeline.DataConfig, tokenizer) -> Iterator[dict]:
        return sft_data.train_iterator(data_cfg, self.sft, tokenizer)

    def eval_batches(self, config, data_cfg: pipeline.DataConfig, tokenizer):
        # A grain dataset: each evaluation iterates it again from the start.
        return sft_data.eval_dataset(data_cfg, self.sft, tokenizer)

    def report(self, run, params_fn, sums, metrics, eval_data) -> tuple[dict[str, Any], str]:
        """The validation tokens and the padding share of each packing strategy."""
        del params_fn, eval_data
        padding = sft_data.padding_fractions(run.data, self.sft, run.tokenizer)
        extra = {"val_tokens": int(sums["num_tokens"]), "padding_fraction": padding}
        return extra, (f"{metrics['loss']:.3f} nats per assistant token; padding {padding[self.sft.packing]:.1%} "
                       f"({self.sft.packing}; " + ", ".join(f"{k} {v:.1%}" for k, v in padding.items()) + ")")


@register("sft")
def make(config, model, tokenizer) -> SFTObjective:
    """The sft objective of a run config: the lm's loss settings and the `sft.*` keys."""
    del tokenizer
    if config.model.family == "bert":
        raise ValueError("config key `objective`='sft' fine-tunes a decoder, but model.family='bert'; use a decoder "
                         "family (gpt, llama, qwen, ...)")
    return SFTObjective(model, z_loss=config.optimizer.z_loss, label_smoothing=config.optimizer.label_smoothing,
                        mtp_loss_weight=config.model.mtp_loss_weight,
                        bias_update_rate=config.model.moe.bias_update_rate, sft=sft_config(config))
