"""The daemon through real sockets: a real ``runnerd serve`` process, over ipc and tcp."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import msgpack
import pytest
import zmq

from runnerd.client import Accepted, AsyncClient, Client, Finished, Output
from runnerd.errors import RemoteError
from runnerd.result import Outcome, Reason

from .conftest import start_daemon

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_ping(endpoint):
    with Client(endpoint) as c:
        pong = c.ping()
    assert pong["type"] == "pong" and pong["protocol"] == 1 and pong["server"].startswith("runnerd ")


def test_run_without_streaming(endpoint):
    with Client(endpoint) as c:
        result = c.run("print('hi')", files={"a.txt": b"A"}, timeout=10)
    assert result.ok and result.stdout == "hi\n"


def test_streaming_chunks_come_in_print_order(endpoint):
    code = (
        "import sys, time\n"
        "for i in range(6):\n"
        "    stream = sys.stdout if i % 2 == 0 else sys.stderr\n"
        "    print(f'line {i}', file=stream, flush=True)\n"
        "    time.sleep(0.05)\n"
    )
    with Client(endpoint) as c:
        events = list(c.stream(code, timeout=10))
    assert isinstance(events[0], Accepted) and isinstance(events[-1], Finished)
    runs: list[list] = []  # adjacent chunks of one stream merged (print writes text and end apart)
    for e in events:
        if isinstance(e, Output):
            if runs and runs[-1][0] == e.stream:
                runs[-1][1] += e.data.decode()
            else:
                runs.append([e.stream, e.data.decode()])
    assert runs == [["stdout" if i % 2 == 0 else "stderr", f"line {i}\n"] for i in range(6)]
    result = events[-1].result
    assert result.stdout == "line 0\nline 2\nline 4\n"


def test_exception_result(endpoint):
    with Client(endpoint) as c:
        result = c.run("x = 1\nraise ValueError('bad value')\n")
    assert result.reason is Reason.EXCEPTION
    assert (result.error.type, result.error.message, result.error.lineno) == ("ValueError", "bad value", 2)


def test_deadline_result(endpoint):
    with Client(endpoint) as c:
        result = c.run("import time\nprint('tick', flush=True)\ntime.sleep(30)", timeout=1.5)
    assert result.outcome is Outcome.DEADLINE_EXCEEDED and result.stdout == "tick\n"


def test_twenty_clients_at_once(endpoint):
    results: dict[int, object] = {}

    def one(i: int) -> None:
        with Client(endpoint) as c:
            results[i] = c.run(f"print({i} * 1000 + 7)", timeout=20, wait=240)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(20))
    for i, r in results.items():
        assert r.ok and r.stdout == f"{i * 1000 + 7}\n", (i, r)


def test_async_client(endpoint):
    async def main():
        async with AsyncClient(endpoint) as c:
            pong = await c.ping()
            events = [e async for e in c.stream("print('a'); print('b')")]
            result = await c.run("raise SystemExit(4)")
        return pong, events, result

    pong, events, result = asyncio.run(main())
    assert pong["protocol"] == 1
    assert b"".join(e.data for e in events if isinstance(e, Output)) == b"a\nb\n"
    assert result.reason is Reason.EXIT and result.exit_code == 4


def test_same_id_runs_once(daemon):
    job_id = f"dup-{uuid.uuid4().hex}"
    code = "import os\nprint(os.urandom(8).hex())"
    with Client(daemon.ipc) as c:
        before = c.stats()["done"]
        first = c.run(code, job_id=job_id)
        again = c.run(code, job_id=job_id)  # after it finished
    with Client(daemon.tcp) as other:  # another connection, another transport
        third = other.run(code, job_id=job_id)
        after = other.stats()["done"]
    assert first.ok and first.stdout == again.stdout == third.stdout
    assert after - before == 1
    with Client(daemon.ipc) as c, pytest.raises(RemoteError, match="already names a different job"):
        c.run("print('other code')", job_id=job_id)


def test_resend_while_running_subscribes(daemon):
    job_id = f"resend-{uuid.uuid4().hex}"
    code = "import time, os\nprint(os.urandom(4).hex(), flush=True)\ntime.sleep(1.5)\nprint('end')"
    out: dict[str, object] = {}

    def first() -> None:
        with Client(daemon.ipc) as c:
            out["a"] = c.run(code, job_id=job_id)

    t = threading.Thread(target=first)
    t.start()
    time.sleep(0.7)
    with Client(daemon.tcp) as c:  # a "reconnected" client asking for the same job
        events = list(c.stream(code, job_id=job_id))
    t.join()
    result = events[-1].result
    assert result.stdout == out["a"].stdout and result.stdout.endswith("end\n")
    # the replayed stream starts at offset 0: the client got everything once
    assert b"".join(e.data for e in events if isinstance(e, Output)).decode() == result.stdout


def test_cancel_running_job(daemon):
    job_id = f"cancel-{uuid.uuid4().hex}"
    out: dict[str, object] = {}

    def waiter() -> None:
        with Client(daemon.ipc) as c:
            out["r"] = c.run("import time\nprint('going', flush=True)\ntime.sleep(25)", job_id=job_id)

    t = threading.Thread(target=waiter)
    t.start()
    _wait_state(daemon.tcp, job_id, "running")
    with Client(daemon.tcp) as c:
        ack = c.cancel(job_id)
    t.join(timeout=20)
    assert ack["state"] == "running"
    result = out["r"]
    assert result.outcome is Outcome.FAILED and result.reason is Reason.CANCELLED
    assert result.stdout == "going\n" and result.usage.wall_s < 20
    with Client(daemon.tcp) as c, pytest.raises(RemoteError, match="NOT_FOUND"):
        c.cancel(job_id)


def _wait_state(endpoint: str, job_id: str, state: str, timeout: float = 20) -> None:
    """Poll with a resend of... nothing: use stats until the daemon runs something."""
    deadline = time.monotonic() + timeout
    with Client(endpoint) as c:
        while time.monotonic() < deadline:
            if c.stats()["running" if state == "running" else "queued"] >= 1:
                time.sleep(0.3)
                return
            time.sleep(0.05)
    raise AssertionError(f"{job_id} never became {state}")


def test_busy_and_cancel_queued(cage_confirmed, state_dir):
    d = start_daemon(state_dir, "busy", cage_confirmed.config.sandbox_env, concurrency=1, queue_size=1)
    try:
        sleeper = "import time\ntime.sleep(20)"
        ids = [f"b{i}-{uuid.uuid4().hex}" for i in range(2)]
        results: dict[str, object] = {}

        def submit(job_id: str) -> None:
            with Client(d.ipc) as c:
                results[job_id] = c.run(sleeper, job_id=job_id)

        threads = [threading.Thread(target=submit, args=(i,)) for i in ids]
        threads[0].start()
        _wait_state(d.ipc, ids[0], "running")
        threads[1].start()
        _wait_state(d.ipc, ids[1], "queued")
        t0 = time.monotonic()
        with Client(d.tcp) as c, pytest.raises(RemoteError) as info:
            c.run("print('one too many')")
        assert info.value.code == "BUSY" and time.monotonic() - t0 < 2
        assert "queue_size 1" in info.value.message
        with Client(d.tcp) as c:
            assert c.cancel(ids[1])["state"] == "queued"
            assert c.cancel(ids[0])["state"] == "running"
        for t in threads:
            t.join(timeout=20)
        assert {results[i].reason for i in ids} == {Reason.CANCELLED}
        assert results[ids[1]].usage.wall_s == 0.0  # it never ran
        with Client(d.ipc) as c:
            assert c.run("print('free again')").ok
    finally:
        assert d.stop() == 0, d.log()


# ---------------------------------------------------------------- malformed requests


def _raw(endpoint: str, frames: list[bytes], timeout_ms: int = 10_000) -> dict:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(timeout_ms), "no reply"
        return msgpack.unpackb(sock.recv(), raw=False)
    finally:
        sock.close()


def pack(m) -> bytes:
    return msgpack.packb(m, use_bin_type=True)


def run_req(**fields) -> bytes:
    base = {"v": 1, "op": "run", "id": "bad-1", "code": "print(1)"}
    base.update(fields)
    return pack({k: v for k, v in base.items() if v is not ...})


def nested(depth: int):
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


def deep_run_frame(depth: int) -> bytes:
    """A run whose code is a list nested *depth* deep (msgpack's packer stops at 512)."""
    head = b"\x84" + b"".join(pack(x) for x in ("v", 1, "op", "run", "id", "bad-1", "code"))
    return head + b"\x91" * depth + pack("x")


MALFORMED = [
    ("not msgpack", [b"\xc1\xc1\xc1"], "BAD_REQUEST", "not valid msgpack"),
    ("truncated msgpack", [pack({"v": 1, "op": "ping", "id": "x"})[:-2]], "BAD_REQUEST", "not valid msgpack"),
    ("two objects", [pack({"v": 1}) + pack({"v": 1})], "BAD_REQUEST", "more than one msgpack object"),
    ("not a map", [pack([1, 2, 3])], "BAD_REQUEST", "is a msgpack map"),
    ("empty frame", [b""], "BAD_REQUEST", "not valid msgpack"),
    ("two frames", [pack({"v": 1, "op": "ping", "id": "x"}), b"extra"], "BAD_REQUEST", "got 2 frames"),
    ("missing v", [pack({"op": "ping", "id": "x"})], "BAD_REQUEST", "missing field 'v'"),
    ("v is 2", [pack({"v": 2, "op": "ping", "id": "x"})], "UNSUPPORTED_VERSION", "v: 1"),
    ("v is a string", [pack({"v": "1", "op": "ping", "id": "x"})], "UNSUPPORTED_VERSION", "not supported"),
    ("missing id", [pack({"v": 1, "op": "ping"})], "BAD_REQUEST", "missing field 'id'"),
    ("bad id", [pack({"v": 1, "op": "ping", "id": "a b/c"})], "BAD_REQUEST", "id must be"),
    ("long id", [pack({"v": 1, "op": "ping", "id": "x" * 129})], "BAD_REQUEST", "id must be"),
    ("missing op", [pack({"v": 1, "id": "x"})], "BAD_REQUEST", "missing field 'op'"),
    ("unknown op", [pack({"v": 1, "op": "exec", "id": "x"})], "BAD_REQUEST", "unknown op 'exec'"),
    ("unknown field", [run_req(timout=5)], "BAD_REQUEST", "unknown field(s) 'timout'"),
    ("missing code", [run_req(code=...)], "BAD_REQUEST", "missing field 'code'"),
    ("code is int", [run_req(code=42)], "BAD_REQUEST", "code must be a string"),
    ("code is bin", [run_req(code=b"print(1)")], "BAD_REQUEST", "code must be a string"),
    ("code too large", [run_req(code="#" * (1024 * 1024 + 1))], "TOO_LARGE", "the limit is 1048576"),
    ("files not a list", [run_req(files={"a": b""})], "BAD_REQUEST", "files must be a list"),
    ("file not a map", [run_req(files=["a.csv"])], "BAD_REQUEST", "files[0] must be a map"),
    ("file extra field", [run_req(files=[{"name": "a", "data": b"", "mode": 7}])], "BAD_REQUEST", "exactly the fields"),
    ("file name slash", [run_req(files=[{"name": "../etc/passwd", "data": b""}])], "BAD_REQUEST", "contains '/'"),
    ("file name dotdot", [run_req(files=[{"name": "..", "data": b""}])], "BAD_REQUEST", "not a file name"),
    ("file name NUL", [run_req(files=[{"name": "a\x00b", "data": b""}])], "BAD_REQUEST", "NUL"),
    ("file name empty", [run_req(files=[{"name": "", "data": b""}])], "BAD_REQUEST", "empty"),
    ("file name long", [run_req(files=[{"name": "n" * 256, "data": b""}])], "BAD_REQUEST", "256 bytes long"),
    ("file data str", [run_req(files=[{"name": "a", "data": "text"}])], "BAD_REQUEST", "must be bytes"),
    (
        "too many files",
        [run_req(files=[{"name": f"f{i}", "data": b""} for i in range(101)])],
        "TOO_LARGE",
        "limit is 100",
    ),
    (
        "files too big",
        [run_req(files=[{"name": f"f{i}", "data": b"\0" * (17 << 20)} for i in range(4)])],
        "TOO_LARGE",
        "67108864",
    ),
    ("negative timeout", [run_req(timeout=-1)], "BAD_REQUEST", "positive number"),
    ("timeout string", [run_req(timeout="5")], "BAD_REQUEST", "number of seconds"),
    ("stream not bool", [run_req(stream=1)], "BAD_REQUEST", "stream must be true or false"),
    ("deep nesting", [deep_run_frame(100_000)], "BAD_REQUEST", "nests too deeply"),
    ("nesting in files", [run_req(files=nested(200))], "BAD_REQUEST", "files[0] must be a map"),
    ("invalid utf-8", [b"\x81\xa2op\xa2\xff\xfe"], "BAD_REQUEST", "not valid UTF-8"),
    ("int map key", [pack({1: 2})], "BAD_REQUEST", "not valid msgpack"),
    ("ext type", [pack({"v": msgpack.ExtType(1, b"x"), "op": "ping", "id": "x"})], "BAD_REQUEST", "not valid msgpack"),
    ("cancel unknown", [pack({"v": 1, "op": "cancel", "id": "nobody"})], "NOT_FOUND", "no job to cancel"),
]


@pytest.mark.parametrize("case, frames, code, words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_their_error(daemon, case, frames, code, words):
    reply = _raw(daemon.tcp, frames)
    assert reply["type"] == "error", reply
    assert reply["code"] == code, reply
    assert words in reply["message"], reply
    assert reply["v"] == 1
    # and the daemon still serves
    with Client(daemon.ipc) as c:
        assert c.run("print(2 + 2)").stdout == "4\n"


def test_error_reply_carries_the_id_when_known(daemon):
    reply = _raw(daemon.ipc, [run_req(id="known-id", code=3)])
    assert reply["id"] == "known-id" and reply["code"] == "BAD_REQUEST"


# ---------------------------------------------------------------- a client from the docs alone


@pytest.mark.parametrize("kind", ["ipc", "tcp"])
def test_raw_client_from_the_protocol_doc(daemon, kind, tmp_path):
    code = tmp_path / "job.py"
    code.write_text(
        "import pandas as pd, matplotlib.pyplot as plt\n"
        "df = pd.read_csv('sales.csv')\n"
        "print(df['sales'].sum())\n"
        "df.groupby('region')['sales'].sum().plot.bar()\n"
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "raw_client.py"), daemon.endpoint(kind), str(code),
         str(EXAMPLES / "sales.csv"), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "12928"
    png = (out / "figure_001.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    assert "OUTCOME_OK" in proc.stderr
    # the raw client imports nothing of runnerd
    assert "runnerd" not in (EXAMPLES / "raw_client.py").read_text().split('"""', 2)[2].split("def main")[0]


def test_second_daemon_on_the_same_endpoint_refuses(daemon, cage_confirmed):
    cfg = daemon.config_path.read_text()
    proc = subprocess.run(
        [sys.executable, "-m", "runnerd", "--config", str(daemon.config_path), "serve"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "already served by another runnerd" in proc.stderr
    assert daemon.config_path.read_text() == cfg
    with Client(daemon.ipc) as c:
        assert c.ping()["pid"] == daemon.proc.pid
