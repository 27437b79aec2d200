"""Encoder-decoder Transformer presets (Vaswani et al. 2017, Table 3).

    base: N=6, d_model=512, h=8, d_ff=2048, dropout 0.1, post-LN, sinusoidal positions,
          shared embeddings (63.1M parameters with a 37k vocabulary; the paper reports 65M)
    big:  N=6, d_model=1024, h=16, d_ff=4096, dropout 0.3 (214.2M; the paper reports 213M)
    tiny: 2+2 layers of width 64, for tests and the reversal demo

Run the demo (train `tiny` to reverse digit strings):

    python -m train.seq2seq --config=configs/transformer.py:tiny
"""

from __future__ import annotations

import ml_collections

from models.layers.blocks import BlockConfig
from models.transformer import TransformerConfig

PRESETS = ("tiny", "base", "big")


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    """The run config: `model` (TransformerConfig fields, `block` nested) and `train`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown transformer preset {preset!r}; expected one of {PRESETS}")
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(
        vocab_size=37000, num_encoder_layers=6, num_decoder_layers=6, max_len=512, positional="sinusoidal",
        share_embeddings=True, scale_embeddings=True, final_norm=False, pad_id=0, remat=False,
        block=dict(d_model=512, num_heads=8, num_kv_heads=0, head_dim=0, d_ff=2048, mlp_activation="relu",
                   norm="layernorm", norm_position="post", norm_eps=1e-6, dropout_rate=0.1,
                   attention_dropout_rate=0.0, use_bias=True),
    ))
    # The synthetic reversal task of train/seq2seq.py.
    c.train = ml_collections.ConfigDict(dict(
        seed=0, steps=1000, batch_size=64, learning_rate=1e-3, warmup_steps=100, label_smoothing=0.0,
        min_digits=3, max_digits=10, eval_examples=512, log_every=200,
    ))
    if preset == "big":
        c.model.block.update(d_model=1024, num_heads=16, d_ff=4096, dropout_rate=0.3)
    elif preset == "tiny":
        c.model.update(vocab_size=16, num_encoder_layers=2, num_decoder_layers=2, max_len=32)
        c.model.block.update(d_model=64, num_heads=4, d_ff=256, dropout_rate=0.0)
    return c


def model_config(config: ml_collections.ConfigDict) -> TransformerConfig:
    """Builds the frozen TransformerConfig from a run config's `model` section."""
    m = config.model.to_dict()
    block = m.pop("block")
    # 0 in the ConfigDict means "derive it" (ConfigDict fields keep one type; None would not).
    block["num_kv_heads"] = block["num_kv_heads"] or None
    block["head_dim"] = block["head_dim"] or None
    return TransformerConfig(block=BlockConfig(**block), **m)
