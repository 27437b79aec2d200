"""lmlab's decoder as an ONNX graph with a KV cache, for onnxruntime and TensorRT.

Axis letters: B batch, T new tokens, P past (cached) tokens, S = P + T, D model width,
N query heads, K key/value heads, G = N / K, H head dim, F MLP width, V vocabulary.

    export_onnx(model, params, "out/")        # out/model.onnx, manifest.json, run_onnx.py
    python out/run_onnx.py out --prompt_ids=5,17,3 --max_new_tokens=20   # numpy + onnxruntime

The graph is written by hand from the params with `onnx.helper` (no tracer): one graph
serves prefill and decode, in the convention of optimum's decoder-with-past, which
onnxruntime-genai and TensorRT's ONNX parser take as they are:

    inputs   input_ids int64 [B, T], position_ids int64 [B, T], attention_mask int64 [B, S]
             past_key_values.{i}.key / .value float32 [B, K, P, H]   (P = 0 for a prefill)
    outputs  logits float32 [B, T, V], present.{i}.key / .value float32 [B, K, S, H]

B, T and P are dynamic axes. The present cache is the past with this call's keys and
values appended (Concat on the P axis); keys are cached after RoPE. A query at slot P + t
sees slot s if s <= P + t and attention_mask[b, s] = 1, so right-padded prompts of
different lengths share a batch: their padding slots stay masked for good, and each
row's positions (RoPE angles or learned-table rows) come from `position_ids`, not slots.

Supported switches (GPT-2 and LLaMA/Qwen families): LayerNorm or RMSNorm, pre-LN,
learned positions or rotate-half RoPE with the "default", "linear", "llama3" and "yarn"
scalings (constants of the graph; "dynamic" depends on the run's length and is refused),
relu/gelu/gelu_tanh/silu and gated MLPs, biases, GQA/MQA, QK-norm, tied or untied head.
Anything else (MoE, MLA, sliding windows, PEFT layers, score heads, interleaved RoPE,
post-LN) is refused by `check_exportable` with a ValueError naming the switch.

Everything is computed in float32, as lmlab computes a float32 model; weights are
initializers (a model over 2 GB is saved with its tensors in `model.onnx.data`, ONNX's
external data, since a protobuf stops at 2 GB). Opset 17: LayerNormalization exists,
and TensorRT 8.6+ parses every op used.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from inference.generate import PAD_ID
from models.gpt import GPT, GPTConfig, unscan_params
from models.layers.feedforward import ACTIVATIONS, GATED
from models.layers.positional import rope_frequencies

OPSET = 17
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_onnx.py")
FILES = ("model.onnx", "model.onnx.data", "manifest.json", "run_onnx.py")
EXTERNAL_DATA_BYTES = 1 << 30  # above this, tensors go to model.onnx.data (the protobuf limit is 2 GB)
ROPE_SCALINGS = ("default", "linear", "llama3", "yarn")


def check_exportable(config: GPTConfig) -> None:
    """Raises ValueError naming the first switch of `config` the ONNX graph does not implement."""
    b = config.block
    refusals = [
        (b.mla is not None, "multi-head latent attention (block.mla)"),
        (b.moe is not None, "a mixture of experts (block.moe)"),
        (b.peft is not None, "PEFT layers (block.peft); merge the LoRA factors into the weights first"),
        (b.sliding_window is not None, f"sliding-window attention (block.sliding_window={b.sliding_window})"),
        (config.head != "lm", f"a score head (head={config.head!r})"),
        (b.norm_position != "pre", f"norm_position={b.norm_position!r} (only pre-LN decoders)"),
        (b.mlp_activation not in ACTIVATIONS and b.mlp_activation not in GATED,
         f"mlp_activation={b.mlp_activation!r}"),
        (b.rope is not None and b.rope.interleaved, "interleaved RoPE (rope.interleaved=True)"),
        (b.rope is not None and b.rope.scaling not in ROPE_SCALINGS,
         f"RoPE scaling {getattr(b.rope, 'scaling', None)!r} (supported: {ROPE_SCALINGS})"),
    ]
    for refused, what in refusals:
        if refused:
            raise ValueError(f"ONNX export does not support {what}; export with --format=jax instead")


class _Graph:
    """Nodes and initializers under construction, with unique names."""

    def __init__(self):
        self.nodes, self.inits, self._count, self._names = [], [], 0, set()

    def const(self, name: str, array) -> str:
        if name in self._names:  # a small constant made again: a fresh name
            name = f"{name}.{len(self.inits)}"
        self._names.add(name)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        self._count += 1
        out = f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"n{self._count}", **attrs))
        return out

    def matmul(self, x: str, w: str, bias: str | None = None) -> str:
        y = self.op("MatMul", x, w)
        return y if bias is None else self.op("Add", y, bias)


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _norm(g: _Graph, x: str, p: dict, prefix: str, b) -> str:
    """LayerNorm (opset 17's op) or RMSNorm (written out), float32 statistics as lmlab's."""
    scale = g.const(f"{prefix}.scale", _f32(p["scale"]))
    if b.norm == "layernorm":
        bias = g.const(f"{prefix}.bias", _f32(p["bias"]) if "bias" in p else np.zeros_like(_f32(p["scale"])))
        return g.op("LayerNormalization", x, scale, bias, axis=-1, epsilon=float(b.norm_eps))
    return _rms(g, x, scale, b.norm_eps)


def _rms(g: _Graph, x: str, scale: str, eps: float) -> str:
    ms = g.op("ReduceMean", g.op("Mul", x, x), axes=[-1], keepdims=1)
    inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, g.const(f"eps_{g._count}", np.float32(eps)))))
    return g.op("Mul", g.op("Mul", x, inv), scale)


def _activation(g: _Graph, name: str, x: str) -> str:
    if name == "relu":
        return g.op("Relu", x)
    if name == "silu":
        return g.op("Mul", x, g.op("Sigmoid", x))
    half, one = g.const(f"half_{g._count}", np.float32(0.5)), g.const(f"one_{g._count}", np.float32(1.0))
    if name == "gelu":  # 0.5 x (1 + erf(x / sqrt 2))
        inner = g.op("Erf", g.op("Mul", x, g.const(f"rsqrt2_{g._count}", np.float32(1 / np.sqrt(2)))))
    else:  # gelu_tanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = g.op("Mul", g.op("Mul", x, x), x)
        poly = g.op("Add", x, g.op("Mul", cube, g.const(f"c_{g._count}", np.float32(0.044715))))
        inner = g.op("Tanh", g.op("Mul", poly, g.const(f"k_{g._count}", np.float32(np.sqrt(2 / np.pi)))))
    return g.op("Mul", g.op("Mul", x, half), g.op("Add", inner, one))


def _mlp(g: _Graph, x: str, p: dict, prefix: str, b) -> str:
    def dense(name):
        bias = g.const(f"{prefix}.{name}_bias", _f32(p[name + "_bias"])) if name + "_bias" in p else None
        return lambda h: g.matmul(h, g.const(f"{prefix}.{name}", _f32(p[name])), bias)

    if b.mlp_activation in GATED:
        h = g.op("Mul", _activation(g, GATED[b.mlp_activation], dense("wi_gate")(x)), dense("wi_up")(x))
    else:
        h = _activation(g, b.mlp_activation, dense("wi")(x))
    return dense("wo")(h)


def _rope(g: _Graph, x_BTNH: str, cos: str, sin: str, half: int, head_dim: int) -> str:
    """Rotate-half RoPE on the first 2 * half dims of [B, T, N, H] (the rest pass through)."""
    def piece(start, stop):
        return g.op("Slice", x_BTNH, g.const("slice_start", np.array([start], np.int64)),
                    g.const("slice_stop", np.array([stop], np.int64)), g.const("slice_axis", np.array([3], np.int64)))

    x1, x2 = piece(0, half), piece(half, 2 * half)
    parts = [g.op("Sub", g.op("Mul", x1, cos), g.op("Mul", x2, sin)),
             g.op("Add", g.op("Mul", x2, cos), g.op("Mul", x1, sin))]
    if 2 * half < head_dim:
        parts.append(piece(2 * half, head_dim))
    return g.op("Concat", *parts, axis=-1)


def _attention(g: _Graph, x: str, p: dict, i: int, b, rope, mask: str) -> tuple[str, str, str]:
    """Self-attention of layer i on [B, T, D]; returns (output [B, T, D], present key, present value)."""
    N, K, H, D = b.num_heads, b.kv_heads, b.head_size, b.d_model
    pre = f"layer_{i}.self_attention"

    def project(name, heads):
        bias = g.const(f"{pre}.{name}_bias", _f32(p[name + "_bias"]).reshape(-1)) if name + "_bias" in p else None
        y = g.matmul(x, g.const(f"{pre}.{name}", _f32(p[name]).reshape(D, heads * H)), bias)
        return g.op("Reshape", y, g.const(f"shape_{g._count}", np.array([0, 0, heads, H], np.int64)))

    q, k, v = project("query", N), project("key", K), project("value", K)  # [B, T, heads, H]
    if b.qk_norm:
        q = _rms(g, q, g.const(f"{pre}.query_norm", _f32(p["query_norm"])), b.norm_eps)
        k = _rms(g, k, g.const(f"{pre}.key_norm", _f32(p["key_norm"])), b.norm_eps)
    if rope is not None:
        q, k = (_rope(g, t, *rope, H) for t in (q, k))
    new_k, new_v = (g.op("Transpose", t, perm=[0, 2, 1, 3]) for t in (k, v))  # [B, K, T, H]
    present_k = g.op("Concat", f"past_key_values.{i}.key", new_k, axis=2)
    present_v = g.op("Concat", f"past_key_values.{i}.value", new_v, axis=2)
    # Grouped heads without copies: q [B, K, G, T, H] against k, v [B, K, 1, S, H].
    q5 = g.op("Reshape", g.op("Transpose", q, perm=[0, 2, 1, 3]),
              g.const(f"shape_{g._count}", np.array([0, K, N // K, -1, H], np.int64)))
    axis2 = g.const(f"axis2_{g._count}", np.array([2], np.int64))
    k5, v5 = g.op("Unsqueeze", present_k, axis2), g.op("Unsqueeze", present_v, axis2)
    scores = g.op("Mul", g.op("MatMul", q5, g.op("Transpose", k5, perm=[0, 1, 2, 4, 3])),
                  g.const(f"scale_{g._count}", np.float32(H ** -0.5)))
    scores = g.op("Where", mask, scores, g.const(f"min_{g._count}", np.float32(np.finfo(np.float32).min)))
    out5 = g.op("MatMul", g.op("Softmax", scores, axis=-1), v5)  # [B, K, G, T, H]
    out = g.op("Reshape", out5, g.const(f"shape_{g._count}", np.array([0, N, -1, H], np.int64)))
    out = g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1, 3]),
               g.const(f"shape_{g._count}", np.array([0, 0, N * H], np.int64)))
    bias = g.const(f"{pre}.out_bias", _f32(p["out_bias"])) if "out_bias" in p else None
    return g.matmul(out, g.const(f"{pre}.out", _f32(p["out"]).reshape(N * H, D)), bias), present_k, present_v


def _mask(g: _Graph) -> str:
    """bool [B, 1, 1, T, S]: slot s visible to the query at slot P + t (causal and attention_mask)."""
    def dim(name, axis):
        return g.op("Squeeze", g.op("Gather", g.op("Shape", name), g.const(f"i{g._count}", np.array([axis], np.int64)),
                                    axis=0), g.const(f"z{g._count}", np.array([0], np.int64)))

    S, T = dim("attention_mask", 1), dim("input_ids", 1)
    P = g.op("Sub", S, T)
    one = g.const("one_i64", np.array(1, np.int64))
    slots = g.op("Range", g.const("zero_i64", np.array(0, np.int64)), S, one)  # [S]
    query_slots = g.op("Unsqueeze", g.op("Range", P, S, one), g.const("last_axis", np.array([-1], np.int64)))
    causal = g.op("LessOrEqual", slots, query_slots)  # [T, S]
    keep = g.op("Cast", "attention_mask", to=TensorProto.BOOL)
    keep = g.op("Unsqueeze", keep, g.const("axes_123", np.array([1, 2, 3], np.int64)))  # [B, 1, 1, 1, S]
    return g.op("And", keep, causal)


def _rope_tables(g: _Graph, b) -> tuple[str, str, int]:
    """cos and sin [B, T, 1, R/2] from position_ids (float32 angles, as lmlab's apply_rope)."""
    inv_freq, factor = rope_frequencies(b.rope, b.head_size)
    pos = g.op("Unsqueeze", g.op("Cast", "position_ids", to=TensorProto.FLOAT),
               g.const("pos_axes", np.array([2, 3], np.int64)))  # [B, T, 1, 1]
    angles = g.op("Mul", pos, g.const("rope.inv_freq", inv_freq.astype(np.float32)))
    scale = g.const("rope.attention_factor", np.float32(factor))
    return g.op("Mul", g.op("Cos", angles), scale), g.op("Mul", g.op("Sin", angles), scale), inv_freq.shape[0]


def decoder_graph(config: GPTConfig, params: dict) -> onnx.ModelProto:
    """The ONNX model of `GPT(config)` with `params` (module docstring), checked by onnx.checker
    when saved; float32 weights as initializers."""
    check_exportable(config)
    if config.scan_layers:
        params = unscan_params(params, config)
    params = _host(params)
    b, g = config.block, _Graph()
    K, H = b.kv_heads, b.head_size
    x = g.op("Gather", g.const("embed.embedding", _f32(params["embed"]["embedding"])), "input_ids", axis=0)
    if config.positional == "learned":
        x = g.op("Add", x, g.op("Gather", g.const("positions.embedding", _f32(params["positions"]["embedding"])),
                                "position_ids", axis=0))
    rope = None
    if b.rope is not None:
        cos, sin, half = _rope_tables(g, b)
        rope = (cos, sin, half)
    mask = _mask(g)
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, dims) for n, dims in (
        ("input_ids", ["batch", "new_tokens"]), ("position_ids", ["batch", "new_tokens"]),
        ("attention_mask", ["batch", "total_tokens"]))]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "new_tokens", config.vocab_size])]
    for i in range(config.num_layers):
        p = params[f"layer_{i}"]
        h = _norm(g, x, p["attention_block"]["norm"], f"layer_{i}.attention_block.norm", b)
        out, present_k, present_v = _attention(g, h, p["self_attention"], i, b, rope, mask)
        x = g.op("Add", x, out)
        h = _norm(g, x, p["mlp_block"]["norm"], f"layer_{i}.mlp_block.norm", b)
        x = g.op("Add", x, _mlp(g, h, p["mlp"], f"layer_{i}.mlp", b))
        for kind, present in (("key", present_k), ("value", present_v)):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                                                        ["batch", K, "past_tokens", H]))
            g.nodes.append(helper.make_node("Identity", [present], [f"present.{i}.{kind}"], name=f"out_{i}_{kind}"))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT,
                                                         ["batch", K, "total_tokens", H]))
    x = _norm(g, x, params["final_norm"], "final_norm", b)
    if config.tie_embeddings:
        head = g.op("Transpose", "embed.embedding", perm=[1, 0])
    else:
        head = g.const("lm_head", _f32(params["lm_head"]))
    g.nodes.append(helper.make_node("MatMul", [x, head], ["logits"], name="lm_head"))
    graph = helper.make_graph(g.nodes, "lmlab_decoder", inputs, outputs, initializer=g.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="lmlab")


