"""The package against real peers: nbdfault in front of qemu-nbd (or its
null server), read through libnbd's Python bindings, steered through the
API while clients are connected."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import nbd
import pytest

import nbdfault
from support import REPO, alive, image_bytes, wait_until

EIO_ABOVE_1M = [
    {
        "name": "eio-above-1m",
        "event": "request",
        "command": "read",
        "offset": "1MiB..",
        "action": "error",
        "errno": "EIO",
    }
]


def test_a_read_fails_through_an_error_rule_with_its_errno(qemu_nbd, nbd_handle):
    with nbdfault.Proxy(upstream=qemu_nbd, rules=EIO_ABOVE_1M) as p:
        assert p.uri == f"nbd+unix:///?socket={p.socket}"
        h = nbd_handle(p.uri)
        assert h.pread(4096, 4096) == image_bytes(4096, 4096)
        with pytest.raises(nbd.Error) as e:
            h.pread(512, 1 << 20)
        assert e.value.errnum == errno.EIO
        assert e.value.string == "nbd_pread: read: command failed: Input/output error"
        # The read below 1 MiB and the one above: one fault.
        (fault,) = p.faults()
        assert {k: fault[k] for k in ("rule", "action", "event", "command", "offset", "length")} == {
            "rule": "eio-above-1m",
            "action": "error",
            "event": "request",
            "command": "read",
            "offset": 1 << 20,
            "length": 512,
        }
        (rule,) = p.rules()
        assert (rule["name"], rule["matched"], rule["fired"]) == ("eio-above-1m", 1, 1)


def test_rules_added_and_removed_at_run_time_apply_to_a_live_connection(qemu_nbd, nbd_handle):
    with nbdfault.Proxy(upstream=qemu_nbd) as p:
        h = nbd_handle(p.uri)
        h.pwrite(b"\x01" * 4096, 0)
        names = [r["name"] for r in p.add_rules(
            "rules:\n"
            "  - name: full-disk\n"
            "    event: request\n"
            "    command: write\n"
            "    action: error\n"
            "    errno: ENOSPC\n"
        )]
        assert names == ["full-disk"]
        with pytest.raises(nbd.Error) as e:
            h.pwrite(b"\x02" * 4096, 0)
        assert e.value.errnum == errno.ENOSPC
        p.add_rules([dict(EIO_ABOVE_1M[0], name="eio")])
        assert [r["name"] for r in p.rules()] == ["full-disk", "eio"]
        p.remove_rule("full-disk")
        h.pwrite(b"\x03" * 4096, 0)
        assert h.pread(4096, 0) == b"\x03" * 4096
        with pytest.raises(nbdfault.ControlError) as c:
            p.remove_rule("full-disk")
        assert c.value.status == 404
        assert c.value.message == 'no rule named "full-disk" (GET /rules lists them)'
        # A bad document changes nothing and says what `check` would.
        with pytest.raises(nbdfault.ControlError) as c:
            p.add_rules([{"event": "requset"}])
        assert c.value.status == 400
        assert 'did you mean "request"' in c.value.message
        assert [r["name"] for r in p.set_rules([])] == []
        assert [f["rule"] for f in p.faults()] == ["full-disk"]


def test_pause_holds_a_connection_until_resumed(qemu_nbd, nbd_handle):
    with nbdfault.Proxy(upstream=qemu_nbd) as p:
        h = nbd_handle(p.uri)
        (conn,) = p.wait_connections(1)
        assert p.pause(conn["id"])["paused"] is True
        buf = nbd.Buffer(4096)
        cookie = h.aio_pread(buf, 8192)
        # Held: however long we poll, the reply does not come.
        for _ in range(5):
            h.poll(100)
            assert not h.aio_command_completed(cookie)
        assert p.connections()[0]["paused"] is True
        assert p.resume(conn["id"])["paused"] is False
        assert wait_until(lambda: h.poll(100) is not None and h.aio_command_completed(cookie))
        assert buf.to_bytearray() == image_bytes(8192, 4096)
        p.disconnect(conn["id"])
        assert wait_until(lambda: p.connections() == [])


def test_metrics_count_what_passed_and_what_fired(nbd_handle):
    with nbdfault.Null(size="1M", rules=EIO_ABOVE_1M) as p:
        h = nbd_handle(p.uri)
        h.pwrite(b"\x07" * 65536, 0)
        m = p.metrics()
        assert m.value("nbdfault_connections_total") == 1
        assert m.value("nbdfault_connections_active") == 1
        assert m.value("nbdfault_events_total", event="data", direction="to-server") == 1
        assert m.value("nbdfault_bytes_total", direction="to-server") > 65536
        assert m.value("nbdfault_faults_total") == 0
        assert m['nbdfault_events_total{event="connect",direction="none"}'] == 1
        (labels, count), = m.series("nbdfault_request_duration_seconds_count")
        assert (labels, count) == ({"command": "write"}, 1)


def test_a_power_loss_takes_what_was_not_flushed(qemu_nbd, nbd_handle):
    with nbdfault.Proxy(upstream=qemu_nbd, write_cache="1M", write_back="when-full") as p:
        assert "--write-back" in p.args and "1M" in p.args
        h = nbd_handle(p.uri)
        h.pwrite(b"\x22" * 4096, 0)
        h.flush()
        h.pwrite(b"\x33" * 4096, 8192)
        # The client reads its own unflushed write.
        assert h.pread(4096, 8192) == b"\x33" * 4096
        assert p.power_loss() == {
            "connections_reset": 1,
            "kept": 0,
            "lost_bytes": 4096,
            "lost_writes": 1,
        }
        # The proxy serves on: a new client sees the disk the loss left.
        h = nbd_handle(p.uri)
        assert h.pread(4096, 0) == b"\x22" * 4096
        assert h.pread(4096, 8192) == image_bytes(8192, 4096)
        assert p.metrics().value("nbdfault_power_losses_total") == 1


def test_metrics_text_with_escapes_parses():
    m = nbdfault.parse_metrics(
        "# TYPE x counter\n"
        'x{rule="inject-error \\"a\\"",action="disconnect"} 2\n'
        'x{rule="b\\\\c",action="error"} 3\n'
        "y 1.5\n"
    )
    assert m.value("x") == 5
    assert m.value("x", rule='inject-error "a"') == 2
    assert m.value("x", rule="b\\c", action="error") == 3
    assert m["y"] == 1.5
    assert m.value("z") == 0


def test_nothing_is_left_after_the_with_block():
    with nbdfault.Null(listen="127.0.0.1:0") as p:
        assert p.uri.startswith("nbd://127.0.0.1:")
        assert p.socket is None
        pid, d = p.pid, p.dir
        assert alive(pid)
    assert not alive(pid)
    assert not d.exists()
    assert p.returncode == 0
    assert p.stop() == 0  # twice is fine


def test_a_killed_test_process_leaves_no_nbdfault_running(tmp_path):
    # A test process killed with SIGKILL runs no atexit: --exit-with-parent
    # is what stops nbdfault.
    script = (
        "import sys, time, nbdfault\n"
        "p = nbdfault.Null().start()\n"
        "print(p.pid, p.dir, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "python"))
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        pid, d = child.stdout.readline().split()
        pid = int(pid)
        assert alive(pid)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    try:
        assert wait_until(lambda: not alive(pid)), f"nbdfault {pid} still runs"
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    # nbdfault removes its sockets; the directory was the harness's to
    # remove.
    assert sorted(os.listdir(d)) == ["trace.jsonl"]
    shutil.rmtree(d)


def test_a_server_that_dies_during_the_with_block_is_an_error():
    with pytest.raises(nbdfault.NbdfaultError) as e:
        with nbdfault.Null() as p:
            os.kill(p.pid, signal.SIGKILL)
            assert wait_until(lambda: p._proc.poll() is not None)
    assert str(e.value).startswith("nbdfault died during the test (status -9):")


def test_an_interpreter_that_exits_without_stopping_stops_its_servers():
    script = (
        "import nbdfault\n"
        "p = nbdfault.Null().start()\n"
        "print(p.pid, p.dir, flush=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "python"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert (out.returncode, out.stderr) == (0, "")
    pid, d = out.stdout.split()
    # Stopped at exit (atexit), not only by --exit-with-parent: the
    # directory is gone too.
    assert not alive(int(pid))
    assert not os.path.exists(d)


def test_a_failed_start_says_why_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(nbdfault.NbdfaultError) as e:
        nbdfault.Null(rules=[{"event": "requset"}]).start()
    text = str(e.value)
    assert "nbdfault exited with status 1 before listening" in text
    assert 'did you mean "request"' in text
    assert os.listdir(tmp_path) == []


def test_the_binary_comes_from_the_environment_first(monkeypatch):
    monkeypatch.setenv("NBDFAULT", "/nonexistent/nbdfault")
    with pytest.raises(nbdfault.NbdfaultError) as e:
        nbdfault.Null().start()
    assert str(e.value) == "NBDFAULT=/nonexistent/nbdfault: not an executable file"


def test_fixtures(nbdfault_null, nbdfault_proxy, qemu_nbd, nbd_handle):
    assert nbd_handle(nbdfault_null.uri).get_size() == 8 << 30
    proxy = nbdfault_proxy(qemu_nbd, rules=EIO_ABOVE_1M)
    h = nbd_handle(proxy.uri)
    assert h.pread(512, 0) == image_bytes(0, 512)
    with pytest.raises(nbd.Error) as e:
        h.pread(512, 2 << 20)
    assert e.value.errnum == errno.EIO
