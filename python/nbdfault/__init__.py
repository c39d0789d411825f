"""nbdfault from Python: start the fault-injecting NBD proxy (or its null
server) for a test, change its rules and hold its connections while the
test runs, read what fired, and never leave it running.

    with nbdfault.Null(size="1G", rules=[{"event": "request", "command": "read",
                                          "action": "error", "errno": "EIO"}]) as p:
        ...  # connect to p.uri

See the repository's README, "From Python".
"""

from ._control import ControlError
from ._metrics import Metrics, parse_metrics
from ._server import NbdfaultError, Null, Proxy, find_binary

__all__ = [
    "ControlError",
    "Metrics",
    "NbdfaultError",
    "Null",
    "Proxy",
    "find_binary",
    "parse_metrics",
]
