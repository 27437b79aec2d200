"""Serve the labeling page for one annotator: `python -m annotate --tasks=FILE --out=DIR --annotator=NAME`.

    python -m annotate --tasks=pairs.jsonl --out=labels/ --annotator=alice --port=8100
    python -m annotate --tasks=items.jsonl --labels=negative,neutral,positive --out=labels/ --annotator=bob

Open http://127.0.0.1:PORT/ and judge with the buttons or the keys. Each judgment is appended
to DIR/NAME.jsonl at once; starting again with the same flags resumes at the first item not
judged. The task file's forms: `annotate.tasks`; what to do with DIR: `annotate.agreement`,
`annotate.merge`.
"""

import socket
import sys

import uvicorn
from absl import app, flags

from annotate import tasks as tasks_lib
from annotate.app import create_app
from annotate.store import AnnotatorFile, check_annotator
from train import cli

_TASKS = flags.DEFINE_string("tasks", None, "The JSONL task file (preference pairs or items to label).")
_OUT = flags.DEFINE_string("out", None, "The directory of the annotators' files (DIR/NAME.jsonl).")
_ANNOTATOR = flags.DEFINE_string("annotator", None, "Your name: letters, digits, '_', '.', '-'.")
_LABELS = flags.DEFINE_list("labels", [], "The label set of a class-label task, in order (or the file's first line).")
_SHUFFLE_SIDES = flags.DEFINE_bool("shuffle_sides", False, "Pairs: show b on the left for about half of the items "
                                   "(against position bias); the files still say a and b of the task file.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to bind (loopback by default; the page has no login).")
_PORT = flags.DEFINE_integer("port", 8100, "Port to listen on.")
flags.mark_flags_as_required(["tasks", "out", "annotator"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not 0 <= _PORT.value < 65536:
        raise ValueError(f"--port={_PORT.value} must be in [0, 65535]")
    check_annotator(_ANNOTATOR.value)
    tasks = tasks_lib.read(_TASKS.value, _LABELS.value)
    listener = _listen(_HOST.value, _PORT.value)
    store = AnnotatorFile(_OUT.value, _ANNOTATOR.value, tasks)
    port = listener.getsockname()[1]
    print(f"# {len(tasks.items)} {tasks.kind} tasks, {len(store.rows)} judged by {store.annotator} "
          f"({store.path}); open http://{_HOST.value}:{port}/", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(create_app(tasks, store, shuffle_sides=_SHUFFLE_SIDES.value), log_level="warning"))
    server.run(sockets=[listener])


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, so that a port in use is one line before the file is opened."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError as e:
        raise ValueError(f"cannot listen on --host={host} --port={port} ({e.strerror or e}); pick another port "
                         "(another annotator's server may have it)") from None
    return listener


if __name__ == "__main__":
    cli.run(main)  # errors as one line `error: ...`
