"""The client's fleet logic without a daemon: endpoint specs, health from pings, placement, session owners."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from runnerd.errors import ClientError
from runnerd.fleet import discovery, placement
from runnerd.fleet.discovery import DnsSpec, parse
from runnerd.fleet.members import SILENCE_S, Member


def test_endpoint_specs():
    assert parse("ipc:///run/runnerd/runnerd.sock").single
    fleet = parse("tcp://a:1, tcp://b:2")
    assert not fleet.single and fleet.endpoints() == ["tcp://a:1", "tcp://b:2"]
    assert parse(["tcp://a:1", "tcp://b:2"]).static == ("tcp://a:1", "tcp://b:2")
    srv = parse("dns+srv://_runnerd._tcp.fleet.test@10.0.0.2:5353")
    assert srv.dns == DnsSpec("srv", "_runnerd._tcp.fleet.test", None, ("10.0.0.2", 5353))
    names = parse("dns://runnerd.default.svc:7700")
    assert names.dns == DnsSpec("names", "runnerd.default.svc", 7700, None)
    for bad, why in (
        ("", "no endpoint"),
        ("http://x:1", "expected one of"),
        ("tcp://a:1,tcp://a:1", "listed twice"),
        ("dns://name", "HOST:PORT"),
        ("dns+srv://name:53", "port is in the SRV"),
        ("dns://a:1,tcp://b:2", "stands alone"),
        ("dns://a:1@server", "the name server"),
    ):
        with pytest.raises(ClientError, match=why):
            parse(bad)


def test_dns_is_asked_again_when_due_and_a_failed_lookup_keeps_the_last_answer():
    answers: list[list[str] | Exception] = [
        ["tcp://10.0.0.1:7700"],
        ClientError("timeout"),
        ["tcp://10.0.0.1:7700", "tcp://10.0.0.2:7700"],
    ]
    asked = []

    def lookup(spec):
        asked.append(spec.name)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    d = parse("dns://runnerd.test:7700")
    d.lookup = lookup
    assert d.endpoints(now=0.0) == ["tcp://10.0.0.1:7700"]
    assert d.endpoints(now=5.0) == ["tcp://10.0.0.1:7700"] and len(asked) == 1  # not due yet
    assert d.endpoints(now=discovery.REFRESH_S) == ["tcp://10.0.0.1:7700"]  # the failed lookup kept it
    assert d.endpoints(now=2 * discovery.REFRESH_S) == ["tcp://10.0.0.1:7700", "tcp://10.0.0.2:7700"]
    first = parse("dns://runnerd.test:7700")
    first.lookup = lambda spec: (_ for _ in ()).throw(ClientError("DNS lookup of runnerd.test found no daemon"))
    with pytest.raises(ClientError, match="found no daemon"):
        first.endpoints(now=0.0)


def pong(instance="i1", state="ready", running=0, queued=0, concurrency=2):
    return {"type": "pong", "instance": instance, "state": state, "running": running, "queued": queued,
            "concurrency": concurrency}  # fmt: skip


def test_a_daemon_is_dead_after_three_silent_ping_intervals_and_alive_at_its_next_reply():
    m = Member("tcp://a:1", since=0.0)
    assert not m.placeable(0.0)  # nothing heard yet
    assert m.ping_due(0.0)
    m.on_reply(pong(), 0.25)
    assert m.placeable(0.25) and not m.ping_due(0.5) and m.ping_due(1.0)
    assert m.next_event(1.0) == 2.0  # the next ping
    for now in (2.0, 3.0):  # unanswered
        assert m.ping_due(now) and m.placeable(now)
    assert m.next_event(3.0) == 0.25 + SILENCE_S  # its death, before the next ping
    assert m.dead(0.25 + SILENCE_S) and not m.placeable(0.25 + SILENCE_S)
    assert SILENCE_S <= 3.5  # out of placement within 3.5 s of its last word
    m.on_reply({"type": "result", "instance": "i1"}, 3.5)  # any reply is a sign of life
    assert not m.dead(3.5) and m.placeable(3.5) and m.instance == "i1"
    for now in (4.0, 5.0, 6.0):  # pinged on, unanswered
        assert m.ping_due(now)
    assert "silent for 3.0 s" in m.describe(6.5)


def test_a_new_instance_means_a_restart_and_draining_is_not_placeable():
    m = Member("tcp://a:1")
    m.on_reply(pong("i1"), 0.0)
    m.on_reply(pong("i2", state="draining"), 1.0)
    assert m.instance == "i2" and m.state == "draining" and not m.placeable(1.0)  # a new instance: restarted
    old = Member("tcp://b:1")
    old.on_reply({"type": "pong", "server": "runnerd 0.0.9"}, 0.0)  # a daemon from before fleets
    assert old.placeable(0.0) and old.concurrency == 1


def test_two_choices_prefer_the_less_loaded_and_skip_the_unplaceable():
    idle, busy, draining, dead = (Member(f"tcp://{n}:1") for n in ("idle", "busy", "draining", "dead"))
    idle.on_reply(pong(running=0), 0.0)
    busy.on_reply(pong(running=2, queued=6), 0.0)
    draining.on_reply(pong(state="draining"), 0.0)
    dead.since = -SILENCE_S
    dead.on_reply(pong(), -SILENCE_S)  # silent since, while this client pinged it every second
    for t in (-SILENCE_S, -2.0, -1.0, 0.0):
        assert dead.ping_due(t)
    for m in (idle, busy, draining):
        m.on_reply(pong(running=m.running, queued=m.queued, state=m.state), 0.0)
    members = [idle, busy, draining, dead]
    rng = random.Random(1)
    picks = Counter(placement.choose(members, {}, 0.0, rng=rng).endpoint for _ in range(200))
    assert set(picks) == {"tcp://idle:1"}  # of the two placeable, the idle one every time
    # This client's own jobs in flight count: 10 of them make "idle" the busier one.
    assert placement.choose(members, {"tcp://idle:1": 10}, 0.0, rng=rng) is busy
    assert placement.choose(members, {}, 0.0, exclude=frozenset({"tcp://idle:1", "tcp://busy:1"})) is None


def test_a_jobs_reply_says_the_load_fresher_than_the_last_pong_and_the_fresher_wins_a_tie():
    a, b = Member("tcp://a:1"), Member("tcp://b:1")
    a.on_reply(pong(running=2, queued=3), 0.0)
    b.on_reply(pong(running=2, queued=3), 0.0)
    # A result from a (its load once that job left): a is now the lighter one, for every pick.
    a.on_reply({"type": "result", "instance": "i1", "load": {"running": 1, "queued": 0, "concurrency": 2}}, 0.5)
    assert (a.running, a.queued, a.load_at) == (1, 0, 0.5)
    rng = random.Random(2)
    assert {placement.choose([a, b], {}, 0.5, rng=rng).endpoint for _ in range(50)} == {"tcp://a:1"}
    # Equal loads: the fresher news wins, whichever order the two were drawn in.
    b.on_reply({"type": "accepted", "instance": "i1", "load": {"running": 1, "queued": 0, "concurrency": 2}}, 0.7)
    assert {placement.choose([a, b], {}, 0.7, rng=rng).endpoint for _ in range(50)} == {"tcp://b:1"}
    # A reply without a load, or with a mangled one, leaves it; a job's reply never changes the state.
    b.on_reply({"type": "result", "instance": "i1", "load": {"running": -1, "queued": "x"}, "state": "draining"}, 0.9)
    b.on_reply({"type": "accepted", "instance": "i1", "load": "busy"}, 0.9)
    assert (b.running, b.queued, b.state, b.load_at) == (1, 0, "ready", 0.7)


def test_sessions_have_one_owner_every_client_agrees_on_and_a_leaving_daemon_moves_only_its_own():
    members = [Member(f"tcp://h{i}:1") for i in range(3)]
    for m in members:
        m.on_reply(pong(), 0.0)
    ids = [f"s{i}" for i in range(3000)]
    owners = {s: placement.owner(s, members, 0.0).endpoint for s in ids}
    shares = Counter(owners.values())
    assert all(800 < n < 1200 for n in shares.values()), shares
    members[2].on_reply(pong(state="draining"), 0.0)
    moved = [s for s in ids if placement.owner(s, members, 0.0).endpoint != owners[s]]
    assert all(owners[s] == "tcp://h2:1" for s in moved) and len(moved) == shares["tcp://h2:1"]


def test_curve_keys_per_daemon_or_one_shared(tmp_path):
    """Each daemon's connection is made with its own server key if given, else the shared one (a real handshake)."""
    import zmq
    import zmq.auth

    from runnerd.client import Client, curve_keys

    for name in ("client", "a", "shared"):
        zmq.auth.create_certificates(str(tmp_path), name)
    ctx = zmq.Context()
    routers = {}
    for name in ("a", "shared"):  # a CURVE server with that key, no ZAP: any client key is let in
        public, secret = zmq.auth.load_certificate(str(tmp_path / f"{name}.key_secret"))
        router = ctx.socket(zmq.ROUTER)
        router.curve_publickey, router.curve_secretkey, router.curve_server = public, secret, True
        routers[f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"] = router
    a, b = routers
    keys = curve_keys(tmp_path / "client.key_secret", servers={a: tmp_path / "a.key"})
    with Client(f"{a},{b}", curve=keys, context=ctx) as c:
        with pytest.raises(ClientError, match=f"no CURVE server key for {b}"):
            c.fleet.wait(0)
    keys = curve_keys(tmp_path / "client.key_secret", tmp_path / "shared.key", servers={a: tmp_path / "a.key"})
    with Client(f"{a},{b}", curve=keys, context=ctx) as c:
        c.fleet.ping_all(time.monotonic() + 3)  # connects to both and pings each (no pong comes)
        for router in routers.values():
            assert router.poll(10_000), "the ping did not arrive: the handshake failed"
            assert b"fleet-ping." in router.recv_multipart()[-1]
    with pytest.raises(ValueError, match="no server key"):
        curve_keys(tmp_path / "client.key_secret")
    for router in routers.values():
        router.close(0)
    ctx.term()


def test_a_client_that_was_not_waiting_does_not_take_its_own_silence_for_the_daemons():
    # A session run, then 10 s of thinking (no pings go out: the client waits for nothing), then the next run.
    m = Member("tcp://a:1", since=0.0)
    assert m.ping_due(0.0)
    m.on_reply(pong(), 0.1)
    assert not m.dead(10.0) and m.placeable(10.0)  # nobody asked it anything: it is not silent, it is unasked
    assert m.ping_due(10.0)  # watching again: silence counts from here
    assert not m.dead(10.0 + SILENCE_S - 0.01)
    assert m.ping_due(11.0) and m.ping_due(12.0)
    assert m.dead(10.0 + SILENCE_S) and not m.placeable(10.0 + SILENCE_S)


def test_a_restart_is_news_after_the_pin_not_what_the_fleet_knew_before():
    from runnerd.fleet.drive import lost
    from runnerd.fleet.placement import Pin

    m = Member("tcp://a:1", since=0.0)
    m.ping_due(0.0)
    m.on_reply(pong("old"), 0.1)  # what this client heard before the daemon restarted, unasked since
    pin = Pin("s", "tcp://a:1", "new", at=1.0)  # the open's own reply named the new instance
    assert lost(pin, {"tcp://a:1": m}, 1.5) is None
    m.on_reply(pong("new"), 2.0)
    assert lost(pin, {"tcp://a:1": m}, 2.0) is None
    m.on_reply(pong("newer"), 3.0)
    gone = lost(pin, {"tcp://a:1": m}, 3.0)
    assert gone is not None and "restarted (instance new -> newer)" in str(gone)


def test_a_ping_that_cannot_go_out_is_tried_again_sooner_at_first_then_each_second():
    from runnerd.fleet.members import PING_INTERVAL_S, PING_RETRY_S

    m = Member("tcp://down:1", since=0.0)
    now, gaps = 0.0, []
    for _ in range(2000):  # a daemon whose connection never comes up, for half an hour of tries
        assert m.ping_due(now)
        m.ping_went(now, sent=False)
        due = m.ping_sent + PING_INTERVAL_S
        gaps.append(round(due - now, 6))
        now = due + 1e-9  # (just past: float sums)
    assert gaps[:4] == [PING_RETRY_S, 2 * PING_RETRY_S, 4 * PING_RETRY_S, 8 * PING_RETRY_S]
    assert set(gaps[10:]) == {PING_INTERVAL_S}
    assert m.ping_due(now)
    m.ping_went(now, sent=True)  # it came up: the next ping is a full interval later, and a failure starts over
    assert m.unsent == 0 and not m.ping_due(now + PING_INTERVAL_S - 0.01) and m.ping_due(now + PING_INTERVAL_S)


def test_a_tenant_the_daemon_would_refuse_is_refused_by_the_client_at_once():
    from runnerd.client import Client

    for bad in ("", "a b", "x" * 129, "ünï"):
        with pytest.raises(ValueError, match="tenant must be"):
            Client("ipc:///nonexistent/runnerd.sock", tenant=bad)
    with Client("ipc:///nonexistent/runnerd.sock", tenant="team-a:alice") as c:
        assert c.tenant == "team-a:alice"
