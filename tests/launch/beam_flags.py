"""Reading a rendered data.prepare command's flags with Beam's own PipelineOptions (apache-beam 2.77)."""

from apache_beam.options import pipeline_options as po
from apache_beam.runners.portability.portable_runner import PortableRunner
from apache_beam.transforms import environments

# data.prepare's own flags: Beam leaves them to the program (core's CLI parses them).
PREPARE_FLAGS = ("--input=", "--output=", "--tokenizer=", "--overwrite", "--stages=")


def beam_flags(argv: list[str]) -> list[str]:
    """The flags after `-m data.prepare` that are not data.prepare's own."""
    args = argv[argv.index("data.prepare") + 1:]
    return [a for a in args if not a.startswith(PREPARE_FLAGS)]


def parse(argv: list[str]) -> tuple[po.PipelineOptions, environments.Environment]:
    """Beam's options of the command, every flag known to Beam, and the SDK environment they ask for.

    Raises (in the test): a flag Beam does not know (left over by get_all_options), or a value
    its parser refuses (argparse exits: e.g. a Flink version Beam has no runner for).
    """
    flags = beam_flags(argv)
    options = po.PipelineOptions(flags)
    unknown = [f for f in flags if f.split("=", 1)[0].lstrip("-") not in options.get_all_options()]
    assert not unknown, f"flags apache-beam does not know: {unknown}"
    options.get_all_options(retain_unknown_options=False)  # argparse checks every value (choices, types)
    return options, PortableRunner._create_environment(options)  # the environment the runner would start
