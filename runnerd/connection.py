"""What both clients share about their connection: the endpoint, CurveZMQ keys, a DEALER set up, a reply decoded.

:class:`~runnerd.client.Client` and :class:`~runnerd.async_client.AsyncClient`
derive from :class:`ClientBase`; the waiting (blocking or asyncio) is each
one's own. The endpoint comes from the argument, else ``RUNNERD_ENDPOINT``,
else :data:`DEFAULT_ENDPOINT`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import zmq

from . import wire
from .errors import ClientError
from .exchange import _Ask
from .fleet import placement
from .fleet.discovery import Discovery, parse
from .fleet.links import LinksBase
from .fleet.members import SILENCE_S

DEFAULT_ENDPOINT = "ipc:///run/runnerd/runnerd.sock"
RESEND_INTERVAL_S = 5.0
CONTROL_TIMEOUT_S = 10.0
# An open may start a cage (cold mode), behind other cages starting on a loaded host.
SESSION_TIMEOUT_S = 60.0


def resolve_endpoint(endpoint: str | None) -> str:
    return endpoint or os.environ.get("RUNNERD_ENDPOINT") or DEFAULT_ENDPOINT


def curve_keys(
    client_secret_file: str | os.PathLike[str],
    server_public_file: str | os.PathLike[str] | None = None,
    *,
    servers: Mapping[str, str | os.PathLike[str]] | None = None,
) -> dict[str, bytes]:
    """The ``curve=`` argument of a client, from certificate files made by ``runnerd keygen``.

    *server_public_file*: the daemon's public key, or one all daemons of a fleet share; *servers*: a
    public key file per daemon endpoint (``"server:<endpoint>"`` entries, taken before the shared one).
    """
    import zmq.auth

    public, secret = zmq.auth.load_certificate(os.fspath(client_secret_file))
    if not secret:
        raise ValueError(f"{client_secret_file} holds no secret key (give the .key_secret file)")
    keys = {"public": public, "secret": secret}
    if server_public_file is not None:
        keys["server"] = zmq.auth.load_certificate(os.fspath(server_public_file))[0]
    for endpoint, path in (servers or {}).items():
        keys[f"server:{endpoint}"] = zmq.auth.load_certificate(os.fspath(path))[0]
    if len(keys) == 2:
        raise ValueError("no server key: give the shared server's public key file, or one per daemon")
    return keys


class ClientBase:
    """The endpoint, resend interval and keys of a client, and what it does with them that does not wait."""

    def __init__(
        self, endpoint: str | None, *, resend_interval: float, curve: Mapping[str, bytes] | None, tenant: str | None
    ) -> None:
        self.endpoint = resolve_endpoint(endpoint)
        # Whose runs these are, for the daemon's fair queues (a gateway serving many users names each
        # one's); unsaid, the daemon takes this client's CURVE key, else its connection.
        if tenant is not None and not (isinstance(tenant, str) and wire.ID_RE.match(tenant)):
            raise ValueError(f"tenant must be 1-128 characters of [A-Za-z0-9._:-], got {tenant!r}")
        self.tenant = tenant
        # A list, dns:// or dns+srv://: a fleet (runnerd.fleet). One endpoint: one daemon, as ever.
        self.discovery: Discovery = parse(self.endpoint)
        self.resend_interval = resend_interval
        self._curve = curve
        self._links: LinksBase | None = None  # a fleet's daemons (set by the client); None for one endpoint

    @property
    def fleet(self) -> LinksBase | None:
        """The daemons of a fleet and what this client knows of each; None for one endpoint."""
        return self._links

    @staticmethod
    def _first_wait(timeout: float) -> float:
        """The deadline for the first pongs of a fleet: a daemon answers within 3 s or is dead."""
        return time.monotonic() + min(timeout, SILENCE_S)

    def _describe(self) -> str:
        now = time.monotonic()
        members = self._links.members.values() if self._links else ()
        return "; ".join(m.describe(now) for m in members) or "none found"

    def _ready_daemon(self) -> str:
        """The least loaded ready daemon now (for a ping, stats or an open's undo); ClientError if none."""
        assert self._links is not None
        links = self._links
        ready = links.placeable(time.monotonic())
        if not ready:
            raise ClientError(f"{self.endpoint}: no daemon is ready ({self._describe()})")
        return min(ready, key=lambda m: m.load(links.in_flight.get(m.endpoint, 0))).endpoint

    def _owner_now(self, session_id: str) -> str:
        """The daemon a session of this id opens on: rendezvous hashing over the ready ones."""
        assert self._links is not None
        member = placement.owner(session_id, list(self._links.members.values()), time.monotonic())
        if member is None:
            raise ClientError(f"{self.endpoint}: no daemon is ready to open session {session_id} ({self._describe()})")
        return member.endpoint

    def _with_members(self, pong: dict[str, Any]) -> dict[str, Any]:
        if self._links is not None:
            now = time.monotonic()
            pong["members"] = [
                {"endpoint": m.endpoint, "state": m.state, "alive": not m.dead(now), "instance": m.instance,
                 "running": m.running, "queued": m.queued, "concurrency": m.concurrency}
                for m in self._links.members.values()
            ]  # fmt: skip
        return pong

    def _where(self, job_id: str) -> str | None:
        """The daemon a job of this client went to last (a cancel goes there); None if unknown or one endpoint."""
        return self._links.where.get(job_id) if self._links is not None else None

    def _decode(self, frame: bytes) -> dict[str, Any]:
        try:
            return wire.decode_reply(frame)
        except ValueError as exc:
            raise ClientError(f"undecodable reply from {self.endpoint}: {exc}") from None

    def _configure(self, sock: zmq.Socket, endpoint: str | None = None) -> None:
        """Set *sock* up and connect it to *endpoint* (a fleet's daemon), else this client's one endpoint."""
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve:
            target = endpoint or self.endpoint
            server = self._curve.get(f"server:{target}", self._curve.get("server"))
            if server is None:
                raise ClientError(f"no CURVE server key for {target}: give curve['server'] or curve['server:{target}']")
            sock.curve_secretkey = self._curve["secret"]
            sock.curve_publickey = self._curve["public"]
            sock.curve_serverkey = server
        sock.connect(endpoint or self.endpoint)

    def _ask(
        self, op: str, request_id: str, expect: tuple[str, ...], timeout: float,
        fields: Mapping[str, Any] | None, resend: bool, now: float, endpoint: str | None = None,
    ) -> _Ask:  # fmt: skip
        """The exchange of a control request (one reply); resent only with *resend* (for idempotent requests)."""
        interval = self.resend_interval if resend else None
        return _Ask(op, request_id, expect, timeout, interval, endpoint or self.endpoint, now, fields)
