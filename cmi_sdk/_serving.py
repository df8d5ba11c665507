"""Serving an ASGI app on a loopback port for the length of a ``with`` block (the demo's
firm, tests and benchmarks)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from cmi_sdk._exceptions import ConfigurationError

__all__ = ["serving"]


@contextlib.contextmanager
def serving(app: Any, *, host: str = "127.0.0.1", timeout: float = 15.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread on a free port of ``host``; yield
    the base URL (``http://127.0.0.1:PORT``, no trailing slash); stop it on exit.

    :raises ConfigurationError: the server did not start within ``timeout`` seconds.
    """
    config = uvicorn.Config(
        app,
        host=host,
        port=0,
        log_level="warning",
        access_log=False,
        log_config=None,  # the host process keeps its own logging configuration
        lifespan="off",
        ws="none",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="cmi-serving", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise ConfigurationError(f"the server did not start on {host}")
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
