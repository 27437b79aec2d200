"""The flags of `python -m data.prepare` and every check of them, before the pipeline starts.

    python -m data.prepare --input=GLOB[,GLOB...] --output=DIR --tokenizer=PATH [--name=NAME]
        [--text_key=text] [--split_paragraphs] [--validation_fraction=0.05] [--num_shards=4]
        [--stages=normalize,langid,quality,pii,exact,minhash,decontam] [--overwrite]
        [--<stage>_<option>=VALUE ...] [Beam pipeline options: --runner=..., --direct_num_workers=...]

Our flags are parsed here (argparse: each stage's `Options` fields become `--<stage>_<field>`
flags, `stage.add_arguments`); every other flag must be a Beam pipeline option, which Beam's
own parser checks (an unknown flag or a bad value is an error here, where Beam would only log a
warning and drop it). Then, in this order and before any work: the stages and their options,
the inputs (each pattern must match a file), the tokenizer (it must load), the output (new,
empty, or a prepared dataset with --overwrite) and the runner (`runners.check_runner`). Each
failure is a ValueError / OSError with one line naming the flag and the fix, which
`train.cli.run` prints as `error: ...`.
"""

import argparse
import os
import re
from collections.abc import Sequence

from data.prepare import output, pipeline, read, runners
from data.prepare.stage import add_arguments, options_from

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


class _Parser(argparse.ArgumentParser):
    """argparse that raises ValueError (one line through train.cli) instead of exiting with usage."""

    def error(self, message):
        raise ValueError(f"{message}; see `python -m data.prepare --help`")


def _beam_parser():
    from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top

    class BeamParser(pipeline_options._BeamArgumentParser):  # pylint: disable=protected-access
        def error(self, message):
            raise ValueError(f"Beam pipeline option: {message}")

    parser = BeamParser(allow_abbrev=False, add_help=False)
    for cls in {str(c): c for c in pipeline_options.PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)  # pylint: disable=protected-access
    return parser


def available_stages() -> dict[str, type]:
    """Stage name -> its Options type, for the stages whose module is in this checkout."""
    found = {}
    for spec in pipeline.STAGES:
        try:
            found[spec.name] = pipeline.options_type(spec)
        except ModuleNotFoundError as e:
            if e.name != spec.module:
                raise
    return found


def make_parser(stages: dict[str, type]) -> argparse.ArgumentParser:
    """The parser of our flags (Beam's options are checked separately)."""
    parser = _Parser(prog="python -m data.prepare", allow_abbrev=False,
                     description="Clean, filter, deduplicate and tokenize text files into array_record shards "
                                 "(Apache Beam). Flags not listed here are Beam pipeline options.")
    parser.add_argument("--input", required=True, help="File patterns, comma-separated: .txt, .jsonl, and their "
                                                       ".gz / .zst versions.")
    parser.add_argument("--output", required=True, help="The output directory (new or empty; a prepared dataset "
                                                        "with --overwrite).")
    parser.add_argument("--tokenizer", required=True, help="The tokenizer (any path data.tokenizer.load_tokenizer "
                                                           "reads); copied into the output.")
    parser.add_argument("--name", default="corpus", help="The TFDS dataset name (lowercase, digits, _).")
    parser.add_argument("--text_key", default="text", help="The JSONL key of the text.")
    parser.add_argument("--split_paragraphs", action="store_true", help="One document per blank-line separated "
                                                                        "paragraph of a .txt file.")
    parser.add_argument("--validation_fraction", type=float, default=0.05,
                        help="The share of documents (by a hash of their id) in the validation split.")
    parser.add_argument("--num_shards", type=int, default=4, help="array_record files per split.")
    parser.add_argument("--stages", default=",".join(pipeline.STAGE_NAMES),
                        help="The stages to run, comma-separated, in the fixed order "
                             f"{','.join(pipeline.STAGE_NAMES)}; 'none' for read -> write.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a prepared dataset in --output "
                                                                 "(only once the new one is complete).")
    parser.add_argument("--verbose", action="store_true", help="Tracebacks and the libraries' logs.")
    for name, options_type in stages.items():
        add_arguments(parser, name, options_type)
    return parser


def parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(our flags, the Beam flags); unknown flags and bad Beam values are errors."""
    parser = make_parser(available_stages())
    args, rest = parser.parse_known_args(list(argv))
    _, unknown = _beam_parser().parse_known_args(rest)
    if unknown:
        raise ValueError(f"unknown flag(s) {unknown}: neither a data.prepare flag (see --help) nor a Beam pipeline "
                         "option")
    return args, rest


def _check_values(args: argparse.Namespace) -> None:
    if not 0.0 < args.validation_fraction < 1.0:
        raise ValueError(f"--validation_fraction={args.validation_fraction} must lie strictly between 0 and 1")
    if args.num_shards < 1:
        raise ValueError(f"--num_shards={args.num_shards} must be at least 1")
    if not NAME_PATTERN.match(args.name):
        raise ValueError(f"--name={args.name!r} is not a TFDS dataset name; use lowercase letters, digits and _ "
                         "(starting with a letter)")


def _stage_options(args: argparse.Namespace, stages: tuple[str, ...]) -> dict:
    """Each chosen stage's Options from the flags, built (and so checked) now."""
    available = available_stages()
    missing = [name for name in stages if name not in available]
    if missing:
        specs = {s.name: s for s in pipeline.STAGES}
        raise ValueError(f"--stages names {missing}, whose module(s) {[specs[n].module for n in missing]} are not in "
                         "this checkout; leave them out of --stages")
    options = {}
    for spec in pipeline.STAGES:
        if spec.name in stages:
            options[spec.name] = options_from(args, spec.name, available[spec.name])
            pipeline.stage_class(spec)(options[spec.name])  # its own checks of the values
    return options


def _check_inputs(patterns: tuple[str, ...]) -> None:
    if not patterns:
        raise ValueError("--input names no file pattern; give --input=GLOB[,GLOB...]")
    for pattern in patterns:
        if not read.matching_files(pattern):
            raise FileNotFoundError(f"--input pattern {pattern!r} matches no file; fix the path or the glob")


def _check_tokenizer(path: str) -> None:
    from data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top

    try:
        load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--tokenizer={path} cannot be loaded: {e}") from None


def config_from(argv: Sequence[str]) -> tuple[pipeline.PrepareConfig, argparse.Namespace, list[str]]:
    """Parses and checks the command line: (the run's config, our flags, Beam's flags)."""
    from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=g-import-not-at-top

    args, beam_args = parse(argv)
    _check_values(args)
    stages = pipeline.parse_stages(args.stages)
    stage_options = _stage_options(args, stages)
    inputs = tuple(os.path.expanduser(p.strip()) for p in args.input.split(",") if p.strip())
    _check_inputs(inputs)
    _check_tokenizer(args.tokenizer)
    output.check_output(args.output, args.overwrite)
    runners.check_runner(PipelineOptions(beam_args))
    config = pipeline.PrepareConfig(
        inputs=inputs, tokenizer=args.tokenizer, name=args.name, text_key=args.text_key,
        split_paragraphs=args.split_paragraphs, validation_fraction=args.validation_fraction,
        num_shards=args.num_shards, stages=stages, stage_options=stage_options)
    return config, args, beam_args
