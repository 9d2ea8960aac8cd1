"""What both clients share about their connection: the endpoint, CurveZMQ keys, a DEALER set up, a reply decoded.

:class:`~runnerd.client.Client` and :class:`~runnerd.async_client.AsyncClient`
derive from :class:`ClientBase`; the waiting (blocking or asyncio) is each
one's own. The endpoint comes from the argument, else ``RUNNERD_ENDPOINT``,
else :data:`DEFAULT_ENDPOINT`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import zmq

from . import wire
from .errors import ClientError
from .exchange import _Ask
from .fleet.discovery import Discovery, parse

DEFAULT_ENDPOINT = "ipc:///run/runnerd/runnerd.sock"
RESEND_INTERVAL_S = 5.0
CONTROL_TIMEOUT_S = 10.0
# An open may start a cage (cold mode), behind other cages starting on a loaded host.
SESSION_TIMEOUT_S = 60.0


def resolve_endpoint(endpoint: str | None) -> str:
    return endpoint or os.environ.get("RUNNERD_ENDPOINT") or DEFAULT_ENDPOINT


def curve_keys(
    client_secret_file: str | os.PathLike[str], server_public_file: str | os.PathLike[str]
) -> dict[str, bytes]:
    """The ``curve=`` argument of a client, from certificate files made by ``runnerd keygen``."""
    import zmq.auth

    public, secret = zmq.auth.load_certificate(os.fspath(client_secret_file))
    server, _ = zmq.auth.load_certificate(os.fspath(server_public_file))
    if not secret:
        raise ValueError(f"{client_secret_file} holds no secret key (give the .key_secret file)")
    return {"public": public, "secret": secret, "server": server}


class ClientBase:
    """The endpoint, resend interval and keys of a client, and what it does with them that does not wait."""

    def __init__(self, endpoint: str | None, *, resend_interval: float, curve: Mapping[str, bytes] | None) -> None:
        self.endpoint = resolve_endpoint(endpoint)
        # A list, dns:// or dns+srv://: a fleet (runnerd.fleet). One endpoint: one daemon, as ever.
        self.discovery: Discovery = parse(self.endpoint)
        self.resend_interval = resend_interval
        self._curve = curve

    def _decode(self, frame: bytes) -> dict[str, Any]:
        try:
            return wire.decode_reply(frame)
        except ValueError as exc:
            raise ClientError(f"undecodable reply from {self.endpoint}: {exc}") from None

    def _configure(self, sock: zmq.Socket, endpoint: str | None = None) -> None:
        """Set *sock* up and connect it to *endpoint* (a fleet's daemon), else this client's one endpoint."""
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve:
            sock.curve_secretkey = self._curve["secret"]
            sock.curve_publickey = self._curve["public"]
            sock.curve_serverkey = self._curve["server"]
        sock.connect(endpoint or self.endpoint)

    def _ask(
        self, op: str, request_id: str, expect: tuple[str, ...], timeout: float,
        fields: Mapping[str, Any] | None, resend: bool, now: float, endpoint: str | None = None,
    ) -> _Ask:  # fmt: skip
        """The exchange of a control request (one reply); resent only with *resend* (for idempotent requests)."""
        interval = self.resend_interval if resend else None
        return _Ask(op, request_id, expect, timeout, interval, endpoint or self.endpoint, now, fields)
