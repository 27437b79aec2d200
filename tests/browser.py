"""What the pages' browser tests (the chat page, the labeling page) share besides the `browser`
fixture of tests/conftest.py: where chromium is, a screenshot's size, keeping the screenshot."""

import os
import shutil
import struct

CHROMIUM = "/usr/bin/chromium"


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails if the file is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def keep_screenshot(path, what: str) -> None:
    """Prints where the screenshot of `what` is and copies it to $LMLAB_ARTIFACTS when that is set."""
    print(f"{what} screenshot: {path}")
    target = os.environ.get("LMLAB_ARTIFACTS")
    if target:
        os.makedirs(target, exist_ok=True)
        print(f"{what} screenshot copied to: {shutil.copy(path, os.path.join(target, os.path.basename(path)))}")
