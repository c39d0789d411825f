"""Helpers the package's tests share: the known image's bytes, the tools
they drive (missing ones fail, never skip), and process checks."""

import os
import shutil
import subprocess
import time

import pytest

# The image qemu-nbd serves: 4 MiB, every byte its offset mod 251 (a
# prime, so no two 512-byte blocks are alike).
IMAGE_SIZE = 4 << 20


def image_bytes(offset, length):
    start = offset % 251
    return (bytes(range(251)) * ((start + length) // 251 + 1))[start : start + length]


def require(tool):
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} not found: install it (scripts/test.sh does)")


def alive(pid):
    """Whether pid is a live process (gone or a zombie is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    # A process reaped between the open and the read fails the read with
    # ESRCH (ProcessLookupError), not the open with ENOENT.
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def wait_until(cond, timeout=10.0):
    """Polls cond() until true; False after timeout (a hang guard)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def run(args, **kwargs):
    """Runs a command to the end (a generous hang guard): its output."""
    kwargs.setdefault("timeout", 60)
    return subprocess.run(args, capture_output=True, text=True, **kwargs)


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
