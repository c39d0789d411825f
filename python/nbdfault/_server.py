"""One nbdfault process for a test: found, started with private sockets,
waited for, steered, and always stopped.

Everything it needs lives in a private temporary directory (owner-only):
the NBD socket, the control socket, the rules files and the event trace.
The process is started with ``--exit-with-parent``, so even a test process
killed with SIGKILL leaves nothing running; a normal exit of the
interpreter stops every server still running (atexit).
"""

import atexit
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import warnings
import weakref
from pathlib import Path

from ._control import Control, rules_body
from ._metrics import parse_metrics

__all__ = ["NbdfaultError", "Proxy", "Null", "find_binary"]

START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
# How long faults() waits for the trace to catch up with the fault count.
TRACE_WAIT = 5.0


class NbdfaultError(Exception):
    """nbdfault could not be found, did not start, or died; the message
    carries the command line and what it wrote on stderr."""


def find_binary():
    """The nbdfault binary: ``$NBDFAULT``, else ``nbdfault`` on PATH, else
    ``target/release/nbdfault`` of the source tree this package is in."""
    env = os.environ.get("NBDFAULT")
    if env:
        if not os.access(env, os.X_OK):
            raise NbdfaultError(f"NBDFAULT={env}: not an executable file")
        return env
    found = shutil.which("nbdfault")
    if found:
        return found
    repo = Path(__file__).resolve().parent.parent.parent
    built = repo / "target" / "release" / "nbdfault"
    if (repo / "Cargo.toml").is_file() and os.access(built, os.X_OK):
        return str(built)
    raise NbdfaultError(
        "cannot find the nbdfault binary: set NBDFAULT=/path/to/nbdfault, put it on "
        "PATH (cargo install --path .), or build it in the source tree "
        "(cargo build --release)"
    )


# Servers still running, stopped when the interpreter exits normally.
_running = weakref.WeakSet()


@atexit.register
def _stop_all():
    for s in list(_running):
        s.stop()


