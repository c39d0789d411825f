#!/usr/bin/env python3
# group: rw quick
#
# An iotest in the style of QEMU's tests/qemu-iotests, written with the
# nbdfault package: qemu-io against an image exported by qemu-nbd, through
# nbdfault, with faults injected and changed while the test runs.
#
#   NBDFAULT=target/release/nbdfault PYTHONPATH=python python3 python/examples/iotest_nbd_errors.py
#
# Needs qemu-img, qemu-io and qemu-nbd (Debian: qemu-utils).

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import unittest

import nbdfault

IMG_SIZE = 4 << 20


def qemu_io(uri, *cmds):
    """qemu-io's output for cmds, its timing lines filtered out, as
    iotests' filter_qemu_io does."""
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    out = subprocess.run(args + [uri], capture_output=True, text=True, timeout=60)
    text = out.stdout + out.stderr
    return re.sub(r"^.* ops; .* sec \(.*\)\n", "", text, flags=re.M)


def wait_for_socket(path, proc, timeout=20):
    """Returns once the unix socket accepts connections."""
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(path)
                return
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
        time.sleep(0.01)


class TestNbdErrors(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="iotest-")
        img = os.path.join(self.dir, "test.img")
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", img, str(IMG_SIZE)], check=True)
        self.assertEqual(qemu_io(img, "write -P 0xa5 0 4M"), "wrote 4194304/4194304 bytes at offset 0\n")
        sock = os.path.join(self.dir, "qemu-nbd.sock")
        self.qemu_nbd = subprocess.Popen(["qemu-nbd", "--persistent", "-f", "raw", "-k", sock, img])
        wait_for_socket(sock, self.qemu_nbd)
        self.proxy = nbdfault.Proxy(
            upstream=sock,
            rules=[{"name": "eio-at-1m", "event": "request", "command": "read",
                    "offset": "1M..2M", "action": "error", "errno": "EIO"}],
        ).start()
        self.uri = self.proxy.uri

    def tearDown(self):
        self.proxy.stop()
        self.qemu_nbd.terminate()
        self.qemu_nbd.wait()
        shutil.rmtree(self.dir)

    def test_read_error_reaches_qemu_io(self):
        self.assertEqual(
            qemu_io(self.uri, "read -P 0xa5 0 64k", "read 1M 4k", "read -P 0xa5 2M 4k"),
            "read 65536/65536 bytes at offset 0\n"
            "read failed: Input/output error\n"
            "read 4096/4096 bytes at offset 2097152\n",
        )
        self.assertEqual([f["offset"] for f in self.proxy.faults()], [1 << 20])

    def test_enospc_added_while_running(self):
        self.proxy.add_rules(
            "rules:\n"
            "  - name: full-disk\n"
            "    event: request\n"
            "    command: write\n"
            "    offset: 3M..\n"
            "    action: error\n"
            "    errno: ENOSPC\n"
        )
        self.assertEqual(
            qemu_io(self.uri, "write -P 0x5a 0 4k", "write -P 0x5a 3M 4k"),
            "wrote 4096/4096 bytes at offset 0\n"
            "write failed: No space left on device\n",
        )
        self.proxy.remove_rule("full-disk")
        self.assertEqual(
            qemu_io(self.uri, "write -P 0x5a 3M 4k", "read -P 0x5a 3M 4k"),
            "wrote 4096/4096 bytes at offset 3145728\n"
            "read 4096/4096 bytes at offset 3145728\n",
        )
        self.assertEqual(self.proxy.metrics().value("nbdfault_faults_total", rule="full-disk"), 1)


if __name__ == "__main__":
    unittest.main()
