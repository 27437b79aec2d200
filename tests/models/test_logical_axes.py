"""Every parameter of every family carries logical axis names, one per dimension, from the
vocabulary that `sharding/` maps to mesh axes (models never name mesh axes)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from models.bert import BertConfig, BertForMaskedLM
from models.deepseek import deepseek_v3_config
from models.gpt import GPT, llama_config, mixtral_config, qwen2_config, qwen3_config
from models.layers.blocks import BlockConfig
from sharding.strategies import DIMENSIONS, ZERO_DIMS

SMALL = {"vocab_size": 64, "d_model": 32, "num_layers": 2, "num_heads": 4, "d_ff": 64, "max_len": 32,
         "num_kv_heads": 2}
FAMILIES = {
    "llama": lambda: GPT(llama_config(**SMALL)),
    "qwen2": lambda: GPT(qwen2_config(**SMALL)),
    "qwen3": lambda: GPT(qwen3_config(**SMALL, head_dim=16)),
    "mixtral": lambda: GPT(mixtral_config(**SMALL, num_experts=4)),
    "mixtral_scanned": lambda: GPT(dataclasses.replace(mixtral_config(**SMALL, num_experts=4), scan_layers=True)),
    "deepseek_v3": lambda: GPT(deepseek_v3_config(
        vocab_size=64, d_model=32, num_layers=3, num_heads=4, d_ff=64, moe_d_ff=16, num_experts=4,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_dense_layers=1, q_lora_rank=16, kv_lora_rank=8,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_len=32, mtp_depth=1)),
    "bert_mlm": lambda: BertForMaskedLM(BertConfig(vocab_size=64, num_layers=2, max_len=32, block=BlockConfig(
        d_model=32, num_heads=4, d_ff=64, mlp_activation="gelu"))),
}
VOCABULARY = {None, "layers", *DIMENSIONS, *ZERO_DIMS}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_parameter_has_logical_axis_names(family):
    model = FAMILIES[family]()
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.Partitioned), f"{name} has no logical axis names"
        assert len(leaf.names) == leaf.value.ndim, f"{name}: names {leaf.names} for shape {leaf.value.shape}"
        assert set(leaf.names) <= VOCABULARY, f"{name}: {set(leaf.names) - VOCABULARY} not known to sharding/"
        if family.endswith("scanned") and "layers" in name.split("'")[1:2]:
            assert leaf.names[0] == "layers"
