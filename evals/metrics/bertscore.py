"""BERTScore (Zhang et al. 2020) on lmlab's own BERT, equal to the `bert-score` package.

Axis letters: B batch (sentences or pairs), T hypothesis length, S reference length, D width.

Each text becomes [CLS] + WordPiece ids + [SEP] (stripped, truncated to the model's length);
its token embeddings are the hidden states after `num_layers` encoder layers (0: the
embedding output), scaled to unit length. For a (hypothesis, reference) pair every token is
matched greedily to its most similar token of the other text (cosine, [CLS]/[SEP] included
as match candidates, as bert-score does), and

    P = sum_t w_t max_s cos(h_t, r_s) / sum_t w_t      (over hypothesis tokens)
    R = sum_s w_s max_t cos(h_t, r_s) / sum_s w_s      (over reference tokens)
    F = 2 P R / (P + R)

with w = 1 for word pieces and 0 for [CLS]/[SEP]; with `idf=True`,
w = log((M + 1) / (df + 1)) where df counts the references (M of them, all references of all
items) that hold the word piece ([CLS]/[SEP] are in every one, so they weigh 0).

bert-score's conventions, followed here so the numbers are the same:
- an empty text (nothing but [CLS] [SEP]) on either side scores P = R = F = 0;
- when a text's weights sum to 0 (idf: all its pieces appear in every reference, as with a
  single reference) its P (or R) is 0/0 = NaN, and an undefined F is 0;
- several references: the maximum of P, of R and of F over them, each taken separately;
- pairs are matched `batch_size` at a time in order (hypothesis i against each of its
  references), and bert-score multiplies similarities to padding by 0: a token's best cosine
  is raised to 0 when it is negative and the other text of its pair is shorter than the
  longest such text in its batch. That happens (MiniLM's last layer gives unrelated short
  texts negative best cosines), so it is reproduced: with the same `batch_size` the scores
  are bert-score's, and an item's score can depend on its batch neighbours, as there.

    score = bertscore(hyps, [[ref_a, ref_b], ...], model_dir="path/to/minilm", num_layers=4)
    score.f1.mean()                                   # corpus BERTScore F1

The encoder and tokenizer of a model directory load once per process (`load_encoder`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from models import hf
from models.bert import BertConfig, BertModel

# Texts are embedded this many pairs at a time (deduplicated inside), so memory stays bounded.
_PAIRS_PER_CHUNK = 4096
_LENGTH_STEP = 16  # texts are padded to a multiple of this many tokens
_BUCKET_TOKENS = 1024  # a batch is padded to at least this many tokens' rows (fewer shapes to compile)


class BERTScore(NamedTuple):
    """Per-item scores (float64 arrays [N]); the corpus score is their mean."""

    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A BERT model directory loaded for scoring: config, device params, tokenizer."""

    config: BertConfig
    params: dict
    tokenizer: object
    max_tokens: int  # [CLS] + pieces + [SEP] at most

    def encode(self, text: str) -> tuple[int, ...]:
        """[CLS] + word pieces of the stripped text (truncated) + [SEP], as bert-score encodes."""
        text = text.strip()
        pieces = self.tokenizer.encode(text) if text else []
        return (self.tokenizer.cls_id, *pieces[: self.max_tokens - 2], self.tokenizer.sep_id)


def load_encoder(model_dir: str | os.PathLike) -> Encoder:
    """The BERT encoder and WordPiece tokenizer of `model_dir`, loaded once per directory."""
    return _load_encoder(os.path.realpath(os.fspath(model_dir)))


@functools.lru_cache(maxsize=4)
def _load_encoder(model_dir: str) -> Encoder:
    from data.tokenizer import load_tokenizer

    is_bert = isinstance(hf.model_of(model_dir).config, BertConfig)
    if not is_bert:
        raise ValueError(f"{model_dir} does not hold a BERT encoder; BERTScore needs one of the architectures "
                         f"{', '.join(hf.BERTS)} (e.g. all-MiniLM-L6-v2)")
    model, params = hf.load_pretrained(model_dir, head="base")
    tokenizer = load_tokenizer(model_dir)
    if getattr(tokenizer, "cls_id", None) is None or getattr(tokenizer, "sep_id", None) is None:
        raise ValueError(f"{model_dir}: the tokenizer has no [CLS]/[SEP] tokens; BERTScore needs a BERT "
                         "WordPiece tokenizer (vocab.txt or tokenizer.json)")
    params = {k: v for k, v in params.items() if k != "pooler"}
    return Encoder(model.config, jax.device_put(params), tokenizer,
                   min(model.config.max_len, _model_max_length(model_dir)))


