"""Prepare a corpus: `python -m data.prepare --input=GLOB --output=DIR --tokenizer=PATH [options]`.

    python -m data.prepare --input='raw/*.jsonl.gz,raw/*.txt' --output=/data/prepared \
        --tokenizer=/data/tokenizer --direct_running_mode=multi_processing --direct_num_workers=2
    python -m train --config=configs/gpt.py:tiny --workdir=/tmp/run --config.data.source=prepared:/data/prepared

The flags and their checks: `data.prepare.cli` (`--help` lists them, each stage's options
included); the pipeline: `data.prepare.pipeline`; the runners and cluster launch options:
`data.prepare.runners`. Prints a summary of report.json on success; a bad flag or input is
one line `error: ...` before any work.
"""

import logging
import sys

from train import cli


def _quiet_beam(argv) -> None:
    """Beam (and its root-logger notices, e.g. on the optional GCP packages) at ERROR unless --verbose."""
    if not cli.wants_debug(argv):
        logging.getLogger().setLevel(logging.ERROR)
        logging.getLogger("apache_beam").setLevel(logging.ERROR)


def main(argv) -> None:
    _quiet_beam(sys.argv)
    from data.prepare import cli as prepare_cli  # pylint: disable=g-import-not-at-top
    from data.prepare import pipeline  # pylint: disable=g-import-not-at-top

    config, args, beam_args = prepare_cli.config_from(argv)
    if not cli.wants_debug(sys.argv) and not any(a.startswith("--default_sdk_harness_log_level") for a in beam_args):
        beam_args = [*beam_args, "--default_sdk_harness_log_level=ERROR"]  # worker processes' logs too
    report = pipeline.run(config, args.output, overwrite=args.overwrite, beam_args=beam_args)
    for row in report["stages"]:
        dropped = f", dropped {row['documents_dropped']}" if "documents_dropped" in row else ""
        print(f"{row['stage']:>10}: {row['documents_out']} documents, {row['bytes_out']:,} bytes out{dropped}")
    for split, info in report["splits"].items():
        print(f"{split:>10}: {info['documents']} documents, {info['tokens']:,} tokens")
    print(f"dead letter: {report['dead_letter']['entries']} entries from {len(report['dead_letter']['files'])} files")
    print(f"{report['wall_seconds']:.1f} s, {report['documents_per_second']:.1f} documents/s, "
          f"{report['megabytes_per_second']:.3f} MB/s")
    print(f"# wrote {args.output}")


if __name__ == "__main__":
    # Our flags are argparse's (data.prepare.cli: stage options, Beam's options); absl sees only --verbose.
    cli.run(lambda _: main(sys.argv[1:]),
            argv=[sys.argv[0], *(a for a in sys.argv[1:] if a.startswith(("--verbose", "--noverbose")))])
