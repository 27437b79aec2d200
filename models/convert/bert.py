"""Hugging Face BERT checkpoints <-> `models.bert` parameters, name by name.

Axis letters: D model width, N heads, H head dim, F hidden width, V vocabulary.

torch `Linear` stores its weight [out, in]; ours are [in, out], with the attention
projections split per head: `query`/`key`/`value` [D, N, H] (HF's D outputs are head-major,
n * H + h) and `out` [N, H, D]. LayerNorm `weight`/`bias` are our `scale`/`bias` (old
TF-converted checkpoints call them `gamma`/`beta`; both are read).

Task models prefix the encoder with `bert.`; `hf_to_params` reads names with or without it,
`params_to_hf` writes what the matching `transformers` class expects (no prefix for
`BertModel`, `bert.` for the heads), tied copies included, so `load_state_dict(strict=True)`
accepts it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models.bert import HEADS, BertConfig
from models.convert.sources import Source
from models.layers.blocks import BlockConfig

# HF `hidden_act` -> ours (feedforward.ACTIVATIONS).
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu",
                  "silu": "silu", "swish": "silu"}
# Non-persistent torch buffers that some checkpoints still carry; they hold no weights.
IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids")
# Tied copies in a masked-LM state dict: name -> the name it must equal.
TIED = {"cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias"}

Params = dict[str, Any]


def config_from_hf(hf_config: dict | Any) -> BertConfig:
    """A BertConfig from a Hugging Face `config.json` dict (or a `transformers.BertConfig`)."""
    c = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    if c.get("model_type", "bert") != "bert":
        raise ValueError(f"model_type={c['model_type']!r}; expected 'bert'")
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"position_embedding_type={c['position_embedding_type']!r}; only 'absolute' is supported")
    act = c.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"hidden_act={act!r}; expected one of {tuple(HF_ACTIVATIONS)}")
    block = BlockConfig(
        d_model=c["hidden_size"], num_heads=c["num_attention_heads"], d_ff=c["intermediate_size"],
        mlp_activation=HF_ACTIVATIONS[act], norm="layernorm", norm_position="post",
        norm_eps=c.get("layer_norm_eps", 1e-12), dropout_rate=c.get("hidden_dropout_prob", 0.1),
        attention_dropout_rate=c.get("attention_probs_dropout_prob", 0.1), use_bias=True)
    return BertConfig(vocab_size=c["vocab_size"], block=block, num_layers=c["num_hidden_layers"],
                      max_len=c.get("max_position_embeddings", 512), type_vocab_size=c.get("type_vocab_size", 2),
                      pad_id=c.get("pad_token_id") or 0)


def _entries(config: BertConfig, head: str) -> list[tuple[str, tuple[str, ...], str]]:
    """(HF name without `bert.`, our path, kind) for every tensor of `head`.

    Kinds: "copy"; "linear" (transpose); "qkv" ([N*H, D] -> [D, N, H]); "qkv_bias"
    ([N*H] -> [N, H]); "attn_out" ([D, N*H] -> [N, H, D]).
    """
    if head not in HEADS:
        raise ValueError(f"head={head!r}; expected one of {HEADS}")
    enc = () if head == "base" else ("bert",)
    e = [
        ("embeddings.word_embeddings.weight", enc + ("word_embeddings", "embedding"), "copy"),
        ("embeddings.position_embeddings.weight", enc + ("position_embeddings", "embedding"), "copy"),
        ("embeddings.token_type_embeddings.weight", enc + ("token_type_embeddings",), "copy"),
        ("embeddings.LayerNorm.weight", enc + ("embeddings_norm", "scale"), "copy"),
        ("embeddings.LayerNorm.bias", enc + ("embeddings_norm", "bias"), "copy"),
    ]
    for i in range(config.num_layers):
        hf, ours = f"encoder.layer.{i}.", enc + (f"layer_{i}",)
        for proj in ("query", "key", "value"):
            e.append((f"{hf}attention.self.{proj}.weight", ours + ("self_attention", proj), "qkv"))
            e.append((f"{hf}attention.self.{proj}.bias", ours + ("self_attention", f"{proj}_bias"), "qkv_bias"))
        e += [
            (f"{hf}attention.output.dense.weight", ours + ("self_attention", "out"), "attn_out"),
            (f"{hf}attention.output.dense.bias", ours + ("self_attention", "out_bias"), "copy"),
            (f"{hf}attention.output.LayerNorm.weight", ours + ("attention_block", "norm", "scale"), "copy"),
            (f"{hf}attention.output.LayerNorm.bias", ours + ("attention_block", "norm", "bias"), "copy"),
            (f"{hf}intermediate.dense.weight", ours + ("mlp", "wi"), "linear"),
            (f"{hf}intermediate.dense.bias", ours + ("mlp", "wi_bias"), "copy"),
            (f"{hf}output.dense.weight", ours + ("mlp", "wo"), "linear"),
            (f"{hf}output.dense.bias", ours + ("mlp", "wo_bias"), "copy"),
            (f"{hf}output.LayerNorm.weight", ours + ("mlp_block", "norm", "scale"), "copy"),
            (f"{hf}output.LayerNorm.bias", ours + ("mlp_block", "norm", "bias"), "copy"),
        ]
    if head in ("base", "classification"):
        e += [("pooler.dense.weight", enc + ("pooler", "kernel"), "linear"),
              ("pooler.dense.bias", enc + ("pooler", "bias"), "copy")]
    if head == "mlm":
        e += [("cls.predictions.transform.dense.weight", ("transform", "kernel"), "linear"),
              ("cls.predictions.transform.dense.bias", ("transform", "bias"), "copy"),
              ("cls.predictions.transform.LayerNorm.weight", ("transform_norm", "scale"), "copy"),
              ("cls.predictions.transform.LayerNorm.bias", ("transform_norm", "bias"), "copy"),
              ("cls.predictions.bias", ("output_bias",), "copy")]
    if head == "classification":
        e += [("classifier.weight", ("classifier", "kernel"), "linear"),
              ("classifier.bias", ("classifier", "bias"), "copy")]
    if head == "qa":
        e += [("qa_outputs.weight", ("qa_outputs", "kernel"), "linear"),
              ("qa_outputs.bias", ("qa_outputs", "bias"), "copy")]
    return e


def _canonical(name: str) -> str:
    """Drops the `bert.` prefix and renames TF-era LayerNorm `gamma`/`beta`."""
    name = name.removeprefix("bert.")
    if ".LayerNorm." in name:
        name = name.replace(".LayerNorm.gamma", ".LayerNorm.weight").replace(".LayerNorm.beta", ".LayerNorm.bias")
    return name


def _to_ours(x: np.ndarray, kind: str, b: BlockConfig) -> np.ndarray:
    D, N, H = b.d_model, b.num_heads, b.head_size
    if kind == "linear":
        return x.T
    if kind == "qkv":
        return x.T.reshape(D, N, H)
    if kind == "qkv_bias":
        return x.reshape(N, H)
    if kind == "attn_out":
        return x.T.reshape(N, H, D)
    return x


def _to_hf(x: np.ndarray, kind: str, b: BlockConfig) -> np.ndarray:
    D, N, H = b.d_model, b.num_heads, b.head_size
    if kind == "linear":
        return x.T
    if kind == "qkv":
        return x.reshape(D, N * H).T
    if kind == "qkv_bias":
        return x.reshape(N * H)
    if kind == "attn_out":
        return x.reshape(N * H, D).T
    return x


def _hf_shape(name: str, kind: str, config: BertConfig) -> tuple[int | None, ...]:
    """The HF tensor's expected shape; None where the config does not fix it (class count)."""
    b, D = config.block, config.block.d_model
    NH, F = b.num_heads * b.head_size, b.d_ff
    if name.startswith("embeddings.") and name.endswith("embeddings.weight"):
        rows = {"word": config.vocab_size, "position": config.max_len, "token_type": config.type_vocab_size}
        return (rows[name.split(".")[1].removesuffix("_embeddings")], D)
    if name.startswith("classifier."):
        return (None, D) if name.endswith("weight") else (None,)
    if name.startswith("qa_outputs."):
        return (2, D) if name.endswith("weight") else (2,)
    if name == "cls.predictions.bias":
        return (config.vocab_size,)
    if kind == "qkv":
        return (NH, D)
    if kind == "qkv_bias":
        return (NH,)
    if kind == "attn_out":
        return (D, NH)
    if "intermediate.dense" in name:
        return (F, D) if name.endswith("weight") else (F,)
    if ".output.dense." in name and "attention" not in name:
        return (D, F) if name.endswith("weight") else (D,)
    return (D, D) if name.endswith("weight") and "LayerNorm" not in name else (D,)


