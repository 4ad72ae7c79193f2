"""uvicorn's HTTP/1.1 protocol (h11) with a read timeout: a connection that sends nothing for
`read_timeout` seconds while its request is incomplete — headers not finished, or the body not
all there — is closed. A slow upload that keeps sending is never cut off; a request fully
received waits for its answer however long captioning takes. (uvicorn itself waits for a stalled
request forever: 300 stalled uploads held 300 sockets.)"""

from __future__ import annotations

import asyncio
import json
import os

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..settings import SERVE_ENV, ServeLimits


def _configured_timeout() -> float:
    """`captioner serve --request-timeout-s`, as it reaches uvicorn's worker processes."""
    raw = os.environ.get(SERVE_ENV)
    limits = json.loads(raw).get("limits", {}) if raw else {}
    return float(limits.get("request_timeout_s", ServeLimits().request_timeout_s))


class ReadTimeoutH11Protocol(H11Protocol):
    read_timeout: float | None = None  # None: the configured one (tests set it on a subclass)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timeout = self.read_timeout if self.read_timeout is not None else _configured_timeout()
        self._timer: asyncio.TimerHandle | None = None
        self._arm()

    def data_received(self, data: bytes) -> None:
        self._arm()  # progress: the clock starts again
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(self._timeout, self._silent)

    def _silent(self) -> None:
        """`read_timeout` seconds without a byte: close unless the request is all here."""
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.transport.close()
        else:
            self._arm()
