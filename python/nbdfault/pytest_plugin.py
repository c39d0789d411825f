"""pytest fixtures for nbdfault: a null server, and a factory of proxies,
each stopped when its test ends. Loaded by the ``pytest11`` entry point
once the package is installed, or with ``pytest -p nbdfault.pytest_plugin``.
"""

import pytest

from ._server import Null, Proxy


@pytest.fixture
def nbdfault_null():
    """A running ``nbdfault null`` (its default size, no rules)."""
    with Null() as server:
        yield server


@pytest.fixture
def nbdfault_proxy():
    """``nbdfault_proxy(upstream, **options)`` starts a Proxy (options as
    Proxy takes them); every one started is stopped after the test."""
    started = []

    def start(upstream, **options):
        proxy = Proxy(upstream, **options)
        proxy.start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in reversed(started):
        proxy.stop()
