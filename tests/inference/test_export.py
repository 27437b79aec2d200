"""inference/export.py: serialized prefill and decode, loaded in a fresh process that imports
only jax and numpy (inference/run_exported.py, copied into the export), give the tokens of
`generate`; one export serves any batch size and prompt length (symbolic B and T)."""

import ast
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inference import generate
from inference import run_exported as loader
from inference.export import LOADER, export_decoder
from models.deepseek import deepseek_v3_config
from models.gpt import GPT, llama_config
from models.random_params import random_params

CONFIGS = {
    "llama_gqa": llama_config(vocab_size=40, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
                              max_len=32),
    "deepseek_v3_mla_moe": deepseek_v3_config(
        vocab_size=40, d_model=32, num_layers=2, num_heads=4, d_ff=40, moe_d_ff=12, num_experts=4,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_dense_layers=1, q_lora_rank=16, kv_lora_rank=12,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_len=32),
}
PROMPTS = [[3, 17, 8, 22], [5], [9, 30, 2, 11, 6, 14, 1]]
LMLAB_PACKAGES = ("models", "inference", "train", "data", "configs", "sharding", "flax")
# Runs the copied loader as a script, then fails if any lmlab package (or flax) was imported.
RUNNER = """
import json, runpy, sys
argv, packages = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.argv = argv
runpy.run_path(argv[0], run_name="__main__")
imported = sorted({m.split(".")[0] for m in sys.modules} & set(packages))
assert not imported, f"the loader imported {imported}"
"""


def run_exported(directory, prompts, max_new_tokens, stop_tokens=()):
    """The loader in a fresh python, from the export directory, without lmlab on the path."""
    argv = [os.path.join(directory, "run_exported.py"), str(directory), *[f"--prompt_ids={','.join(map(str, p))}"
                                                                          for p in prompts],
            f"--max_new_tokens={max_new_tokens}", f"--stop_tokens={','.join(map(str, stop_tokens))}"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(argv), json.dumps(LMLAB_PACKAGES)],
                            cwd=directory, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("family", CONFIGS)
def test_exported_greedy_decoding_equals_generate_in_a_fresh_process(family, tmp_path):
    cfg = CONFIGS[family]
    model = GPT(cfg)
    params = random_params(model)
    manifest = export_decoder(model, params, str(tmp_path), max_len=24)
    sizes = {f: os.path.getsize(tmp_path / f) for f in ("prefill.jax", "decode.jax", "params.npz")}
    print(f"\n{family}: {manifest}, file sizes {sizes}")

    ours = generate(model, params, PROMPTS, max_new_tokens=10)
    stop = ours[0][3]
    assert run_exported(tmp_path, PROMPTS, 10) == ours
    # Another batch size and prompt length from the same files, with a stop token.
    assert run_exported(tmp_path, PROMPTS[2:], 12, (stop,)) == generate(model, params, PROMPTS[2:],
                                                                         max_new_tokens=12, stop_tokens=(stop,))
    with pytest.raises(FileExistsError):
        export_decoder(model, params, str(tmp_path))


def test_loader_imports_only_the_standard_library_jax_and_numpy():
    with open(LOADER) as f:
        tree = ast.parse(f.read())
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert modules <= {"argparse", "json", "os", "sys", "jax", "numpy"}, modules


def test_bfloat16_params_export_and_load_back_exactly(tmp_path):
    """numpy cannot read back the |V2 bytes it writes for bfloat16: the export stores the bits
    (uint16) and the manifest the dtype, and the loader restores the same values and tokens."""
    model = GPT(CONFIGS["llama_gqa"])
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), random_params(model))
    manifest = export_decoder(model, params, str(tmp_path), max_len=24)
    assert set(manifest["param_dtypes"].values()) == {"bfloat16"}
    _, _, _, loaded = loader.load(str(tmp_path))
    for want, got in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(loaded)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(got.view(np.uint16), np.asarray(want).view(np.uint16))
    assert run_exported(tmp_path, PROMPTS, 10) == generate(model, params, PROMPTS, max_new_tokens=10)


def test_out_of_range_prompt_ids_are_a_one_line_error(tmp_path):
    model = GPT(CONFIGS["llama_gqa"])
    export_decoder(model, random_params(model), str(tmp_path), max_len=24)
    result = subprocess.run([sys.executable, str(tmp_path / "run_exported.py"), str(tmp_path),
                             "--prompt_ids=3,40,2", "--prompt_ids=-1"], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode != 0 and not result.stdout
    assert result.stderr.strip().splitlines()[-1] == (
        "error: prompt token ids [-1, 40] are outside the model's vocabulary [0, 40); "
        "pass ids of the tokenizer the model was trained with")
    assert "Traceback" not in result.stderr
