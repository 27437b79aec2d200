"""Sentence embeddings on lmlab's BERT with the sentence-transformers recipe of a model directory.

Axis letters: B batch (texts), T tokens, D width.

A sentence-transformers directory (all-MiniLM-L6-v2) describes its pipeline in its own files, read
here rather than assumed:
  * `modules.json`: Transformer -> Pooling (`1_Pooling/config.json`) -> optional Normalize;
  * `sentence_bert_config.json`: `max_seq_length` (texts are truncated to it, [CLS]/[SEP] included)
    and `do_lower_case`;
  * pooling: mean over the attention mask (the default), the [CLS] token, or the masked max.
A plain Hugging Face BERT directory (no modules.json) gets mean pooling and normalization, the
common recipe. Each text is stripped, becomes [CLS] + WordPiece ids + [SEP] as
sentence-transformers tokenizes it, and runs through `models.bert.BertModel` loaded by
`models.hf.load_pretrained`.

    embedder = Embedder.load("path/to/all-MiniLM-L6-v2")
    vectors = embedder.encode(["a sentence", "another one"])     # [2, 384] float32, unit rows

Batches are padded to a few length buckets (powers of two from 16 tokens, up to the maximum) and a fixed
number of rows, so the jitted encoder compiles once per bucket, not once per batch.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from models import hf
from models.bert import BertConfig, BertModel

MIN_LENGTH = 16  # token lengths are padded up to a power of two, at least this
POOLING_MODES = ("mean", "cls", "max")


def _read_json(path: Path) -> dict | list | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_recipe(directory: Path) -> dict:
    """The sentence-transformers recipe of a model directory.

    Returns:
      {"pooling": "mean" | "cls" | "max", "normalize": bool, "max_seq_length": int | None,
       "do_lower_case": bool}.
    """
    modules = _read_json(directory / "modules.json")
    recipe = {"pooling": "mean", "normalize": True, "max_seq_length": None, "do_lower_case": False}
    if modules is None:  # a plain Hugging Face BERT directory
        return recipe
    types = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    if not types or types[0] != "Transformer":
        raise ValueError(f"{directory}/modules.json starts with {types[:1]}, not a Transformer module; "
                         "give a sentence-transformers BERT directory (e.g. all-MiniLM-L6-v2)")
    unknown = [t for t in types[1:] if t not in ("Pooling", "Normalize")]
    if unknown:
        raise ValueError(f"{directory}/modules.json has modules {unknown} lmlab's Embedder does not implement "
                         "(it runs Transformer, Pooling and Normalize)")
    recipe["normalize"] = "Normalize" in types
    pooling_entry = next((m for m in modules if m.get("type", "").endswith("Pooling")), None)
    if pooling_entry is not None:
        config = _read_json(directory / pooling_entry.get("path", "1_Pooling") / "config.json") or {}
        chosen = [mode for mode in POOLING_MODES if config.get(f"pooling_mode_{mode}_tokens"
                                                                if mode != "cls" else "pooling_mode_cls_token")]
        others = [k for k, v in config.items() if k.startswith("pooling_mode_") and v
                  and k not in ("pooling_mode_mean_tokens", "pooling_mode_cls_token", "pooling_mode_max_tokens")]
        if len(chosen) != 1 or others:
            raise ValueError(f"{directory}: pooling config {config} asks for other than exactly one of "
                             f"{POOLING_MODES}; lmlab's Embedder implements those three")
        recipe["pooling"] = chosen[0]
    st_config = _read_json(directory / "sentence_bert_config.json") or {}
    recipe["max_seq_length"] = st_config.get("max_seq_length")
    recipe["do_lower_case"] = bool(st_config.get("do_lower_case", False))
    return recipe


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _embed(config: BertConfig, pooling: str, normalize: bool, params: dict, ids_BT: jax.Array,
           mask_BT: jax.Array) -> jax.Array:
    hidden_BTD, _ = BertModel(config, add_pooler=False).apply({"params": params}, ids_BT, mask_BT)
    hidden_BTD = hidden_BTD.astype(jnp.float32)
    mask_BT1 = mask_BT[:, :, None].astype(jnp.float32)
    if pooling == "mean":  # sentence-transformers: sum / clamp(count, 1e-9)
        pooled_BD = (hidden_BTD * mask_BT1).sum(1) / jnp.maximum(mask_BT1.sum(1), 1e-9)
    elif pooling == "cls":
        pooled_BD = hidden_BTD[:, 0]
    else:  # max over real tokens (padding set to -1e9, as sentence-transformers does)
        pooled_BD = jnp.where(mask_BT1 > 0, hidden_BTD, -1e9).max(1)
    if normalize:  # torch.nn.functional.normalize: x / max(||x||, 1e-12)
        pooled_BD = pooled_BD / jnp.maximum(jnp.linalg.norm(pooled_BD, axis=-1, keepdims=True), 1e-12)
    return pooled_BD


class Embedder:
    """A BERT sentence encoder: `encode(texts) -> [N, D]` float32.

    Attributes:
      name: the model directory (absolute path), recorded by indexes built with it.
      dim: the embedding width D.
      tokenizer: the WordPiece tokenizer (an lmlab `Tokenizer`; for token counts and chunking).
      max_tokens: texts are truncated to this many tokens, [CLS] and [SEP] included.
      recipe: the pooling / normalization read from the directory (`read_recipe`).
    """

    def __init__(self, name: str, config: BertConfig, params: dict, tokenizer, max_tokens: int, recipe: dict):
        self.name, self.config, self.params = name, config, params
        self.tokenizer, self.max_tokens, self.recipe = tokenizer, max_tokens, recipe
        self.dim = config.block.d_model

    @classmethod
    def load(cls, path: str | os.PathLike, *, max_tokens: int | None = None) -> Embedder:
        """Loads a sentence-transformers (or plain Hugging Face BERT) directory.

        Args:
          path: the model directory (config.json, model.safetensors, tokenizer files).
          max_tokens: truncate texts to this many tokens instead of the directory's
            `max_seq_length` (never above the model's position table).

        Returns:
          The Embedder.
        """
        from data.tokenizer import load_tokenizer

        directory = Path(os.path.realpath(os.fspath(path)))
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"embedding model {path} has no config.json; give a sentence-transformers or "
                                    "Hugging Face BERT directory (e.g. all-MiniLM-L6-v2)")
        recipe = read_recipe(directory)
        model, params = hf.load_pretrained(str(directory), head="base")
        if not isinstance(model.config, BertConfig):
            raise ValueError(f"{path} does not hold a BERT encoder ({type(model.config).__name__}); the Embedder "
                             f"needs one of {', '.join(hf.BERTS)}")
        tokenizer = load_tokenizer(directory)
        if getattr(tokenizer, "cls_id", None) is None or getattr(tokenizer, "sep_id", None) is None:
            raise ValueError(f"{path}: the tokenizer has no [CLS]/[SEP] tokens; the Embedder needs a BERT WordPiece "
                             "tokenizer (vocab.txt or tokenizer.json)")
        limit = max_tokens or recipe["max_seq_length"] or model.config.max_len
        if limit < 2:
            raise ValueError(f"max_tokens={limit} leaves no room for [CLS] and [SEP]; give at least 2")
        params = jax.device_put({k: v for k, v in params.items() if k != "pooler"})
        return cls(str(directory), model.config, params, tokenizer, min(limit, model.config.max_len), recipe)

    def token_ids(self, text: str) -> list[int]:
        """[CLS] + word pieces of the stripped text, truncated to `max_tokens`, + [SEP]."""
        text = text.strip()
        if self.recipe["do_lower_case"]:
            text = text.lower()
        pieces = self.tokenizer.encode(text) if text else []
        return [self.tokenizer.cls_id, *pieces[: self.max_tokens - 2], self.tokenizer.sep_id]

    def encode(self, texts: Sequence[str], *, batch_size: int = 32) -> np.ndarray:
        """Embeds texts.

        Args:
          texts: the texts (a single str is refused).
          batch_size: texts per encoder call.

        Returns:
          [len(texts), dim] float32 (unit rows when the recipe normalizes).
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not a single str; wrap it in a list")
        sequences = [self.token_ids(t) for t in texts]
        out = np.zeros((len(texts), self.dim), np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(sequences[i]))  # similar lengths share a batch
        pad = self.tokenizer.pad_id or 0
        for start in range(0, len(order), batch_size):
            batch = order[start: start + batch_size]
            longest = max(len(sequences[i]) for i in batch)
            length = min(self.max_tokens, max(MIN_LENGTH, 1 << (longest - 1).bit_length()))
            rows = min(batch_size, 1 << max(0, len(batch) - 1).bit_length())  # few row counts: fewer shapes
            ids_BT = np.full((rows, length), pad, np.int32)
            mask_BT = np.zeros((rows, length), np.int32)
            for row, i in enumerate(batch):
                ids_BT[row, : len(sequences[i])], mask_BT[row, : len(sequences[i])] = sequences[i], 1
            mask_BT[len(batch):, 0] = 1  # padding rows: one token, so nothing divides by zero
            pooled_BD = _embed(self.config, self.recipe["pooling"], self.recipe["normalize"], self.params,
                               jnp.asarray(ids_BT), jnp.asarray(mask_BT))
            out[batch] = np.asarray(pooled_BD)[: len(batch)]
        return out