def _host(params) -> dict:
    """Nested dicts of numpy arrays (jax arrays fetched, boxed leaves unboxed)."""
    import flax.linen as nn
    import jax

    return jax.tree.map(np.asarray, nn.unbox(params))


def export_onnx(model: GPT, params, directory: str, *, max_len: int | None = None,
                external_data: bool | None = None) -> dict:
    """Writes `model.onnx` (+ `model.onnx.data`), `manifest.json` and `run_onnx.py` to `directory`.

    Args:
      model, params: a decoder-only `GPT` and its params.
      directory: created if needed; must not already hold an export.
      max_len: the longest sequence (prompt + new tokens) the runner allows (default the
        model's max_len; learned positions stop there, RoPE models only by memory).
      external_data: store the tensors of 1 KB or more in `model.onnx.data` (None: when the weights
        pass 1 GB); shape constants stay in the graph, where shape inference reads them.

    Returns:
      The manifest written.
    """
    if not isinstance(model, GPT):
        raise TypeError(f"ONNX export takes a decoder-only GPT, not a {type(model).__name__}")
    cfg = model.config
    check_exportable(cfg)
    max_len = max_len or cfg.max_len
    if max_len < 1 or (cfg.positional == "learned" and max_len > cfg.max_len):
        raise ValueError(f"max_len={max_len} must be in [1, the model's max_len={cfg.max_len}] (learned positions)")
    os.makedirs(directory, exist_ok=True)
    existing = [f for f in FILES if os.path.exists(os.path.join(directory, f))]
    if existing:
        raise FileExistsError(f"{directory!r} already holds {existing}; choose an empty directory")
    proto = decoder_graph(cfg, params)
    nbytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    external = nbytes > EXTERNAL_DATA_BYTES if external_data is None else external_data
    path = os.path.join(directory, "model.onnx")
    onnx.save_model(proto, path, save_as_external_data=external, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    onnx.checker.check_model(path)  # by path: also works past 2 GB with external data
    b = cfg.block
    manifest = {"vocab_size": cfg.vocab_size, "max_len": max_len, "pad_id": PAD_ID, "num_layers": cfg.num_layers,
                "num_kv_heads": b.kv_heads, "head_dim": b.head_size, "opset": OPSET, "external_data": external,
                "weight_bytes": nbytes}
    with open(os.path.join(directory, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    shutil.copy(RUNNER, os.path.join(directory, "run_onnx.py"))
    return manifest
