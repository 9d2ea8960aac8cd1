"""Who a request comes from, for the limits one client may hold, who owns a session, and whose share a run is.

A client is its CURVE key where the endpoint has CURVE (every connection
with that key is one client, and a session it opened is only its own),
else its ZeroMQ connection (a client with several connections counts as
several, and session ids are the only secret: docs/protocol.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Client:
    name: str  # what limits are counted by, and what BUSY messages name
    key: str | None  # the CURVE key (Z85), when the endpoint authenticated one


# Requests made inside the daemon, and tests that drive the scheduler without a front end.
LOCAL = Client(name="local", key=None)


def tenant_of(named: str | None, client: Client) -> str:
    """Whose share a run is served from: the tenant it names (*named*), else its client.

    With CURVE a named tenant is the key's own (``key:<z85>/<tenant>``): another key cannot spend its
    share. Without it, one name is one tenant across connections (a gateway's users, say).
    """
    if named is None:
        return client.name
    return f"{client.name}/{named}" if client.key is not None else named
