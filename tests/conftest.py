"""Test set-up shared by the whole suite.

Eight simulated CPU devices are requested here, before anything imports jax, so
that sharding tests see a mesh of 8 while the rest of the suite runs unchanged.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The trainer's persistent compilation cache ("auto": ~/.cache/lmlab/jax_cache) stays off for the
# suite: tests write nothing outside their tmp dirs (tests/train/test_compilation_cache.py points
# it at one).
os.environ["LMLAB_COMPILATION_CACHE_DIR"] = "none"
# Notebooks and demos read this to pick their small sizes when run by the suite.
os.environ.setdefault("LMLAB_QUICK", "1")


import pytest  # after the environment above, which must precede any jax import


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless through playwright, for the pages' browser tests (the chat page, the
    labeling page): skipped where it is missing, a failure instead when LMLAB_REQUIRE_BROWSER is set."""
    from tests.browser import CHROMIUM

    if not os.path.exists(CHROMIUM):
        reason = f"{CHROMIUM} is missing: the browser tests need Debian's chromium (apt-get install chromium)"
        if os.environ.get("LMLAB_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def tiny_gpt_workdir(tmp_path_factory):
    """A 3-step `configs/gpt.py:tiny` run (GPT-2 switches: LayerNorm, gelu_tanh, learned positions,
    tied embeddings), trained once per test process and only read by the tests that take it."""
    from configs.loader import load_config
    from train import trainer

    root = tmp_path_factory.mktemp("tiny_gpt_run")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = load_config(os.path.join(repo, "configs/gpt.py:tiny"),
                         ["steps=3", "schedule.warmup_steps=1", "logging.progress_bar=false", "logging.peak_flops=1e11",
                          "eval.num_samples=1", "eval.sample_tokens=2", "eval.max_batches=1",
                          "checkpoint.async_save=false"])
    trainer.run(config, str(root))
    return str(root)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
    """Drop jax's compiled executables after each test module.

    A worker of `pytest -n 2` runs about a thousand tests in one process. Each XLA:CPU executable
    keeps about three memory mappings, and the kernel allows a process 65,530 (vm.max_map_count):
    a worker that kept every executable of the suite crashed inside an XLA compile at 81%
    (segmentation fault, in CI and locally, never when the test ran alone). Clearing per module
    costs only recompiling what a later module calls again."""
    yield
    import sys

    if "jax" in sys.modules:
        import gc

        sys.modules["jax"].clear_caches()
        gc.collect()