class _Server:
    """What Proxy and Null share; use those."""

    def __init__(
        self,
        subcommand,
        *,
        rules=None,
        rules_yaml=None,
        rules_files=(),
        seed=None,
        listen=None,
        trace=True,
        write_cache=None,
        write_back=None,
        binary=None,
        extra_args=(),
        env=None,
        start_timeout=START_TIMEOUT,
        stop_timeout=STOP_TIMEOUT,
    ):
        self._subcommand = list(subcommand)
        self._rules = rules
        self._rules_yaml = rules_yaml
        self._rules_files = [str(f) for f in rules_files]
        self._seed = seed
        self._listen = listen
        self._trace = trace
        self._write_cache = write_cache
        self._write_back = write_back
        self._binary = binary
        self._extra_args = [str(a) for a in extra_args]
        self._env = env
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._proc = None
        self._dir = None
        self._stderr = []
        self._stderr_lock = threading.Lock()
        self._readers = []
        self._faults = []
        self._trace_pos = 0
        self.uri = None
        self.args = None
        self.returncode = None

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        died = self._proc is not None and self._proc.poll() not in (None, 0)
        self.stop()
        if died and exc_type is None:
            raise NbdfaultError(
                f"nbdfault died during the test (status {self.returncode}):\n"
                f"{self.stderr}"
            )

    def start(self):
        """Starts the process and returns once clients can connect."""
        if self._proc is not None:
            raise NbdfaultError("already started")
        binary = self._binary or find_binary()
        self._dir = Path(tempfile.mkdtemp(prefix="nbdfault-"))
        try:
            self.args = [binary, *self._subcommand, *self._private_args()]
            self._proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env,
            )
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
            raise
        _running.add(self)
        try:
            self.uri = self._wait_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def _private_args(self):
        d = self._dir
        args = [
            "--listen",
            self._listen or str(d / "nbd.sock"),
            "--control",
            str(d / "control.sock"),
            "--exit-with-parent",
        ]
        if self._trace:
            args += ["--trace", str(d / "trace.jsonl")]
        files = list(self._rules_files)
        if self._rules is not None:
            # JSON is YAML: one parser, one set of error messages.
            path = d / "rules.yaml"
            path.write_bytes(rules_body(self._rules)[0])
            files.append(str(path))
        if self._rules_yaml is not None:
            path = d / "rules-text.yaml"
            path.write_text(self._rules_yaml)
            files.append(str(path))
        for f in files:
            args += ["--rules", f]
        if self._seed is not None:
            args += ["--seed", str(self._seed)]
        # True: the default size; a size ("64M", bytes) sets it.
        if self._write_cache not in (None, False):
            args += ["--write-cache", "volatile"]
            if self._write_cache is not True:
                args += ["--cache-size", str(self._write_cache)]
        if self._write_back is not None:
            args += ["--write-back", str(self._write_back)]
        return args + self._extra_args

    def _wait_listening(self):
        lines = []
        found = threading.Event()

        def read_stdout(out):
            # Drained for the whole life of the process: it never blocks
            # on a full pipe.
            for raw in out:
                line = raw.decode(errors="replace").rstrip("\n")
                if not found.is_set():
                    lines.append(line)
                    if line.startswith("Listening on "):
                        found.set()

        def read_stderr(err):
            for raw in err:
                with self._stderr_lock:
                    self._stderr.append(raw.decode(errors="replace"))

        for target, pipe in ((read_stdout, self._proc.stdout), (read_stderr, self._proc.stderr)):
            t = threading.Thread(target=target, args=(pipe,), daemon=True, name="nbdfault-pipe")
            t.start()
            self._readers.append(t)
        deadline = time.monotonic() + self._start_timeout
        while not found.wait(0.02):
            if self._proc.poll() is not None:
                # Its last words may still be in the pipe.
                for t in self._readers:
                    t.join(1.0)
                if found.is_set():
                    break
                raise NbdfaultError(
                    f"nbdfault exited with status {self._proc.returncode} before "
                    f"listening: {' '.join(self.args)}\n{self.stderr}"
                )
            if time.monotonic() > deadline:
                raise NbdfaultError(
                    f"nbdfault did not listen within {self._start_timeout} s: "
                    f"{' '.join(self.args)}\n{self.stderr}"
                )
        return next(l for l in lines if l.startswith("Listening on "))[len("Listening on "):]

    def stop(self):
        """SIGTERM, then SIGKILL if it has not exited after
        ``stop_timeout``; removes the private directory. The exit status
        (negative: killed by that signal). Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(self._stop_timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for t in self._readers:
                t.join(self._stop_timeout)
            proc.stdout.close()
            proc.stderr.close()
            self.returncode = proc.returncode
        _running.discard(self)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        return self.returncode

    # -- what it is --------------------------------------------------------

    @property
    def pid(self):
        return self._proc.pid if self._proc else None

    @property
    def stderr(self):
        """Everything it wrote on stderr so far (its log)."""
        with self._stderr_lock:
            return "".join(self._stderr)

    @property
    def dir(self):
        """The private directory (sockets, rules files, trace)."""
        return self._dir

    @property
    def socket(self):
        """The NBD unix socket's path (None when listening on TCP)."""
        prefix = "nbd+unix:///?socket="
        return self.uri[len(prefix):] if self.uri and self.uri.startswith(prefix) else None

    def _control(self):
        if self._proc is None:
            raise NbdfaultError("not running")
        return Control(str(self._dir / "control.sock"))

    # -- rules -------------------------------------------------------------

    def rules(self):
        """The rules in force, each with its ``matched`` and ``fired``
        counts (``GET /rules``)."""
        return self._control().json("GET", "/rules")["rules"]

    def add_rules(self, rules):
        """Adds rules after the others: a list of rule dicts, a whole
        document (dict) or YAML text. Returns the rules now in force."""
        body, ctype = rules_body(rules)
        return self._control().json("POST", "/rules", body, ctype)["rules"]

    def set_rules(self, rules):
        """Replaces every rule (as add_rules takes them)."""
        body, ctype = rules_body(rules)
        return self._control().json("PUT", "/rules", body, ctype)["rules"]

    def remove_rule(self, name):
        self._control().request("DELETE", "/rules/" + Control.quote(name))

    # -- connections -------------------------------------------------------

    def connections(self):
        """The live connections: id, client, export, started, bytes each
        way, requests in flight, paused."""
        return self._control().json("GET", "/connections")["connections"]

    def wait_connections(self, count=1, timeout=10.0):
        """The connections once at least ``count`` are open."""
        deadline = time.monotonic() + timeout
        while True:
            conns = self.connections()
            if len(conns) >= count:
                return conns
            if time.monotonic() > deadline:
                raise NbdfaultError(
                    f"{len(conns)} connection(s) after {timeout} s, waited for {count}"
                )
            time.sleep(0.02)

    def pause(self, conn_id):
        """Holds every message of the connection from the next one on."""
        return self._control().json("POST", f"/connections/{int(conn_id)}/pause")

    def resume(self, conn_id):
        return self._control().json("POST", f"/connections/{int(conn_id)}/resume")

    def disconnect(self, conn_id):
        """Cuts the connection."""
        self._control().request("DELETE", f"/connections/{int(conn_id)}")

    # -- power loss --------------------------------------------------------

    def power_loss(self, lose=None, torn=None, seed=None):
        """Pulls the plug of the volatile write cache (started with
        ``write_cache``): the writes not yet flushed are lost (``lose="all"``,
        the default) or a seeded subset of them lands (``lose="some"``,
        ``torn=512`` or ``4096`` to tear them), then every connection is
        reset (``POST /power-loss``). What it took: ``lost_writes``,
        ``lost_bytes``, ``kept``, ``connections_reset``."""
        mode = {k: v for k, v in (("lose", lose), ("torn", torn), ("seed", seed)) if v is not None}
        body = json.dumps(mode).encode() if mode else None
        return self._control().json("POST", "/power-loss", body, "application/json" if body else None)

    # -- what happened -----------------------------------------------------

    def metrics(self):
        """``GET /metrics``, parsed: see Metrics."""
        return parse_metrics(self._control().request("GET", "/metrics").decode())

    def faults(self):
        """Every fault that fired so far, oldest first: the trace records
        of the events a rule fired on (``rule``, ``action``, ``event``,
        ``conn``, ``command``, ``offset``, ...).

        The trace reaches its file within 100 ms; this waits until it holds
        as many faults as the fault counter says fired."""
        if not self._trace:
            raise NbdfaultError("faults() needs the trace: started with trace=False")
        deadline = time.monotonic() + TRACE_WAIT
        while True:
            m = self.metrics()
            fired = m.value("nbdfault_faults_total")
            self._read_trace()
            if len(self._faults) >= fired:
                break
            if m.value("nbdfault_trace_lines_dropped_total") > 0 or time.monotonic() > deadline:
                warnings.warn(
                    f"nbdfault: the trace holds {len(self._faults)} of {int(fired)} faults"
                )
                break
            time.sleep(0.02)
        return list(self._faults)

    def _read_trace(self):
        with open(self._dir / "trace.jsonl", "rb") as f:
            f.seek(self._trace_pos)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._trace_pos += end
        for line in data[:end].splitlines():
            rec = json.loads(line)
            # The message a rule fired on; its `fault` records (what the
            # rule did to it) are left out, so there is one per firing.
            if "rule" in rec and rec.get("record", "message") == "message":
                self._faults.append(rec)


class Proxy(_Server):
    """``nbdfault proxy --upstream UPSTREAM``: every client forwarded to a
    real NBD server (HOST:PORT, a unix socket path, or an NBD URI)."""

    def __init__(self, upstream, **kwargs):
        super().__init__(["proxy", "--upstream", str(upstream)], **kwargs)
        self.upstream = upstream


class Null(_Server):
    """``nbdfault null``: a disk that reads zeroes and discards writes;
    ``size`` as nbdfault takes it (``"1G"``, bytes), default its own."""

    def __init__(self, size=None, oldstyle=False, **kwargs):
        args = ["null"]
        if size is not None:
            args += ["--size", str(size)]
        if oldstyle:
            args.append("--oldstyle")
        super().__init__(args, **kwargs)
