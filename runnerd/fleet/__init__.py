"""The client's view of a fleet of daemons (docs/fleet.md): who they are, how loaded, where work goes.

No broker: daemons describe themselves (``ping``: instance, state, load),
clients route (ZeroMQ's "Freelance" pattern). This package is the pure
part, without sockets or clocks of its own, unit-tested without a daemon:

* :mod:`.discovery`: from an endpoint spec (a list, ``dns+srv://``,
  ``dns://``) to the daemons' endpoints, re-resolved every few seconds;
* :mod:`.members`: one daemon's health, from its pongs and missed pings;
* :mod:`.placement`: where a one-off job goes (two random choices, the
  less loaded), and which daemon owns a session (rendezvous hashing).
"""
