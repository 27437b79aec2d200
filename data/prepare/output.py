"""The output directory: refused when it holds something, replaced only once a new run succeeded.

A run writes everything into a sibling staging directory `DIR.partial-<random>` and, when it
has succeeded, swaps it in: `DIR` (the old dataset, with --overwrite) is renamed aside, the
staging directory renamed to `DIR`, and only then is the old one deleted. A run that fails
leaves `DIR` as it was and removes its staging directory. Both renames stay within one parent
directory, so they are cheap and never copy data.
"""

import os
import shutil
import uuid

from data.prepared import PREPARED_FILE, is_prepared


def check_output(output: str, overwrite: bool) -> None:
    """Refuses an output that exists and is not empty, unless it is a prepared dataset and `overwrite`.

    A non-empty directory that is not a prepared dataset is refused even with `overwrite`:
    the run would delete files it did not write.
    """
    if os.path.exists(output) and not os.path.isdir(output):
        raise ValueError(f"--output={output} is a file; give a directory (new, empty, or a prepared dataset "
                         "with --overwrite)")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"--output={output}: its parent directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"--output={output}: its parent directory {parent} is not writable (the run stages "
                              "its output next to it)")
    if not os.path.isdir(output) or not os.listdir(output):
        return
    if not is_prepared(output):
        raise ValueError(f"--output={output} is not empty and holds no prepared dataset (no {PREPARED_FILE}); "
                         "give a new or empty directory (--overwrite replaces only a prepared dataset)")
    if not overwrite:
        raise ValueError(f"--output={output} already holds a prepared dataset; pass --overwrite to replace it "
                         "(the old one stays until the new run has succeeded) or choose another directory")


def staging_dir(output: str) -> str:
    """A new, empty sibling directory of `output` for a run to write into."""
    staging = f"{os.path.abspath(output)}.partial-{uuid.uuid4().hex[:8]}"
    os.makedirs(staging)
    return staging


def commit(staging: str, output: str) -> None:
    """Puts the finished `staging` directory in place of `output` (see the module docstring)."""
    output = os.path.abspath(output)
    old = None
    if os.path.exists(output):
        old = f"{output}.old-{uuid.uuid4().hex[:8]}"
        os.rename(output, old)
    try:
        os.rename(staging, output)
    except OSError:
        if old:
            os.rename(old, output)
        raise
    if old:
        shutil.rmtree(old)


def discard(staging: str) -> None:
    """Removes the staging directory of a failed run."""
    shutil.rmtree(staging, ignore_errors=True)
