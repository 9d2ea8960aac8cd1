"""A blocking client's connections to a fleet: one DEALER per daemon, pinged while the client waits.

The client is single-threaded (one per thread), so there is no background
thread: every wait of the client goes through :meth:`Links.wait`, which
sends the pings that are due, wakes for the next ping or the moment a
daemon would count as dead, and hands each reply to its daemon's
:class:`~.members.Member` first. Sockets have ``ZMQ_IMMEDIATE``: a send
to a daemon whose connection is down fails at once (the daemon is, or
soon will be, dead to placement) instead of queueing for a reconnect.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import zmq

from .. import wire
from .discovery import Discovery
from .members import Member

log = logging.getLogger(__name__)

PING_PREFIX = "fleet-ping."


class Links:
    def __init__(self, discovery: Discovery, ctx: zmq.Context, configure: Callable[[zmq.Socket, str], None]) -> None:
        self.discovery = discovery
        self.ctx = ctx
        self.configure = configure
        self.members: dict[str, Member] = {}
        self.socks: dict[str, zmq.Socket] = {}
        self.in_flight: Counter[str] = Counter()
        self.pinned: Counter[str] = Counter()  # open sessions per daemon: kept even when DNS drops it
        self.where: dict[str, str] = {}  # job id -> the daemon it was sent to last (a cancel goes there)
        self._pings = itertools.count()

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close(0)
        self.socks.clear()
        self.members.clear()

    def refresh(self, now: float) -> None:
        found = self.discovery.endpoints(now)
        for endpoint in found:
            if endpoint not in self.socks:
                sock = self.ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.IMMEDIATE, 1)
                self.configure(sock, endpoint)
                self.socks[endpoint] = sock
                self.members[endpoint] = Member(endpoint, since=now)
        for endpoint in list(self.socks):
            if endpoint not in found and not self.in_flight[endpoint] and not self.pinned[endpoint]:
                self.socks.pop(endpoint).close(0)
                del self.members[endpoint]

    def placeable(self, now: float) -> list[Member]:
        return [m for m in self.members.values() if m.placeable(now)]

    def send(self, endpoint: str, frame: bytes) -> bool:
        """Send without waiting; False if the daemon's connection is not up."""
        sock = self.socks.get(endpoint)
        if sock is None:
            return False
        try:
            sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _ping(self, now: float) -> None:
        for endpoint, member in self.members.items():
            if member.ping_due(now):
                self.send(endpoint, wire.request("ping", f"{PING_PREFIX}{next(self._pings)}"))

    def wait(self, timeout: float) -> list[tuple[str, dict[str, Any]]]:
        """Replies (other than pings') that come within *timeout* s; pings sent and members updated meanwhile."""
        now = time.monotonic()
        self.refresh(now)
        self._ping(now)
        wake = min((m.next_event(now) for m in self.members.values()), default=now + timeout)
        poller = zmq.Poller()
        for sock in self.socks.values():
            poller.register(sock, zmq.POLLIN)
        ready = poller.poll(max(0, int(min(timeout, max(0.0, wake - now)) * 1000)))
        got: list[tuple[str, dict[str, Any]]] = []
        now = time.monotonic()
        by_sock = {sock: endpoint for endpoint, sock in self.socks.items()}
        for sock, _ in ready:
            endpoint = by_sock[sock]
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    msg = wire.decode_reply(frame)
                except ValueError as exc:
                    log.warning("%s: undecodable reply dropped: %s", endpoint, exc)
                    continue
                self.members[endpoint].on_reply(msg, now)
                rid = msg.get("id")
                if not (isinstance(rid, str) and rid.startswith(PING_PREFIX)):
                    got.append((endpoint, msg))
        return got

    def ping_all(self, deadline: float) -> None:
        """Ping every daemon now and wait for all to answer, or *deadline* (the dead ones will not)."""
        start = time.monotonic()
        for member in self.members.values():
            member.ping_sent = None
        self.wait(0)
        while time.monotonic() < deadline and any(m.heard is None or m.heard < start for m in self.members.values()):
            self.wait(deadline - time.monotonic())

    def wait_placeable(self, deadline: float) -> None:
        """Until some daemon is placeable (the first pongs), or *deadline*."""
        while not self.placeable(time.monotonic()) and time.monotonic() < deadline:
            self.wait(deadline - time.monotonic())
