"""train/cli.py's pieces in-process: the one-line form of an error and when debugging is asked for."""

from train import cli
from train.checkpoint import CheckpointUnreadableError


def test_one_line_collapses_messages_and_marks_unexpected_errors():
    assert cli.one_line(ValueError("bad\n  value\tx")) == "error: bad value x"
    assert cli.one_line(CheckpointUnreadableError("no readable checkpoint")) == "error: no readable checkpoint"
    unexpected = cli.one_line(ZeroDivisionError("division by zero"))
    assert unexpected.startswith("error: ZeroDivisionError: division by zero (unexpected; rerun with --verbose")
    assert "\n" not in cli.one_line(RuntimeError("a\nb"))


def test_debug_is_asked_by_flag_or_environment(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert not cli.wants_debug(["prog", "--x=1"])
    assert cli.wants_debug(["prog", "--verbose"])
    assert not cli.wants_debug(["prog", "--verbose", "--noverbose"])
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    assert cli.wants_debug(["prog"])
    monkeypatch.setenv(cli.DEBUG_ENV, "0")
    assert not cli.wants_debug(["prog"])
