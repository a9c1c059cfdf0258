"""How `edgeft serve` holds connections: bounded in number, and each must finish its request headers
in time.

uvicorn cuts off idle keep-alive connections but waits forever for a request whose headers never
end, so a few clients sending a byte now and then (slowloris) hold connections indefinitely. Here a
connection gets HEADER_TIMEOUT_S to finish the headers of each request, counted from when it opens
and from the end of each response. The body has its own limit (the app's body timeout, 408).

Imported only by `serve` (it needs uvicorn, which the runtime install does not). H11Protocol is
uvicorn's private class: pyproject.toml bounds uvicorn to the versions checked with it, and the
import below fails with one clear line where the methods overridden here are gone.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from edgeft.errors import EdgeftError

HEADER_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5
SPARE_CONNECTIONS = 32  # connections beyond parallel + queue (health checks, the page, clients in line)
OVERRIDDEN = ("connection_made", "data_received", "on_response_complete", "connection_lost")


def check_protocol(base: type) -> None:
    """Fail now, in one line, if uvicorn's protocol no longer has a method HeaderDeadline overrides
    (else the deadline would silently never be armed, or every connection would fail)."""
    missing = [name for name in OVERRIDDEN if not callable(getattr(base, name, None))]
    if missing:
        try:
            installed = f"uvicorn {version('uvicorn')}"
        except PackageNotFoundError:
            installed = "this uvicorn"
        raise EdgeftError(
            f"edgeft serve cannot run on {installed}: its {base.__name__} has no {', '.join(missing)}. "
            "Install the uvicorn version edgeft supports: pip install 'edgeft[serve]'."
        )


check_protocol(H11Protocol)


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's headers."""

    deadline = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets the same time

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(HEADER_TIMEOUT_S, self._expire)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expire(self) -> None:
        self.deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def server_options(parallel: int, max_queue: int) -> dict:
    """uvicorn settings for `edgeft serve`: bounded connections (a flood of half-open ones gets 503,
    not the machine's file descriptors), idle keep-alive connections closed after 5 s, and a deadline
    on request headers."""
    return {
        "http": HeaderDeadline,
        "timeout_keep_alive": KEEP_ALIVE_S,
        "limit_concurrency": parallel + max_queue + SPARE_CONNECTIONS,
    }
