"""The control API client: HTTP/1.1 over the private unix socket that
nbdfault serves ``--control`` on.

A unix socket in an owner-only directory needs no token, no free port and
no reading of a bound port from a log line, and the API's browser guards
(Host, Origin) do not apply to it. One connection per request: the calls
are rare and this keeps no state to go stale.
"""

import http.client
import json
import socket
import urllib.parse

__all__ = ["ControlError", "Control", "rules_body"]


class ControlError(Exception):
    """The control API refused a request: ``status`` (HTTP) and
    ``message`` (its ``error`` text, as nbdfault wrote it)."""

    def __init__(self, method, path, status, message):
        super().__init__(f"{method} {path}: {status} {message}")
        self.method = method
        self.path = path
        self.status = status
        self.message = message


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        # The host only fills the Host header, which a unix socket ignores.
        super().__init__("localhost", timeout=timeout)
        self._socket_path = path

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(self.timeout)
            s.connect(self._socket_path)
        except BaseException:
            s.close()
            raise
        self.sock = s


def rules_body(rules):
    """A rules document and its Content-Type: YAML text as it is, a list
    of rule dicts as ``{"rules": [...]}``, a dict as a whole document."""
    if isinstance(rules, str):
        return rules.encode(), "application/yaml"
    if isinstance(rules, dict):
        return json.dumps(rules).encode(), "application/json"
    return json.dumps({"rules": list(rules)}).encode(), "application/json"


class Control:
    """Requests to one control socket."""

    def __init__(self, path, timeout=30.0):
        self.path = path
        self.timeout = timeout

    def request(self, method, path, body=None, content_type=None):
        """The response body (bytes) of a 2xx answer; ControlError
        otherwise."""
        conn = _UnixConnection(self.path, self.timeout)
        headers = {}
        if content_type:
            headers["Content-Type"] = content_type
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status >= 400:
            try:
                message = json.loads(data)["error"]
            except (ValueError, KeyError, TypeError):
                message = data.decode(errors="replace").strip()
            raise ControlError(method, path, resp.status, message)
        return data

    def json(self, method, path, body=None, content_type=None):
        """A JSON answer, parsed (None for an empty one, as 204 is)."""
        data = self.request(method, path, body, content_type)
        return json.loads(data) if data.strip() else None

    @staticmethod
    def quote(segment):
        """One path segment, every reserved byte percent-encoded."""
        return urllib.parse.quote(str(segment), safe="")
