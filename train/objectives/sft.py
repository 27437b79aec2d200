"""Supervised fine-tuning (`objective=sft`): the lm objective's loss on chat rows.

The loss, its accumulation and its evaluation are the lm objective's (`train.objectives.lm`):
token cross-entropy over the tokens `loss_mask` counts, which `data.sft` sets to exactly the
assistant's tokens (rendered with the chat template, `data.chat`), on rows that pack whole
conversations with segment ids. What differs is the data:

    config.data.source = files:PATH.jsonl  ({"messages": [...]} or {"prompt", "completion"} lines)
                       | pydoc_chat        (lmlab's chat data, written under data.data_dir)
    config.sft.chat_template  "" (the tokenizer's, else ChatML) | chatml | llama3 | a Jinja string
    config.sft.packing        none | greedy | bfd  (config.sft.pack_window conversations at a time)

The tokenizer is the starting checkpoint's (`init_from`) or `tokenizer.path`: never one trained
on the chat text. Before the run, `check_data` (from `train.validate`) checks the source and
these keys; `prepare_data` (from the trainer, the lead process first) writes `pydoc_chat`'s
JSONL where every process then reads it.

The report: the validation loss per assistant token, the padding share of the training rows
under each packing strategy, and `eval.num_samples` replies to `eval.prompt` as a user turn
(rendered with the generation prompt, cut at the template's end of turn; temperature 0:
greedy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from data import chat, pipeline
from data import sft as sft_data
from train.objectives import register
from train.objectives.lm import LMObjective, check_loss_chunking


def sft_config(config) -> sft_data.SFTConfig:
    """The `sft.*` keys of a run config as a `data.sft.SFTConfig`."""
    return sft_data.SFTConfig(template=config.sft.chat_template, packing=config.sft.packing,
                              pack_window=config.sft.pack_window)


def check_data(config, workdir: str) -> None:
    """The sft keys before any work: the source's form and files, a validation share, a
    tokenizer to come from `init_from` or `tokenizer.path`, packing and template.

    Raises:
      ValueError: one line naming the config key and the fix.
    """
    from train import build

    sft_data.check_source(build.data_config(config, workdir))
    if not 0.0 < config.data.validation_fraction < 1.0:
        raise ValueError(f"config key `data.validation_fraction`={config.data.validation_fraction} must lie in (0, 1): "
                         "the share of the conversations held out for validation")
    if not config.init_from and not config.tokenizer.path:
        raise ValueError("objective=sft fine-tunes a pretrained model and uses its tokenizer: set config key "
                         "`init_from` (run:WORKDIR or hf:DIR), or `tokenizer.path` to train from scratch")
    chat.check_template_key(config.sft.chat_template)


def prepare_data(config, workdir: str, data_cfg: pipeline.DataConfig):
    """The run's tokenizer (`init_from`'s or `tokenizer.path`), after the lead wrote the shared
    files (`pydoc_chat`'s JSONL under data_dir). Runs under `train.distributed.lead_first`."""
    from train import build, distributed

    if distributed.is_lead():
        sft_data.source_paths(data_cfg)
    elif data_cfg.source == "pydoc_chat":
        distributed.shared_workdir_check(sft_data.pydoc_chat_path(data_cfg))
    return build.tokenizer(config, workdir, data_cfg)


def chat_replies(model, params, tokenizer, prompt: str, *, template: str = "", num_samples: int = 1,
                 num_tokens: int = 48, temperature: float = 0.0, max_len: int, seed: int = 0) -> list[str]:
    """Replies to `prompt` as one user turn, rendered with the assistant's generation prompt,
    each cut at the template's end of turn (`data.sft.end_of_turn`) or the EOS token.

    Args:
      model, params: the decoder and its whole parameters.
      tokenizer: the run's tokenizer.
      prompt: the user's message.
      template: the run's `sft.chat_template` ("" as `data.sft` resolves it).
      num_samples, num_tokens, temperature, max_len, seed: as `train.samples.sample_ids`.

    Returns:
      The reply texts.
    """
    from train.samples import sample_ids

    template = sft_data.chat_template(tokenizer, template)
    ids, _ = chat.render(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True,
                         template=template)
    stop = sft_data.end_of_turn(tokenizer, template)
    replies = []
    for row in sample_ids(model, params, ids, num_samples=num_samples, num_tokens=num_tokens,
                          temperature=temperature, max_len=max_len, seed=seed):
        row = row.tolist()
        if tokenizer.eos_id in row:
            row = row[:row.index(tokenizer.eos_id)]
        text = tokenizer.decode(row)
        replies.append(text[:text.index(stop)] if stop and stop in text else text)
    return replies


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
        """The validation tokens, the padding share of each packing strategy and replies to
        eval.prompt (the lead samples from the whole parameters `params_fn()` gives every process)."""
        del eval_data
        config = run.config
        padding = sft_data.padding_fractions(run.data, self.sft, run.tokenizer)
        extra = {"val_tokens": int(sums["num_tokens"]), "padding_fraction": padding}
        if config.eval.num_samples:
            params = params_fn()
            if run.is_lead:
                extra["samples"] = chat_replies(
                    self.model, params, run.tokenizer, config.eval.prompt, template=self.sft.template,
                    num_samples=config.eval.num_samples, num_tokens=config.eval.sample_tokens,
                    temperature=config.eval.temperature, max_len=self.model.config.max_len, seed=config.seed)
        return extra, (f"{metrics['loss']:.3f} nats per assistant token; padding {padding[self.sft.packing]:.1%} "
                       f"({self.sft.packing}; " + ", ".join(f"{k} {v:.1%}" for k, v in padding.items()) + ")")


@register("sft", check=check_data, prepare=prepare_data)
def make(config, model, tokenizer) -> SFTObjective:
    """The sft objective of a run config: the lm's loss settings and the `sft.*` keys."""
    del tokenizer
    if config.model.family == "bert":
        raise ValueError("config key `objective`='sft' fine-tunes a decoder, but model.family='bert'; use a decoder "
                         "family (gpt, llama, qwen, ...)")
    check_loss_chunking(config, model)
    return SFTObjective(model, z_loss=config.optimizer.z_loss, label_smoothing=config.optimizer.label_smoothing,
                        mtp_loss_weight=config.model.mtp_loss_weight,
                        bias_update_rate=config.model.moe.bias_update_rate,
                        loss_chunk_size=config.model.loss_chunk_size, sft=sft_config(config))
