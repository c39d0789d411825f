"""Fixtures of the package's tests: a real qemu-nbd serving an image of
known bytes, and libnbd handles closed after each test."""

import socket
import subprocess

import pytest

from support import IMAGE_SIZE, image_bytes, require, wait_until

# The package's own fixtures, from the source tree (installed, its entry
# point would load them; the two are one plugin).
pytest_plugins = ["nbdfault.pytest_plugin"]


@pytest.fixture
def qemu_nbd(tmp_path):
    """A qemu-nbd serving the known image on a unix socket: its path."""
    require("qemu-nbd")
    image = tmp_path / "disk.img"
    image.write_bytes(image_bytes(0, IMAGE_SIZE))
    sock = tmp_path / "qemu-nbd.sock"
    log = open(tmp_path / "qemu-nbd.log", "wb")
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "--persistent", "--shared=16", "-k", str(sock), str(image)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )

    def accepts():
        if proc.poll() is not None:
            pytest.fail(f"qemu-nbd exited: {(tmp_path / 'qemu-nbd.log').read_text()}")
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(sock))
                return True
            except OSError:
                return False

    try:
        assert wait_until(accepts), "qemu-nbd did not listen"
        yield str(sock)
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture
def nbd_handle():
    """nbd.NBD handles, shut down after the test: ``h = nbd_handle(uri)``."""
    import nbd

    handles = []

    def connect(uri):
        h = nbd.NBD()
        h.connect_uri(uri)
        handles.append(h)
        return h

    yield connect
    for h in handles:
        try:
            h.shutdown()
        except nbd.Error:
            pass
    # libnbd 1.14 has no close(): a handle is closed when collected.
    handles.clear()
