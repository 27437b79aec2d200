"""Integrity of saved checkpoints: a manifest of SHA-256 sums per step, and retried reads.

    write_manifest(step_dir)          # after the step is committed (primary process)
    reason = verify_manifest(step_dir)  # None: every file matches (or no manifest)

Orbax has no checksums: flipped bytes inside an array chunk restore as wrong numbers.
The manifest `lmlab_manifest.json` lists every file of the step with its SHA-256, so
that any changed, truncated or missing file is found before the step is read. A read
that fails with an OSError is an I/O problem, not corruption: `retrying` tries it again
and then raises `CheckpointReadError`, so that a flaky disk never gets a good step
moved aside.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

log = logging.getLogger(__name__)

MANIFEST = "lmlab_manifest.json"  # SHA-256 of every file of a committed step
READ_ATTEMPTS = 3  # reads failing with an OSError are tried this often before giving up
RETRY_DELAY_S = 1.0  # doubled after each failed attempt


class CheckpointReadError(OSError):
    """Reading a checkpoint failed with an I/O error after every retry (not corruption)."""


def write_manifest(step_dir) -> None:
    """Writes `step_dir/lmlab_manifest.json`: the SHA-256 of every file under the step."""
    root = os.fspath(step_dir)
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root)
            if relative != MANIFEST and not relative.startswith(MANIFEST + "."):
                files[relative] = sha256_file(path)
    tmp = os.path.join(root, f"{MANIFEST}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump({"algorithm": "sha256", "files": dict(sorted(files.items()))}, f, indent=1)
    os.replace(tmp, os.path.join(root, MANIFEST))  # atomic: a manifest is whole or absent


def verify_manifest(step_dir) -> str | None:
    """Checks the files of a step against its manifest.

    Returns:
      None when every file matches (or the step has no manifest), else what is corrupt.

    Raises:
      CheckpointReadError: a file could not be read, READ_ATTEMPTS times (an I/O error, not
        corruption).
    """
    root = os.fspath(step_dir)
    manifest_path = os.path.join(root, MANIFEST)
    if not os.path.exists(manifest_path):
        return None
    try:
        text = retrying(lambda: _read_text(manifest_path), manifest_path)
        files = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is not a valid manifest"
    for relative, digest in files.items():
        path = os.path.join(root, relative)
        try:
            actual = retrying(lambda p=path: sha256_file(p), path)
        except FileNotFoundError:
            return f"{relative} is missing (listed in {MANIFEST})"
        if actual != digest:
            return f"{relative} does not match its SHA-256 in {MANIFEST} (its bytes changed after the save)"
    return None


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def retrying(read, what: str):
    """read(), retried after an OSError (a missing file is no I/O error: raised at once);
    CheckpointReadError after READ_ATTEMPTS failures."""
    delay = RETRY_DELAY_S
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return read()
        except FileNotFoundError:
            raise
        except OSError as e:
            if attempt == READ_ATTEMPTS:
                raise CheckpointReadError(
                    f"reading {what} failed {READ_ATTEMPTS} times ({_short(e)}); an I/O error, not corruption, "
                    "so the checkpoint was left in place: check the filesystem and run the same command again"
                ) from e
            log.warning("reading %s failed (%s); retrying in %.1f s", what, _short(e), delay)
            time.sleep(delay)
            delay *= 2


def _short(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {text}"
