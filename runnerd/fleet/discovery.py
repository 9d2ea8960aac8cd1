"""Where the daemons are: an endpoint spec turned into endpoints, from what the engine already provides.

Specs (``--endpoint``, ``RUNNERD_ENDPOINT``, a client's ``endpoint``):

* one endpoint, ``ipc://...`` or ``tcp://host:port``: today's single daemon;
* several, comma-separated (or a list): a static fleet;
* ``dns+srv://_runnerd._tcp.example.org``: the SRV records of that name
  (systemd hosts published in DNS), each ``tcp://target:port``;
* ``dns://runnerd.ns.svc.cluster.local:7700``: every A and AAAA record of
  the name, each ``tcp://address:port`` (a Kubernetes headless Service
  gives one record per ready pod).

A DNS spec may name its server, ``...@10.0.0.2:53`` (else the system's
resolver). DNS is asked again every :data:`REFRESH_S` seconds; a failed
lookup keeps the last answer (a resolver's hiccup is not a fleet's end),
and is an error only while there has never been one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ClientError

log = logging.getLogger(__name__)

REFRESH_S = 10.0
MAX_DAEMONS = 1024  # a client's connections: more found are cut to the first, with a warning
LOOKUP_TIMEOUT_S = 2.0
SCHEMES = ("ipc://", "tcp://", "dns+srv://", "dns://")

Lookup = Callable[["DnsSpec"], list[str]]


@dataclass(frozen=True)
class DnsSpec:
    kind: str  # "srv" or "names"
    name: str
    port: int | None  # for "names"
    server: tuple[str, int] | None  # the nameserver to ask; None: the system's


@dataclass
class Discovery:
    """The endpoints of a spec now; :meth:`endpoints` re-resolves DNS when it is due."""

    spec: str
    static: tuple[str, ...] = ()
    dns: DnsSpec | None = None
    lookup: Lookup | None = None  # how DNS is asked (tests give their own); None: dnspython
    _found: list[str] = field(default_factory=list)
    _next: float = 0.0

    @property
    def single(self) -> bool:
        """One endpoint and no DNS: the client behaves exactly as without a fleet."""
        return self.dns is None and len(self.static) == 1

    def due(self, now: float) -> bool:
        """Whether :meth:`endpoints` would ask DNS now (an asyncio caller does that in a thread)."""
        return self.dns is not None and now >= self._next

    def endpoints(self, now: float | None = None) -> list[str]:
        if self.dns is None:
            return list(self.static)
        now = time.monotonic() if now is None else now
        if now >= self._next:
            self._next = now + REFRESH_S
            try:
                found = (self.lookup or resolve)(self.dns)
            except ClientError as exc:
                if not self._found:
                    raise
                log.warning("%s: %s; keeping the %d daemon(s) found before", self.spec, exc, len(self._found))
            else:
                if len(found) > MAX_DAEMONS:
                    log.warning("%s: %d daemons found; using the first %d", self.spec, len(found), MAX_DAEMONS)
                    found = found[:MAX_DAEMONS]
                if found != self._found:
                    log.info("%s: %d daemon(s): %s", self.spec, len(found), ", ".join(found))
                self._found = found
        return list(self._found)


def parse(spec: str | Sequence[str]) -> Discovery:
    """A Discovery for *spec*; ClientError naming what is wrong with it."""
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    text = ",".join(parts)
    if not parts:
        raise ClientError("no endpoint given")
    for part in parts:
        if not part.startswith(SCHEMES):
            raise ClientError(f"endpoint {part!r}: expected one of {', '.join(s + '...' for s in SCHEMES)}")
    dns = [p for p in parts if p.startswith(("dns://", "dns+srv://"))]
    if dns:
        if len(parts) > 1:
            raise ClientError(f"{text}: a dns:// or dns+srv:// spec stands alone, not in a list")
        return Discovery(text, dns=_dns_spec(dns[0]))
    if len(set(parts)) != len(parts):
        raise ClientError(f"{text}: an endpoint is listed twice")
    if len(parts) > MAX_DAEMONS:
        raise ClientError(f"{len(parts)} endpoints listed; a client takes at most {MAX_DAEMONS}")
    return Discovery(text, static=tuple(parts))


def _host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ClientError(f"{what}: expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _dns_spec(part: str) -> DnsSpec:
    srv = part.startswith("dns+srv://")
    rest = part.split("://", 1)[1]
    rest, at, server_text = rest.partition("@")
    server = _host_port(server_text, f"{part}: the name server") if at else None
    if srv:
        if not rest or ":" in rest:
            raise ClientError(f"{part}: expected dns+srv://_runnerd._tcp.DOMAIN (the port is in the SRV records)")
        return DnsSpec("srv", rest, None, server)
    name, port = _host_port(rest, part)
    return DnsSpec("names", name, port, server)


def resolve(spec: DnsSpec) -> list[str]:
    """Ask DNS (dnspython); the endpoints, sorted; ClientError if the lookup fails or finds nothing.

    An SRV target is resolved to its addresses by the same server (the
    client's connect would ask the system's resolver, which may not know
    it); a target without addresses is kept by name.
    """
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=spec.server is None)
    if spec.server is not None:
        resolver.nameservers = [spec.server[0]]
        resolver.port = spec.server[1]
    resolver.lifetime = LOOKUP_TIMEOUT_S
    found: set[str] = set()
    if spec.kind == "srv":
        for rr in _records(resolver, spec.name, "SRV", required=True):
            target = str(rr.target).rstrip(".")
            addresses = _addresses(resolver, target)
            if addresses:
                found.update(_tcp(a, rr.port) for a in addresses)
            else:
                found.add(f"tcp://{target}:{rr.port}")
    else:
        assert spec.port is not None
        found.update(_tcp(a, spec.port) for a in _addresses(resolver, spec.name))
    if not found:
        raise ClientError(f"DNS lookup of {spec.name} found no daemon")
    return sorted(found)


def _tcp(address: str, port: int) -> str:
    return f"tcp://[{address}]:{port}" if ":" in address else f"tcp://{address}:{port}"


def _addresses(resolver: Any, name: str) -> list[str]:
    """A and AAAA; a name with only one kind is fine (a server may refuse the other)."""
    return [rr.to_text() for rdtype in ("A", "AAAA") for rr in _records(resolver, name, rdtype, required=False)]


def _records(resolver: Any, name: str, rdtype: str, *, required: bool) -> list[Any]:
    import dns.exception
    import dns.resolver

    try:
        return list(resolver.resolve(name, rdtype))
    except dns.resolver.NoAnswer:
        return []
    except dns.exception.DNSException as exc:
        if required:
            raise ClientError(f"DNS lookup of {name} ({rdtype}) failed: {exc}") from None
        log.debug("DNS lookup of %s (%s) failed: %s", name, rdtype, exc)
        return []
