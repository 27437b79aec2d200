"""`python -m compress` (compress/__main__.py, compress/io.py) end to end: a tiny `python -m train`
run compressed by rtn int4 loads in `python -m inference`, decodes through `generate`, the
engine and the server, exports through `jax.export`, and scores in `evals`; bad input is one
line before any work."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compress import io, methods
from inference.generate import generate, generate_text
from inference.load import load
from models import quant

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPS32 = float(np.finfo(np.float32).eps)


def _run(module, *args):
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env, check=False)


@pytest.fixture(scope="module")
def workdir(tiny_gpt_workdir):
    """A 3-step tiny GPT run (tests/conftest.py)."""
    return tiny_gpt_workdir


def test_train_compress_infer_round_trip(workdir, tmp_path):
    """One test (one trained run per xdist worker): the CLI, the loaded tree, generate, the
    engine, the server, jax.export, evals and the refusals, all on the same compressed workdir."""
    compressed = str(tmp_path / "int4")
    result = _run("compress", f"--checkpoint={workdir}", "--method=rtn", "--option=format=int4",
                  "--option=group=32", "--option=sym=false", f"--out={compressed}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[0])["bits_per_weight"] == pytest.approx(4 + (32 + 8) / 32)
    loaded = _check_loads_quantized(workdir, compressed)
    texts = generate_text(loaded.model, loaded.params, loaded.tokenizer, ["The "], max_new_tokens=12)
    result = _run("inference", f"--checkpoint={compressed}", "--prompt=The ", "--max_new_tokens=12")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "The " + texts[0] + "\n"
    _check_engine_server_export(loaded, tmp_path)
    _check_evals(loaded, compressed)
    _check_refusals(workdir, compressed, tmp_path)


def _check_loads_quantized(workdir, compressed):
    with open(os.path.join(compressed, "config.json")) as f:
        section = json.load(f)["compress"]
    assert section["method"] == "rtn" and section["options"] == {"format": "int4", "group": "32", "sym": "false"}
    assert section["tensors"]["layer_0/self_attention/out"] == {
        "format": "int4", "group": 32, "sym": False, "double_quant": False, "act_quant": False, "lead": 0,
        "contract_axes": [0, 1]}
    loaded, original = load(compressed), load(workdir)
    kernels = [x for x in jax.tree_util.tree_leaves(loaded.params, is_leaf=quant.is_quantized)
               if quant.is_quantized(x)]
    assert len(kernels) == len(section["tensors"]) and all(k.codes.dtype == jnp.uint8 for k in kernels)
    # The stored tree is rtn's own: equal to quantizing the original params again.
    again = quant.quantize_params(original.params, fmt="int4", group=32, sym=False)
    for a, b in zip(jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return loaded


def _check_engine_server_export(loaded, tmp_path):
    import openai

    from inference.engine import Engine, Request
    from inference.export import export_decoder
    from inference.run_exported import greedy
    from inference.serve.app import create_app
    from inference.serve.testing import running_server

    prompt = [loaded.tokenizer.bos_id] + loaded.tokenizer.encode("The cache")
    alone = generate(loaded.model, loaded.params, [prompt], max_new_tokens=8)[0]
    engine = Engine(loaded.model, loaded.params, num_slots=2, max_len=48)
    rid = engine.submit(Request(prompt, max_new_tokens=8))
    while engine.busy:
        engine.step()
    assert engine.results[rid] == alone

    export_decoder(loaded.model, loaded.params, str(tmp_path / "export"), max_len=32)
    assert greedy(str(tmp_path / "export"), [prompt], 8) == [alone]

    eos = loaded.tokenizer.eos_id
    tokens = generate(loaded.model, loaded.params, [prompt], max_new_tokens=8, stop_tokens=(eos,))[0]
    with running_server(create_app(loaded, model_name="q", num_slots=2, max_len=48)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        out = client.completions.create(model="q", prompt="The cache", max_tokens=8, temperature=0)
    assert out.choices[0].text == loaded.tokenizer.decode([t for t in tokens if t != eos])


def _check_evals(loaded, compressed):
    """evals' rolling log-likelihood of a text equals the sum of the quantized model's own
    log-probabilities, to float32 summation order (the bound of tests/models/test_quant_kernels.py
    per logit; a log-probability moves by at most twice its logits' error)."""
    from evals.lm import ModelLM

    text = "The cache holds the keys and the values."
    scored = ModelLM.from_path(compressed, batch_size=2).loglikelihood_rolling([text])[0]
    ids = [loaded.tokenizer.bos_id] + loaded.tokenizer.encode(text)
    logits = jax.jit(lambda p, x: loaded.model.apply({"params": p}, x))(loaded.params, jnp.asarray([ids]))[0]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    direct = float(sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1)))
    cfg = loaded.model.config
    per_logit = (2 * cfg.num_layers + 1) * max(cfg.block.d_ff, cfg.vocab_size) * EPS32 * float(jnp.abs(logits).max())
    assert math.isfinite(scored) and abs(scored - direct) <= 2 * per_logit * len(ids)


