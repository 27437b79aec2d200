"""Compress a trained model: `python -m compress --checkpoint=PATH --method=NAME --out=DIR`.

    python -m compress --checkpoint=/tmp/tiny --method=rtn --option=format=int4 --option=group=64 --out=/tmp/q
    python -m inference --checkpoint=/tmp/q --prompt="The "

PATH is a `python -m train` workdir or a Hugging Face directory; DIR becomes a workdir that
`python -m inference` and `python -m evals` load (compress/io.py). Methods and their options:
`compress.methods` (e.g. rtn, gptq, awq, smoothquant, magnitude, wanda).
"""

import json

from absl import app, flags

from compress import io
from train import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A `python -m train` workdir or a Hugging Face directory.")
_METHOD = flags.DEFINE_string("method", None, "The compression method (compress.methods).")
_OPTION = flags.DEFINE_multi_string("option", [], "A method option key=value; repeat the flag.")
_OUT = flags.DEFINE_string("out", None, "The output workdir (new or empty unless --overwrite).")
_STEP = flags.DEFINE_integer("step", None, "The workdir checkpoint step (default: the latest).")
_SAMPLES = flags.DEFINE_integer("calibration_samples", 0, "Calibration sequences (methods that need data).")
_SEQ_LEN = flags.DEFINE_integer("calibration_seq_len", 256, "Tokens per calibration sequence.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a previous output in --out.")
flags.mark_flags_as_required(["checkpoint", "method", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = io.compress(_CHECKPOINT.value, _METHOD.value, _OUT.value, options=_OPTION.value, step=_STEP.value,
                         calibration_samples=_SAMPLES.value, calibration_seq_len=_SEQ_LEN.value,
                         overwrite=_OVERWRITE.value)
    print(json.dumps(io.jsonable(result.info)))
    print(f"# wrote {_OUT.value}")


if __name__ == "__main__":
    cli.run(main)