def sources(config: BertConfig, available=None, *, head: str = "base") -> dict:
    """Per-parameter sources of a BERT checkpoint for `head` (see models/convert/sources.py);
    `available` (the checkpoint's tensor names) tells whether they carry the `bert.` prefix."""
    prefixed = available is not None and any(n.startswith("bert.") for n in available)
    out = {}
    for name, path, kind in _entries(config, head):
        hf_name = "bert." + name if prefixed and not name.startswith(("cls.", "classifier.", "qa_outputs.")) else name

        def convert(x, name=name, kind=kind):
            want = _hf_shape(name, kind, config)
            if len(x.shape) != len(want) or any(w is not None and w != s for w, s in zip(want, x.shape)):
                raise ValueError(f"tensor {name!r} has shape {x.shape}; config expects {want}")
            return _to_ours(x, kind, config.block)

        hf_shape = _hf_shape(name, kind, config)
        if kind in ("linear", "copy"):  # a classifier's class count is None here: no array to shape
            shape = hf_shape[::-1] if kind == "linear" else hf_shape
        else:
            shape = tuple(_to_ours(np.empty(hf_shape, np.int8), kind, config.block).shape)
        out[path] = Source((hf_name,), convert, shape)
    return out


def hf_to_params(state_dict: dict[str, np.ndarray], config: BertConfig, head: str = "base") -> Params:
    """Our parameter tree for `head` from a Hugging Face BERT state dict.

    Args:
      state_dict: HF tensor name -> numpy array (e.g. `safetensors.numpy.load_file`), with or
        without the `bert.` prefix.
      config: the model's config (see `config_from_hf`).
      head: one of models.bert.HEADS: "base" (BertModel with pooler), "mlm", "classification",
        "qa".

    Returns:
      A nested dict of numpy arrays in `config.block.param_dtype`, for `{"params": ...}`.

    Raises:
      ValueError: naming the missing or unexpected tensors, a tensor of the wrong shape, or a
        tied copy that differs from its original.
    """
    given: dict[str, np.ndarray] = {}
    for name, x in state_dict.items():
        canon = _canonical(name)
        if canon in given:
            raise ValueError(f"tensor {canon!r} appears twice (with and without the `bert.` prefix)")
        given[canon] = np.asarray(x)
    entries = _entries(config, head)
    expected = {name for name, _, _ in entries}
    tied = {k: v for k, v in TIED.items() if head == "mlm"}
    missing = sorted(expected - set(given))
    unexpected = sorted(set(given) - expected - set(tied) - set(IGNORED))
    if missing or unexpected:
        raise ValueError(f"BERT checkpoint does not match head={head!r}: missing tensors {missing}; "
                         f"unexpected tensors {unexpected}")
    for copy, original in tied.items():
        if copy in given and not np.array_equal(given[copy], given[original]):
            raise ValueError(f"{copy!r} should be tied to {original!r} but differs; untied decoders are "
                             "not supported")

    params: Params = {}
    for name, path, kind in entries:
        x = given[name]
        want = _hf_shape(name, kind, config)
        if len(x.shape) != len(want) or any(w is not None and w != s for w, s in zip(want, x.shape)):
            raise ValueError(f"tensor {name!r} has shape {x.shape}; config expects {want}")
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.ascontiguousarray(_to_ours(x, kind, config.block)).astype(config.block.param_dtype)
    return params