def _model_max_length(model_dir: str) -> int:
    """tokenizer_config.json's `model_max_length` (transformers truncates to it), else no limit."""
    path = os.path.join(model_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return 1 << 30
    with open(path, encoding="utf-8") as f:
        return int(json.load(f).get("model_max_length") or 1 << 30)


def _references_lists(hypotheses: Sequence[str], references: Sequence) -> list[list[str]]:
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise ValueError("hypotheses and references must be sequences of texts, not a single str")  # noqa: TRY004
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference entries; give one entry "
                         "(a str or a list of str) per hypothesis")
    lists = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
    empty = [i for i, refs in enumerate(lists) if not refs]
    if empty:
        raise ValueError(f"hypothesis {empty[0]} has an empty list of references; give at least one reference")
    for i, (hyp, refs) in enumerate(zip(hypotheses, lists)):
        for text in (hyp, *refs):
            if not isinstance(text, str):
                raise ValueError(f"item {i} holds {type(text).__name__} {text!r:.40}, not a str")  # noqa: TRY004
    return lists


def _length_bucket(n: int, cap: int) -> int:
    """Token length n rounded up to a multiple of _LENGTH_STEP: little padding, few shapes."""
    return min(cap, -(-n // _LENGTH_STEP) * _LENGTH_STEP)


def _rows(n: int, length: int, batch_size: int) -> int:
    """Rows of a batch of n texts of `length`: the next power of two, at least _BUCKET_TOKENS
    tokens' worth (few compiled shapes) but no more rows of long padding than that."""
    return min(batch_size, max(_BUCKET_TOKENS // length, 1 << max(0, n - 1).bit_length()))


def token_weights(encoder: Encoder, reference_ids: Sequence[tuple[int, ...]], idf: bool):
    """A function ids -> weights [len(ids)]: idf over the references, or 1 with [CLS]/[SEP] at 0."""
    if not idf:
        specials = {encoder.tokenizer.cls_id, encoder.tokenizer.sep_id}
        return lambda ids: np.array([0.0 if t in specials else 1.0 for t in ids])
    num_docs = len(reference_ids)
    doc_freq = Counter(t for ids in reference_ids for t in set(ids))
    unseen = math.log(num_docs + 1)
    table = {t: math.log((num_docs + 1) / (c + 1)) for t, c in doc_freq.items()}
    return lambda ids: np.array([table.get(t, unseen) for t in ids])


@functools.partial(jax.jit, static_argnums=0)
def _embed(config: BertConfig, params: dict, ids_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    hidden_BTD, _ = BertModel(config, add_pooler=False).apply({"params": params}, ids_BT, mask_BT)
    hidden_BTD = hidden_BTD.astype(jnp.float32)
    return hidden_BTD / jnp.linalg.norm(hidden_BTD, axis=-1, keepdims=True)


def _embed_texts(encoder: Encoder, num_layers: int, sequences: list[tuple[int, ...]],
                 batch_size: int) -> dict[tuple[int, ...], np.ndarray]:
    """{ids: unit-length embeddings [len(ids), D]} for each distinct sequence."""
    config = dataclasses.replace(encoder.config, num_layers=num_layers)
    kept = {f"layer_{i}" for i in range(num_layers)}
    params = {k: v for k, v in encoder.params.items() if not k.startswith("layer_") or k in kept}
    pad = encoder.tokenizer.pad_id or 0
    ordered = sorted(set(sequences), key=len)  # similar lengths share a batch: less padding
    out = {}
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start: start + batch_size]
        length = _length_bucket(max(map(len, batch)), encoder.max_tokens)
        rows = _rows(len(batch), length, batch_size)
        ids_BT = np.full((rows, length), pad, np.int32)
        mask_BT = np.zeros((rows, length), np.int32)
        for i, ids in enumerate(batch):
            ids_BT[i, : len(ids)], mask_BT[i, : len(ids)] = ids, 1
        emb_BTD = np.asarray(_embed(config, params, jnp.asarray(ids_BT), jnp.asarray(mask_BT)))
        out.update({ids: emb_BTD[i, : len(ids)] for i, ids in enumerate(batch)})
    return out


@jax.jit
def _greedy_match(hyp_BTD, hyp_w_BT, hyp_mask_BT, hyp_short_B, ref_BSD, ref_w_BS, ref_mask_BS, ref_short_B):
    """(P, R, F) [B] of greedy cosine matching.

    Masks mark real tokens; weights are idf or 0/1; `*_short_B` marks texts shorter than the
    longest of their side in bert-score's batch, whose padding (similarity 0) the other
    text's tokens see in their maximum.
    """
    sim_BTS = jnp.einsum("BTD,BSD->BTS", hyp_BTD, ref_BSD)
    valid_BTS = hyp_mask_BT[:, :, None] & ref_mask_BS[:, None, :]
    sim_BTS = jnp.where(valid_BTS, sim_BTS, -jnp.inf)
    best_hyp_BT = sim_BTS.max(axis=2)
    best_hyp_BT = jnp.where(ref_short_B[:, None], jnp.maximum(best_hyp_BT, 0.0), best_hyp_BT)
    best_hyp_BT = jnp.where(hyp_mask_BT, best_hyp_BT, 0.0)
    best_ref_BS = sim_BTS.max(axis=1)
    best_ref_BS = jnp.where(hyp_short_B[:, None], jnp.maximum(best_ref_BS, 0.0), best_ref_BS)
    best_ref_BS = jnp.where(ref_mask_BS, best_ref_BS, 0.0)
    # 0 / 0 = NaN when a text's weights sum to 0, as in bert-score.
    p_B = (best_hyp_BT * hyp_w_BT).sum(1) / hyp_w_BT.sum(1)
    r_B = (best_ref_BS * ref_w_BS).sum(1) / ref_w_BS.sum(1)
    f_B = 2 * p_B * r_B / (p_B + r_B)
    empty_B = (hyp_mask_BT.sum(1) == 2) | (ref_mask_BS.sum(1) == 2)  # nothing but [CLS] [SEP]
    p_B, r_B = jnp.where(empty_B, 0.0, p_B), jnp.where(empty_B, 0.0, r_B)
    return p_B, r_B, jnp.where(jnp.isnan(f_B), 0.0, f_B)


def _pad_side(sequences, embeddings, weights, rows: int, cap: int, dim: int):
    """One side of a batch of pairs: embeddings, weights, token mask, shorter-than-longest."""
    longest = max(map(len, sequences))
    length = _length_bucket(longest, cap)
    emb = np.zeros((rows, length, dim), np.float32)
    w = np.zeros((rows, length), np.float32)
    mask = np.zeros((rows, length), bool)
    short = np.zeros((rows,), bool)
    for i, ids in enumerate(sequences):
        n = len(ids)
        emb[i, :n], w[i, :n], mask[i, :n], short[i] = embeddings[ids], weights(ids), True, n < longest
    return jnp.asarray(emb), jnp.asarray(w), jnp.asarray(mask), jnp.asarray(short)


def _score_pairs(encoder: Encoder, num_layers: int, pairs: list[tuple[tuple, tuple]], weights,
                 batch_size: int) -> np.ndarray:
    """[len(pairs), 3] (P, R, F) of (hypothesis ids, reference ids) pairs."""
    scores = np.zeros((len(pairs), 3))
    dim = encoder.config.block.d_model
    per_chunk = batch_size * max(1, _PAIRS_PER_CHUNK // batch_size)  # whole batches: same batches as bert-score
    for chunk in range(0, len(pairs), per_chunk):
        chunk_pairs = pairs[chunk: chunk + per_chunk]
        embeddings = _embed_texts(encoder, num_layers, [s for pair in chunk_pairs for s in pair], batch_size)
        for start in range(0, len(chunk_pairs), batch_size):
            batch = chunk_pairs[start: start + batch_size]
            hyps, refs = [h for h, _ in batch], [r for _, r in batch]
            longest = _length_bucket(max(len(ids) for pair in batch for ids in pair), encoder.max_tokens)
            rows = _rows(len(batch), longest, batch_size)
            hyp = _pad_side(hyps, embeddings, weights, rows, encoder.max_tokens, dim)
            ref = _pad_side(refs, embeddings, weights, rows, encoder.max_tokens, dim)
            p, r, f = (np.asarray(x, np.float64)[: len(batch)] for x in _greedy_match(*hyp, *ref))
            scores[chunk + start: chunk + start + len(batch)] = np.stack([p, r, f], axis=1)
    return scores


def bertscore(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]], *,
              model_dir: str | os.PathLike, num_layers: int, idf: bool = False,
              batch_size: int = 64) -> BERTScore:
    """BERTScore of each hypothesis against its references, equal to `bert_score.score`.

    Args:
      hypotheses: N texts.
      references: N entries, each the list of references of its hypothesis (a str is one).
      model_dir: a Hugging Face BERT directory (config.json, model.safetensors, vocab.txt or
        tokenizer.json), e.g. all-MiniLM-L6-v2.
      num_layers: embeddings are the hidden states after this many layers (0: the embedding
        output; at most the model's layer count).
      idf: weight word pieces by their inverse document frequency over all references.
      batch_size: texts per forward pass and pairs per matching step (bert-score's
        `batch_size`, on which its padding convention makes scores depend, see above).

    Returns:
      BERTScore(precision, recall, f1), each a float64 array [N] (best over references).
    """
    reference_lists = _references_lists(hypotheses, references)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    encoder = load_encoder(model_dir)
    if not 0 <= num_layers <= encoder.config.num_layers:
        raise ValueError(f"num_layers={num_layers} is outside [0, {encoder.config.num_layers}], the layers of "
                         f"{model_dir}")
    hyp_ids = [encoder.encode(h) for h in hypotheses]
    ref_ids = [[encoder.encode(r) for r in refs] for refs in reference_lists]
    weights = token_weights(encoder, [ids for refs in ref_ids for ids in refs], idf)
    pairs = [(h, r) for h, refs in zip(hyp_ids, ref_ids) for r in refs]
    scores = _score_pairs(encoder, num_layers, pairs, weights, batch_size)
    ends = np.cumsum([len(refs) for refs in ref_ids])
    # Per column, like bert-score (torch.max propagates NaN, as np.max does).
    best = np.stack([scores[end - len(refs): end].max(axis=0) for end, refs in zip(ends, ref_ids)]) \
        if len(pairs) else np.zeros((0, 3))
    return BERTScore(best[:, 0], best[:, 1], best[:, 2])
