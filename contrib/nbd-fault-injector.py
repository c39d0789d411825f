#!/usr/bin/env python3
# Stand-in for QEMU's tests/qemu-iotests/nbd-fault-injector.py.
#
# QEMU's iotests run the injector as `$PYTHON nbd-fault-injector.py ARGS`, so
# what sits at that path must be a Python script. This one replaces itself
# with nbdfault, keeping its own name as argv[0]: nbdfault then runs in its
# injector-compatible mode (same arguments, usage, output and exit status).
#
# nbdfault is looked up on PATH, or taken from $NBDFAULT.
import os
import sys

exe = os.environ.get("NBDFAULT", "nbdfault")
try:
    os.execvp(exe, [sys.argv[0]] + sys.argv[1:])
except OSError as e:
    sys.stderr.write("cannot run %s: %s (set NBDFAULT to nbdfault's path)\n" % (exe, e))
    sys.exit(1)