def params_to_hf(params: Params, config: BertConfig, head: str = "base") -> dict[str, np.ndarray]:
    """The Hugging Face state dict of `head` (inverse of `hf_to_params`).

    Names are those of `transformers.BertModel` for "base" and carry the `bert.` prefix for the
    heads (BertForMaskedLM, BertForSequenceClassification, BertForQuestionAnswering); the
    masked-LM's tied decoder weight and bias are included.
    """
    prefix = "" if head == "base" else "bert."
    out: dict[str, np.ndarray] = {}
    for name, path, kind in _entries(config, head):
        node = params
        for key in path:
            if key not in node:
                raise ValueError(f"params have no {'/'.join(path)!r} (needed for {name!r}); is head={head!r} right?")
            node = node[key]
        hf_name = name if name.startswith(("cls.", "classifier.", "qa_outputs.")) else prefix + name
        out[hf_name] = np.ascontiguousarray(_to_hf(np.asarray(node), kind, config.block))
    if head == "mlm":
        for copy, original in TIED.items():
            out[copy] = out[original if original.startswith("cls.") else prefix + original]
    return out


def head_tensors(state_dict: dict[str, np.ndarray], config: BertConfig, head: str, num_labels: int = 2,
                 seed: int = 0) -> tuple[dict[str, np.ndarray], list[str]]:
    """The state dict of `head` from a checkpoint of another head, with what is missing freshly made.

    Keeps the encoder (`embeddings.*`, `encoder.*`), keeps the pooler where `head` has one
    (base, classification) and drops it where it has none (mlm, qa), drops any other head's
    tensors (`cls.*`, `classifier.*`, `qa_outputs.*`), and draws the tensors `head` needs but the
    checkpoint lacks as transformers' `_init_weights` does: Linear weights normal(0, 0.02),
    biases 0; a masked-LM transform norm at scale 1, bias 0.

    Args:
      state_dict: HF tensor name -> array, with or without the `bert.` prefix.
      config: the encoder's config.
      head: the target head (models.bert.HEADS).
      num_labels: rows of a fresh classifier (classification only).
      seed: seed of the fresh tensors.

    Returns:
      (state dict for `hf_to_params(..., head)`, sorted names of the freshly made tensors).
    """
    kept = {}
    for name, x in state_dict.items():
        canon = _canonical(name)
        if canon.startswith(("embeddings.", "encoder.")) or (canon.startswith("pooler.")
                                                             and head in ("base", "classification")):
            kept[canon] = x
    rng = np.random.default_rng(seed)
    fresh = []
    for name, _, kind in _entries(config, head):
        if name in kept or name.startswith(("embeddings.", "encoder.")):  # a missing encoder tensor stays an error
            continue
        shape = tuple(num_labels if s is None else s for s in _hf_shape(name, kind, config))
        if name.endswith("LayerNorm.weight"):
            value = np.ones(shape)
        elif name.endswith("weight"):
            value = rng.normal(0.0, 0.02, shape)
        else:
            value = np.zeros(shape)
        kept[name] = value.astype(np.float32)
        fresh.append(name)
    return kept, sorted(fresh)