def _check_refusals(workdir, compressed, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    (full / "kept.txt").write_text("x")
    other = str(tmp_path / "o")
    cases = [
        ({"checkpoint": str(tmp_path / "missing"), "method": "rtn", "out": other}, "is not a directory"),
        ({"checkpoint": workdir, "method": "gptqq", "out": other}, "--method='gptqq' is not a compression"),
        ({"checkpoint": workdir, "method": "rtn", "out": other, "options": ["bits=4"]}, "has no option 'bits'"),
        ({"checkpoint": workdir, "method": "rtn", "out": str(full)},
         "exists and is not empty; pick a new directory or pass --overwrite"),
        ({"checkpoint": workdir, "method": "rtn", "out": other, "options": ["group=48"]},
         "--option=group=48 does not divide"),
        ({"checkpoint": compressed, "method": "rtn", "out": other}, "is already quantized"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as e:
            io.compress(**kwargs)
        assert message in str(e.value) and "\n" not in str(e.value)
    assert (full / "kept.txt").read_text() == "x" and not (tmp_path / "o").exists()
    # --overwrite replaces only what a compress run writes
    io.compress(workdir, "rtn", str(full), options=["format=int8"], overwrite=True)
    io.compress(workdir, "rtn", str(full), options=["format=fp8"], overwrite=True)
    assert (full / "kept.txt").read_text() == "x"
    assert {x.kind for x in jax.tree_util.tree_leaves(load(str(full)).params, is_leaf=quant.is_quantized)
            if quant.is_quantized(x)} == {"fp8"}

    @methods.register("bert_only_for_test", kind="prune", families=("bert",))
    def bert_only(source, calibration, options):  # never runs: refused by family first
        raise AssertionError("ran")

    try:
        with pytest.raises(ValueError, match="does not apply to model family 'gpt'"):
            io.compress(workdir, "bert_only_for_test", str(tmp_path / "o"))
    finally:
        del methods.METHODS["bert_only_for_test"]
    result = _run("compress", f"--checkpoint={workdir}", "--method=nope", f"--out={tmp_path / 'o'}")
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith("error: --method='nope'")


def test_a_hugging_face_directory_compresses_to_a_workdir(tmp_path):
    import torch
    import transformers

    from data.tokenizer import ByteLevelBPE
    from data.tokenizer.hf_json import export_bpe

    hf_dir = tmp_path / "hf"
    bpe = ByteLevelBPE.train("The cache holds the keys and the values of every token seen so far. " * 8, 280)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=bpe.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, bos_token_id=None, eos_token_id=None)
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir, safe_serialization=True)
    export_bpe(bpe, hf_dir / "tokenizer.json")

    out = tmp_path / "nf4"
    result = io.compress(str(hf_dir), "rtn", str(out), options=["format=nf4", "group=16"])
    assert result.config.model.family == "llama" and result.config.init_from == f"hf:{hf_dir}"
    loaded, original = load(str(out)), load(str(hf_dir))
    assert loaded.tokenizer.vocab_size == bpe.vocab_size
    assert all(x.kind == "nf4" for x in jax.tree_util.tree_leaves(loaded.params, is_leaf=quant.is_quantized)
               if quant.is_quantized(x))
    # The stored model is the original's nf4 quantization: its logits equal the dequantized float model's.
    again = quant.dequantize_tree(quant.quantize_params(original.params, fmt="nf4", group=16))
    ids = jnp.asarray([bpe.encode("The cache holds")])
    ours = np.asarray(jax.jit(lambda p: loaded.model.apply({"params": p}, ids))(loaded.params))
    theirs = np.asarray(jax.jit(lambda p: original.model.apply({"params": p}, ids))(again))
    cfg = loaded.model.config
    bound = (2 * cfg.num_layers + 1) * max(cfg.block.d_ff, cfg.vocab_size) * EPS32 * np.abs(theirs).max()
    assert np.abs(ours - theirs).max() <= bound
