"""`evals.metrics.NAME(...)` is the metric function, as the issue and README spell it, whatever was
imported first (a submodule of the same name must not replace it)."""

import subprocess
import sys

NAMES = ["bleu", "chrf", "rouge", "squad", "bertscore"]


def test_package_names_are_the_functions_after_the_submodules_are_imported():
    code = "\n".join([
        "import importlib, types",
        f"mods = {{n: importlib.import_module('evals.metrics.' + n) for n in {NAMES!r}}}",  # submodules first
        "import evals.metrics as m",
        "for n, mod in mods.items():",
        "    assert isinstance(getattr(m, n), types.FunctionType), (n, getattr(m, n))",
        "    assert getattr(m, n) is getattr(mod, n)",
        "from evals.metrics import bleu, rouge",
        "assert bleu is mods['bleu'].bleu and rouge is mods['rouge'].rouge",
    ])
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_exported_name_is_callable():
    import evals.metrics as m

    assert all(callable(getattr(m, name)) for name in m.__all__)
