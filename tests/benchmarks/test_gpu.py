"""benchmarks/gpu.py runs in quick mode (tiny sizes, float32, CPU) and prints consistent numbers.

No wall-clock time is asserted. The checks: the real 1B and 8B programs lower with their
published parameter counts; the memory-chosen batch fits the budget and is the largest of
those compiled that does; MFU is in (0, 1] and follows from the printed rates; every
attention implementation that runs agrees with xla's outputs and gradients; greedy decode
makes every token it was asked for."""

import json
import math
import types

import jax
import numpy as np
import pytest

from benchmarks import gpu

EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def quick_run():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        results = gpu.main(["--quick"])
    text = out.getvalue()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith('{"section"')]
    return results, text, lines


def test_real_models_lower_with_their_published_parameter_counts(quick_run):
    _, text, lines = quick_run
    lowered = {r["model"]: r for r in lines if r["section"] == "lowered"}
    assert lowered["8b"]["params"] == lowered["8b"]["config_params"] == 8_030_261_248
    assert lowered["1b"]["params"] == lowered["1b"]["config_params"] == 1_235_814_400  # Llama-3.2-1B
    assert lowered["8b"]["remat"] == "full" and lowered["8b"]["param_dtype"] == "bfloat16"
    assert all(r["lowered"] for r in lowered.values())
    assert "8,030,261,248 parameters" in text


def test_mfu_batch_fits_and_rates_are_consistent(quick_run):
    results, text, lines = quick_run
    (row,) = [r for r in lines if r["section"] == "mfu"]
    assert row["strategy"] == "fsdp" and row["scan_layers"] and "skipped" not in row
    tried = dict(row["tried"])
    assert row["compiled_bytes"] == tried[row["batch"]] <= row["budget_bytes"]
    assert row["batch"] == max(b for b, m in tried.items() if m <= row["budget_bytes"])
    assert math.isclose(row["tokens_per_second"], row["batch"] * row["seq_len"] / row["step_seconds"], rel_tol=1e-9)
    config, _ = gpu.model_config("1b", row["seq_len"], quick=True, attention="xla")
    model = gpu.build.model(config, config.tokenizer.vocab_size)
    assert row["params"] == model.config.num_params()
    flops = 3 * model.config.flops_per_token(row["seq_len"]) * row["tokens_per_second"]
    assert math.isclose(row["model_flops_per_second"], flops, rel_tol=1e-9)
    assert 0 < row["mfu_measured"] <= 1
    assert math.isclose(row["mfu_measured"], flops / results["peaks"]["measured"], rel_tol=1e-9)
    assert row["mfu_datasheet"] is None  # a CPU has no datasheet peak
    assert "== training MFU" in text and "MFU meas." in text


def test_every_attention_implementation_that_runs_matches_xla(quick_run):
    _, text, lines = quick_run
    rows = [r for r in lines if r["section"] == "attention"]
    assert {r["impl"] for r in rows} == set(gpu.ATTENTION_IMPLS)
    by_impl = {r["impl"]: r for r in rows}
    assert "skipped" not in by_impl["xla"] and by_impl["xla"]["compiled_bytes"] > 0
    assert "GPU" in by_impl["cudnn"]["skipped"]  # on this CPU
    for r in rows:
        if "skipped" in r:
            assert r["skipped"], r
        elif r["impl"] != "xla":
            # Output and dq, dk, dv: each a sum over at most T keys (or queries), reordered by
            # the blocks; 2 T float32 roundings relative to the largest reference value.
            tol = 2 * r["seq_len"] * EPS32
            for diff, ref in zip(r["max_abs_diff"], r["max_abs_ref"]):
                assert diff <= tol * ref, (r["impl"], diff, ref)
    assert "== attention" in text and "longest T run by xla" in text


def test_decode_makes_every_token_at_each_batch(quick_run):
    _, text, lines = quick_run
    rows = [r for r in lines if r["section"] == "decode"]
    assert [r["batch"] for r in rows] == [1, 4]
    for r in rows:
        assert r["generated"] == r["batch"] * r["new_tokens"]  # greedy, no stop token
        assert math.isclose(r["tokens_per_second"], r["batch"] * r["new_tokens"] / r["seconds"], rel_tol=1e-9)
    assert "new tokens/s" in text


class _FakeProgram:
    """A program whose compiled step needs `fixed + per_row * B` bytes rounded up to 4 KiB."""

    def __init__(self, fixed, per_row):
        self.fixed, self.per_row, self.abstract_state = fixed, per_row, None
        self.step = types.SimpleNamespace(lower=self._lower)

    def abstract_batch(self, batch, seq_len):
        return batch

    def nbytes(self, batch):
        return -(-(self.fixed + self.per_row * batch) // 4096) * 4096

    def _lower(self, state, batch, rng):
        analysis = types.SimpleNamespace(argument_size_in_bytes=self.nbytes(batch), output_size_in_bytes=0,
                                         temp_size_in_bytes=0, alias_size_in_bytes=0,
                                         generated_code_size_in_bytes=0)
        compiled = types.SimpleNamespace(memory_analysis=lambda: analysis)
        return types.SimpleNamespace(compile=lambda: compiled)


@pytest.mark.parametrize("fixed,per_row,budget,multiple,max_batch", [
    (10_000_000, 1_000_000, 50_000_000, 1, 256),
    (10_000_000, 1_000_000, 50_000_000, 8, 256),
    (10_000_000, 1_000_000, 50_000_000, 1, 16),  # capped
    (10_000_000, 1_000_000, 10_500_000, 1, 256),  # only 1 row
    (10_000_000, 1_000_000, 9_000_000, 1, 256),  # nothing fits
])
def test_choose_batch_is_the_largest_multiple_that_fits(fixed, per_row, budget, multiple, max_batch):
    program = _FakeProgram(fixed, per_row)
    batch, _, tried = gpu.choose_batch(program, 64, budget, multiple=multiple, max_batch=max_batch,
                                       rng=jax.random.key(0))
    fitting = [b for b in range(multiple, max_batch + 1, multiple) if program.nbytes(b) <= budget]
    assert batch == (max(fitting) if fitting else None)
    assert all(m == program.nbytes(b) for b, m in tried)


def test_bad_arguments_are_one_line_errors(capsys):
    with pytest.raises(SystemExit):
        gpu.main(["--quick", "--sections=mfu,speed"])
    assert "error: --sections=mfu,speed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu.main(["--quick", "--attention=fast"])
    assert "error: --attention=fast" in capsys.readouterr().err


def test_attention_that_fails_to_compile_falls_back_to_xla(monkeypatch, capsys):
    # On a GPU, cuDNN's attention can fail to compile (an old cuDNN, unsupported shapes); the
    # benchmark then trains with xla and says so. Simulated here: the first compile fails.
    choose_batch, calls = gpu.choose_batch, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("cuDNN attention is not supported here\nmore detail")
        return choose_batch(*args, **kwargs)

    monkeypatch.setattr(gpu, "choose_batch", failing_once)
    args = gpu.parse_args(["--quick", "--attention=blockwise", "--max_batch=1", "--steps=1"])
    row = gpu.train_mfu("1b", args, {"datasheet": None, "measured": 1e12}, 2**28)
    assert row["attention"] == "xla" and len(calls) == 2
    assert "attention blockwise failed to compile (cuDNN attention is not supported here); xla used" in row["notes"]
    assert "xla used" in capsys.readouterr().out
