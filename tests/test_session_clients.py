"""Sessions from the client side: Client/AsyncClient sessions, ``runnerd repl``, the MCP tools, the loop, Gemini parts.

Tests named ``test_unit_*`` are pure logic (no daemon, no cage, no root):
``pytest tests/test_session_clients.py -k unit`` runs only them, in a second.
The rest drive a real ``runnerd serve`` (tests/conftest.py's fixtures).
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest

from runnerd.client import Accepted, AsyncClient, Client, Finished, Output, Session
from runnerd.errors import AttemptNotRun, ClientError, RemoteError
from runnerd.exchange import ABANDON_WAIT_S, _Ask, _run_request, _SessionState, session_end_from
from runnerd.explain import SESSION_ENDS, result_text, session_note
from runnerd.gemini import output_text
from runnerd.loop import Attempt, arun_loop, feedback, run_loop
from runnerd.repl import PS1, PS2, InputBuffer, Repl, _CtrlC, _Echo, interact
from runnerd.result import Outcome, Reason, Result, SessionEnd, SessionState

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SALES = (EXAMPLES / "sales.csv").read_bytes()


# ================================================================ pure logic (no daemon)


def _push_all(buffer: InputBuffer, lines: list[str]) -> list[str | None]:
    return [buffer.push(line) for line in lines]


def test_unit_repl_input_one_line_statements_run_at_once():
    b = InputBuffer()
    assert b.prompt == PS1
    assert b.push("x = 1") == "x = 1\n"
    assert b.push("print(x); y = 2") == "print(x); y = 2\n"
    assert b.push("") is None and b.push("   ") is None and b.prompt == PS1  # nothing typed: nothing runs


def test_unit_repl_input_blocks_wait_for_the_blank_line():
    b = InputBuffer()
    got = _push_all(b, ["def f(a):", "    if a:", "        return 1", "", "f(1)"])
    assert got[:3] == [None, None, None]
    assert got[3] == "def f(a):\n    if a:\n        return 1\n\n"
    assert got[4] == "f(1)\n" and b.prompt == PS1
    assert b.push("for i in range(2):") is None and b.prompt == PS2
    assert b.push("    print(i)") is None and b.push("") == "for i in range(2):\n    print(i)\n\n"


def test_unit_repl_input_open_brackets_strings_and_backslashes_continue():
    b = InputBuffer()
    assert b.push("d = {'a': 1,") is None and b.prompt == PS2
    assert b.push("     'b': 2}") == "d = {'a': 1,\n     'b': 2}\n"
    assert b.push('s = """one') is None and b.push('two"""') == 's = """one\ntwo"""\n'
    assert b.push("total = 1 + \\") is None and b.push("    2") == "total = 1 + \\\n    2\n"
    assert b.push("@decorator") is None and b.push("def g(): pass") is None and b.push("") is not None


def test_unit_repl_input_a_syntax_error_goes_to_the_sandbox_to_be_worded():
    b = InputBuffer()
    assert b.push("x = = 1") == "x = = 1\n"
    assert b.push("match = 1 if True else") == "match = 1 if True else\n"
    assert b.prompt == PS1


def test_unit_repl_input_reset_and_flush():
    b = InputBuffer()
    b.push("if True:")
    b.reset()
    assert b.prompt == PS1 and b.flush() is None
    b.push("if True:")
    b.push("    print(1)")
    assert b.flush() == "if True:\n    print(1)\n" and b.prompt == PS1


def test_unit_repl_echo_writes_a_resumed_stream_once_and_rewrites_an_interrupted_write():
    class Breaks(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.armed = True

        def write(self, s: str) -> int:
            if self.armed and "b" in s:
                self.armed = False
                raise KeyboardInterrupt
            return super().write(s)

    out, err = Breaks(), io.StringIO()
    echo = _Echo(out, err)
    echo.write("stdout", b"a1")
    with pytest.raises(KeyboardInterrupt):
        echo.write("stdout", b"b2")
    echo.write("stderr", b"E")
    echo.resume()  # the daemon replays the run from offset 0
    for chunk in (b"a1", b"b2", b"c3"):
        echo.write("stdout", chunk)
    echo.write("stderr", b"EF")
    assert out.getvalue() == "a1b2c3" and err.getvalue() == "EF" and echo.stderr_text == "EF"
    assert not echo.stdout_ends_line
    split = _Echo(out := io.StringIO(), io.StringIO())
    for byte in "é\n".encode():
        split.write("stdout", bytes([byte]))  # a character cut between chunks
    assert out.getvalue() == "é\n" and split.stdout_ends_line


def test_unit_repl_ctrl_c_raises_only_in_the_wait_for_a_reply_and_is_noted_elsewhere():
    before = signal.getsignal(signal.SIGINT)
    ctrl_c = _CtrlC()
    replies = [Accepted("j", "running"), Output("j", "stdout", b"x")]

    def daemon_replies():
        yield replies[0]
        signal.raise_signal(signal.SIGINT)  # Ctrl-C while the client waits for the next reply
        yield replies[1]

    with ctrl_c.handling():
        assert signal.getsignal(signal.SIGINT) is ctrl_c
        signal.raise_signal(signal.SIGINT)  # between two waits: noted, not raised here
        assert ctrl_c.pressed
        with pytest.raises(KeyboardInterrupt):
            next(ctrl_c.waits(iter(replies)))  # the next wait does not start: the press is acted on first
        assert not ctrl_c.pressed
        waits = ctrl_c.waits(daemon_replies())
        assert next(waits) == replies[0]
        with pytest.raises(KeyboardInterrupt):
            next(waits)
        assert ctrl_c.take() and not ctrl_c.waiting
        assert list(ctrl_c.waits(iter(replies))) == replies
    assert signal.getsignal(signal.SIGINT) is before


def test_unit_session_end_from_not_found_messages():
    assert session_end_from("session 's1' ended: idle_timeout") is SessionEnd.IDLE_TIMEOUT
    said = "session 's1' ended: no run for its idle timeout (1 s) (idle_timeout)"  # the daemon's wording
    assert session_end_from(said) is SessionEnd.IDLE_TIMEOUT
    assert session_end_from("session 's' ended: was closed by a client (closed)") is SessionEnd.CLOSED
    assert session_end_from("session 's1' ended: interrupt_ignored (did not stop)") is SessionEnd.INTERRUPT_IGNORED
    assert session_end_from("no session 's1'") is None
    assert session_end_from("session 's1' ended: eaten_by_a_grue") is None
    assert set(SESSION_ENDS) == set(SessionEnd)


def test_unit_ask_resends_after_silence_and_gives_up_at_its_deadline():
    ask = _Ask("open", "r1", ("opened",), wait=12.0, resend_interval=5.0, endpoint="ipc://x", now=100.0)
    assert ask.timeout(100.0) == 5.0
    assert not ask.resend_due(103.0) and ask.timeout(103.0) == 2.0
    assert ask.resend_due(105.0) and ask.timeout(105.0) == 5.0
    assert ask.timeout(109.0) == 1.0 and ask.resend_due(110.0)
    assert ask.timeout(111.0) == 1.0  # the deadline comes before the next resend
    with pytest.raises(ClientError, match="no answer to open from ipc://x within 12 s"):
        ask.timeout(112.0)
    once = _Ask("ping", "r2", ("pong",), wait=3.0, resend_interval=None, endpoint="e", now=0.0)
    assert once.timeout(1.0) == 2.0 and not once.resend_due(100.0)


def test_unit_ask_takes_only_its_answer():
    ask = _Ask("close", "r1", ("closed",), wait=10.0, resend_interval=5.0, endpoint="e", now=0.0)
    assert ask.answer({"id": "other", "type": "closed"}) is None
    assert ask.answer({"id": "r1", "type": "something-new"}) is None
    assert ask.answer({"id": "r1", "type": "closed", "session": "s"}) == {"id": "r1", "type": "closed", "session": "s"}
    with pytest.raises(RemoteError) as info:
        ask.answer({"id": "r1", "type": "error", "code": "NOT_FOUND", "message": "session 's' ended: closed"})
    assert info.value.code == "NOT_FOUND" and info.value.message == "session 's' ended: closed"


def test_unit_an_open_left_unanswered_is_undone_by_its_close():
    opening = _Ask("open", "r1", ("opened",), 5.0, 5.0, "ipc://x", 0.0, {"session": "s1", "idle_timeout": 9})
    undo = opening.undo(7.0)
    assert undo is not None and undo.op == "close" and undo.request_id != "r1"
    assert msgpack.unpackb(undo.request) == {"v": 1, "op": "close", "id": undo.request_id, "session": "s1"}
    assert undo.resend_interval is None and undo.timeout(7.0) == ABANDON_WAIT_S  # never resent, never long
    assert _Ask("ping", "r2", ("pong",), 1.0, None, "e", 0.0).undo(2.0) is None
    assert _Ask("close", "r3", ("closed",), 1.0, None, "e", 0.0, {"session": "s1"}).undo(2.0) is None


def test_unit_the_client_does_not_import_the_daemon():
    code = "import runnerd.client, sys; print(' '.join(m for m in sys.modules if m.startswith('runnerd.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "runnerd.client" in loaded and "runnerd.async_client" in loaded
    assert not [m for m in loaded if m.startswith(("runnerd.server", "runnerd.sandbox"))], loaded


def test_unit_run_request_names_its_session():
    msg = msgpack.unpackb(_run_request("j1", "x", {"a.csv": b"1"}, 5, True, session="s1"), raw=False)
    assert msg == {
        "v": 1, "op": "run", "id": "j1", "code": "x", "stream": True, "timeout": 5, "session": "s1",
        "files": [{"name": "a.csv", "data": b"1"}],
    }  # fmt: skip
    assert "session" not in msgpack.unpackb(_run_request("j2", "x", None, None, False), raw=False)


def _finished(alive: bool, ended: SessionEnd | None = None, sid: str = "s1") -> Finished:
    return Finished("j", Result(Outcome.OK, None, session=SessionState(sid, alive, ended)))


def test_unit_session_state_follows_the_daemons_replies():
    s = _SessionState("s1", {"in.csv": b"x"}, 30, timeout=60)
    assert s._open_fields() == {"session": "s1", "files": [{"name": "in.csv", "data": b"x"}], "idle_timeout": 30}
    with pytest.raises(ClientError, match="not open"):
        s._run_args("1", None, None, None, None, stream=False)
    assert not s._close_needed()
    s._on_opened({"type": "opened", "limits": {"run_timeout": 120, "idle_timeout": 30}})
    assert s.alive and s.opened and s.files == {"in.csv": b"x"} and s.limits["run_timeout"] == 120
    job_id, request, wait, given = s._run_args("1", {"b.txt": b"B"}, None, None, None, stream=True)
    assert wait == 120 + 30 and given == {"b.txt": b"B"}  # the session's run cap, plus the margin
    assert msgpack.unpackb(request, raw=False)["session"] == "s1"
    assert s._run_args("1", None, 2, None, "j7", stream=False)[0] == "j7"
    assert s._run_args("1", None, 2, None, None, stream=False)[2] == 32
    s._observe(Accepted(job_id, "queued"), given)
    assert s.files == {"in.csv": b"x", "b.txt": b"B"}
    s._observe(_finished(True), given)
    assert s.alive and s.ended is None and s._close_needed()
    s._observe(_finished(False, SessionEnd.MEMORY_LIMIT), given)
    assert not s.alive and s.ended is SessionEnd.MEMORY_LIMIT and not s._close_needed()
    old = s.id
    s._renew()
    assert s.id != old and not s.opened and s.ended is None and s.files == {} and s.open_files == {"in.csv": b"x"}


def test_unit_session_state_not_found_means_ended_other_errors_do_not():
    s = _SessionState(None, None, None, timeout=60)
    s._on_opened({"limits": {}})
    assert not s._gone(RemoteError("BUSY", "session 'x' has 8 runs waiting"))
    assert s.alive
    assert s._gone(RemoteError("NOT_FOUND", f"session {s.id!r} ended: idle_timeout"))
    assert not s.alive and s.ended is SessionEnd.IDLE_TIMEOUT and "idle_timeout" in (s.end_message or "")
    s2 = _SessionState(None, None, None, timeout=60)
    s2._on_opened({})
    s2._on_closed()
    assert s2.ended is SessionEnd.CLOSED and not s2._close_needed()
    with pytest.raises(ValueError, match="positive"):
        _SessionState(None, None, 0, timeout=1)


def test_unit_new_files_sends_only_what_the_session_lacks():
    s = _SessionState(None, {"a.csv": b"A"}, None, timeout=60)
    s._on_opened({})
    assert s.new_files({"a.csv": b"A", "b.csv": b"B"}) == {"b.csv": b"B"}
    assert s.new_files(None) == {}
    with pytest.raises(ValueError, match="different file named 'a.csv'"):
        s.new_files({"a.csv": b"changed"})


def test_unit_session_note_and_value_in_what_a_model_reads():
    alive = Result(Outcome.OK, None, stdout="hi\n", value="42", session=SessionState("s", True))
    dead = Result(Outcome.FAILED, Reason.MEMORY_LIMIT, session=SessionState("s", False, SessionEnd.MEMORY_LIMIT))
    one_off = Result(Outcome.OK, None, stdout="hi\n", value="42")
    assert session_note(alive) == "" and session_note(one_off) == ""
    assert "The session ended: its process used more memory" in session_note(dead)
    assert output_text(alive) == "hi\n42\n"
    assert output_text(one_off) == "hi\n"  # one-off runs read as before
    assert session_note(dead) in output_text(dead) and "MemoryError" in output_text(dead)
    assert result_text(alive) == "hi\n42"
    assert session_note(dead) in result_text(dead) and session_note(dead) in feedback(dead)
    assert "session" not in feedback(Result(Outcome.FAILED, Reason.EXIT, exit_code=3))


class _ScriptedSession(Session):
    """A session that answers with given results and records what the loop asked of it (no daemon)."""

    def __init__(self, *results: Result) -> None:
        super().__init__(SimpleNamespace(tenant=None))  # type: ignore[arg-type]  # no client: nothing here sends
        self.results = list(results)
        self.calls: list[str] = []
        self._on_opened({})

    def ensure_open(self) -> bool:
        self.calls.append("ensure_open")
        if self.alive:
            return False
        self._renew()
        self._on_opened({})
        return True

    def run(self, code, files=None, timeout=None, *, wait=None, job_id=None) -> Result:
        self.calls.append(f"run {sorted(files or {})}")
        result = self.results.pop(0)
        self._observe(Accepted("j", "running"), dict(files or {}))
        self._observe(Finished("j", result), {})
        return result


def test_unit_loop_in_a_session_reopens_after_the_code_ended_it_and_gives_files_once():
    died = Result(Outcome.FAILED, Reason.MEMORY_LIMIT, session=SessionState("s", False, SessionEnd.MEMORY_LIMIT))
    fine = Result(Outcome.OK, None, stdout="ok", session=SessionState("s", True))
    s = _ScriptedSession(Result(Outcome.FAILED, Reason.EXIT, exit_code=2, session=SessionState("s", True)), died, fine)
    first_id = s.id
    outcome = run_loop("t", lambda task, history: "code", session=s, files={"d.csv": b"1"})
    assert outcome.ok and len(outcome.attempts) == 3
    assert "The session ended: its process used more memory" in outcome.attempts[1].feedback
    assert s.calls == ["ensure_open", "run ['d.csv']", "ensure_open", "run []", "ensure_open", "run ['d.csv']"]
    assert s.id != first_id  # the third attempt ran in a new session, given the files again


def test_unit_loop_in_a_session_a_broken_cage_that_ended_it_is_not_rerun():
    broke = Result(Outcome.FAILED, Reason.SANDBOX_ERROR, session=SessionState("s", False, SessionEnd.SANDBOX_ERROR))
    s = _ScriptedSession(broke)
    with pytest.raises(AttemptNotRun, match="its session ended .its sandbox broke"):
        run_loop("t", lambda task, history: "code", session=s)
    assert s.calls.count("run []") == 1
    with pytest.raises(TypeError, match="client or a session"):
        run_loop("t", lambda task, history: "code")
    with pytest.raises(TypeError, match="client or a session"):
        run_loop("t", lambda task, history: "code", client=object(), session=s)  # type: ignore[arg-type]


# ================================================================ through a real daemon


def test_state_lives_across_runs(any_daemon):
    with Client(any_daemon.ipc) as c:
        one_off = c.run("6 * 7")
        with c.session(files={"data.csv": b"x,y\n1,2\n2,5\n"}) as s:
            assert s.alive and s.ended is None and s.limits["run_timeout"] > 0
            assert set(s.limits) >= {"idle_timeout", "max_lifetime", "run_timeout", "memory_bytes", "max_pending_runs"}
            first = s.run("import pandas as pd\ndf = pd.read_csv('data.csv')\ntotal = int(df['y'].sum())\n")
            second = s.run("print('total is', total)\ntotal + 1")
            third = s.run("x = None")
        assert not s.alive and s.ended is SessionEnd.CLOSED
        with pytest.raises(RemoteError) as gone:
            s.run("total")
        assert gone.value.code == "NOT_FOUND" and "ended" in gone.value.message, gone.value
    assert one_off.ok and one_off.value == "42" and one_off.session is None
    assert first.ok and first.value is None and first.session == SessionState(s.id, True, None)
    assert second.ok and second.stdout == "total is 7\n" and second.value == "8"
    assert third.ok and third.value is None


def test_stream_in_a_session_and_files_given_by_a_run(daemon):
    with Client(daemon.tcp) as c, c.session() as s:
        events = list(s.stream("import sys\nprint('out')\nprint('err', file=sys.stderr)\nn = 3\nn * 2", timeout=10))
        assert isinstance(events[0], Accepted) and isinstance(events[-1], Finished)
        chunks = {name: b"".join(e.data for e in events if isinstance(e, Output) and e.stream == name)
                  for name in ("stdout", "stderr")}  # fmt: skip
        assert chunks == {"stdout": b"out\n", "stderr": b"err\n"}
        assert events[-1].result.value == "6" and events[-1].result.session.alive
        got = s.run("print(open('b.txt').read(), n)", files={"b.txt": b"bee"})
        assert got.ok and got.stdout == "bee 3\n" and s.files == {"b.txt": b"bee"}
        assert s.new_files({"b.txt": b"bee", "c.txt": b"C"}) == {"c.txt": b"C"}
        with pytest.raises(RemoteError) as again:
            s.run("1", files={"b.txt": b"bee"})
        assert again.value.code == "BAD_REQUEST" and "b.txt" in again.value.message
        assert s.alive  # a refused run does not end the session
        made = s.run("import matplotlib.pyplot as plt\nopen('out.txt', 'w').write('o')\nplt.plot([1, 2])\n")
        assert [f.name for f in made.figures] == ["figure_001.png"] and [f.name for f in made.files] == ["out.txt"]
        later = s.run("print(len(open('out.txt').read()))")
        assert later.stdout == "1\n" and later.files == () and later.figures == ()  # only what this run made


def test_open_is_idempotent_and_close_after_the_end_is_not_an_error(daemon):
    sid = f"t-{uuid.uuid4().hex}"
    with Client(daemon.ipc) as c:
        s = c.session({"a.txt": b"A"}, idle_timeout=120, session_id=sid).open()
        twin = c.session({"a.txt": b"A"}, idle_timeout=120, session_id=sid).open()  # the same open, resent
        assert twin.alive and twin.id == s.id == sid
        with pytest.raises(RemoteError) as clash:
            c.session({"a.txt": b"other"}, idle_timeout=120, session_id=sid).open()
        assert clash.value.code == "BAD_REQUEST"
        s.run("kept = 5")
        assert twin.run("kept").value == "5"  # one session, two handles
        s.close()
        assert s.ended is SessionEnd.CLOSED
        twin.close()  # the daemon says NOT_FOUND (ended: closed): recorded, not raised
        assert not twin.alive and twin.ended is SessionEnd.CLOSED and "closed" in twin.end_message
        with pytest.raises(RemoteError) as ended:
            c.session({"a.txt": b"A"}, idle_timeout=120, session_id=sid).open()
        assert ended.value.code == "NOT_FOUND" and "closed" in ended.value.message
        with pytest.raises(RemoteError) as unknown:
            c._control("close", f"r-{sid}", ("closed",), 10, fields={"session": f"never-{sid}"})
        assert unknown.value.code == "NOT_FOUND" and "no session" in unknown.value.message
        with pytest.raises(RemoteError) as too_long:
            c.session(idle_timeout=10**7).open()
        assert too_long.value.code == "BAD_REQUEST"


def test_a_deadline_and_a_cancel_keep_the_session(daemon):
    with Client(daemon.ipc) as c, c.session() as s:
        s.run("before = 'still here'")
        late = s.run("import time\nprint('tick', flush=True)\ntime.sleep(60)", timeout=1)
        assert late.outcome is Outcome.DEADLINE_EXCEEDED and late.stdout == "tick\n"
        assert late.session.alive and s.alive
        job_id = f"cancel-{uuid.uuid4().hex}"
        result = None
        for event in s.stream("import time\nprint('started', flush=True)\ntime.sleep(60)", job_id=job_id):
            if isinstance(event, Output) and b"started" in event.data:
                assert c.cancel(job_id)["type"] == "cancelling"
            elif isinstance(event, Finished):
                result = event.result
        assert result is not None and result.reason is Reason.CANCELLED and result.session.alive
        assert s.run("before").value == "'still here'"


def test_a_session_that_ends_says_how_and_ensure_open_replaces_it(daemon):
    with Client(daemon.ipc) as c, c.session() as s:
        deaf = s.run(
            "import time\nwhile True:\n    try:\n        time.sleep(60)\n    except KeyboardInterrupt:\n        pass\n",
            timeout=1,
        )
        assert deaf.session == SessionState(s.id, False, SessionEnd.INTERRUPT_IGNORED)
        assert not s.alive and s.ended is SessionEnd.INTERRUPT_IGNORED
        old = s.id
        with pytest.raises(RemoteError) as gone:
            s.run("1")
        assert gone.value.code == "NOT_FOUND" and "interrupt_ignored" in gone.value.message
        assert s.ensure_open() and s.id != old and s.alive
        exited = s.run("import os\nos._exit(3)")
        assert exited.session.ended is SessionEnd.EXITED and not s.alive
        assert s.ensure_open() and s.run("1 + 1").value == "2"
        assert not s.ensure_open()  # alive: nothing to do


def test_idle_timeout_ends_a_session(daemon):
    with Client(daemon.ipc) as c:
        before = c.stats()["sessions"]["ended"].get("idle_timeout", 0)
        s = c.session(idle_timeout=1).open()
        assert s.limits["idle_timeout"] == 1
        deadline = time.monotonic() + 30
        while c.stats()["sessions"]["ended"].get("idle_timeout", 0) == before:
            assert time.monotonic() < deadline, "the idle session did not end"
            time.sleep(0.1)
        with pytest.raises(RemoteError) as gone:
            s.run("1")
        assert gone.value.code == "NOT_FOUND" and s.ended is SessionEnd.IDLE_TIMEOUT
        s.close()  # ended: nothing to do, no error
        stats = c.stats()["sessions"]
    assert set(stats) >= {"open", "opened", "closed", "ended", "max_sessions", "memory_budget_bytes", "memory_bytes"}


def test_async_session(daemon):
    async def main():
        async with AsyncClient(daemon.tcp) as c:
            async with c.session(files={"n.txt": b"20"}) as s:
                await s.run("n = int(open('n.txt').read())")
                events = [e async for e in s.stream("print(n + 1)\nn * 2")]
                sid = s.id
            return s, sid, events

    s, sid, events = asyncio.run(main())
    assert b"".join(e.data for e in events if isinstance(e, Output)) == b"21\n"
    assert events[-1].result.value == "40" and events[-1].result.session.id == sid
    assert s.ended is SessionEnd.CLOSED and not s.alive


def test_loop_attempts_and_turns_share_a_session(daemon):
    seen: list[int] = []

    def generate(task: str, history: tuple[Attempt, ...]) -> str:
        seen.append(len(history))
        if task == "load":
            if not history:  # loads, then trips over the column name: the next attempt still has df
                return "import pandas as pd\ndf = pd.read_csv('sales.csv')\ndf['revenue']\n"
            return "by_region = df.groupby('region')['sales'].sum()\nint(by_region['east'])"
        return "int(by_region.sum())"

    with Client(daemon.ipc) as c, c.session() as s:
        load = run_loop("load", generate, session=s, files={"sales.csv": SALES})
        total = run_loop("total", generate, session=s, files={"sales.csv": SALES})
        assert s.files == {"sales.csv": SALES}  # given once, with the first attempt
    assert [a.result.outcome for a in load.attempts] == [Outcome.FAILED, Outcome.OK]
    assert load.final.result.value == "3746" and "revenue" in load.attempts[0].feedback
    assert total.ok and total.final.result.value == "12928" and seen == [0, 1, 0]


def test_async_loop_in_a_session(daemon):
    async def main():
        async with AsyncClient(daemon.ipc) as c, c.session() as s:
            first = await arun_loop("a", lambda task, history: "x = 2", session=s)
            second = await arun_loop("b", lambda task, history: "x ** 5", session=s)
            return first, second

    first, second = asyncio.run(main())
    assert first.ok and second.final.result.value == "32"


def test_gemini_parts_of_a_conversation_in_one_session(daemon):
    from google.genai import types

    from runnerd.gemini import genai_parts

    with Client(daemon.ipc) as c, c.session() as s:
        turns = ["import math\nr = 2", "print('area')\nround(math.pi * r * r, 2)", "import os\nos._exit(1)"]
        history = [types.Content(role="model", parts=genai_parts(code, s.run(code))) for code in turns]
        assert not s.alive
        assert s.ensure_open()
        history.append(types.Content(role="model", parts=genai_parts("r", s.run("r"))))
    outputs = [content.parts[1].code_execution_result.output for content in history]
    assert outputs[0] == "" and outputs[1] == "area\n12.57\n"
    assert "The session ended: its Python process ended" in outputs[2]
    assert "NameError" in outputs[3]


def test_mcp_calls_share_a_session_until_reset(daemon):
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    params = StdioServerParameters(
        command=sys.executable, args=["-m", "runnerd", "mcp", "--endpoint", daemon.ipc], env=dict(os.environ)
    )
    sales = [{"name": "sales.csv", "content": SALES.decode()}]

    async def main():
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            tools = await session.list_tools()
            calls = [
                await session.call_tool("run_python", {"code": "import pandas as pd\ndf = pd.read_csv('sales.csv')", "files": sales}),
                await session.call_tool("run_python", {"code": "print(len(df))\nint(df['sales'].sum())", "files": sales}),
                await session.call_tool("run_python", {"code": "1", "files": [{"name": "sales.csv", "content": "other"}]}),
                await session.call_tool("reset_session", {}),
                await session.call_tool("run_python", {"code": "df"}),
                await session.call_tool("run_python", {"code": "import os\nos._exit(0)"}),
                await session.call_tool("run_python", {"code": "'again'"}),
            ]  # fmt: skip
            return tools, calls

    with Client(daemon.ipc) as c:
        closed_before = c.stats()["sessions"]["closed"]
        tools, (load, total, clash, reset, gone, exits, again) = asyncio.run(main())
        # The server's end closes its last session (reset_session closed the first); stats are the only witness.
        deadline = time.monotonic() + 30
        while c.stats()["sessions"]["closed"] < closed_before + 2:
            assert time.monotonic() < deadline, "the MCP server left its session open"
            time.sleep(0.1)
    assert sorted(t.name for t in tools.tools) == ["reset_session", "run_python"]
    assert not load.is_error and load.content[0].text == "(no output)"
    assert not total.is_error and total.content[0].text == "48\n12928"  # resent file: fine, same content
    assert clash.is_error and "already holds a different file named 'sales.csv'" in clash.content[0].text
    assert not reset.is_error and "Closed the session" in reset.content[0].text
    assert gone.is_error and "NameError" in gone.content[0].text  # a fresh session: no df
    assert "The session ended: its Python process ended" in exits.content[0].text
    assert not again.is_error and again.content[0].text.startswith("The previous session ended")
    assert again.content[0].text.endswith("'again'")


class _CtrlCOnce(io.StringIO):
    """The terminal: Ctrl-C arrives while the run shows *word* (raised where the repl writes it)."""

    def __init__(self, word: str) -> None:
        super().__init__()
        self.word = word
        self.armed = True

    def write(self, s: str) -> int:
        if self.armed and self.word in s:
            self.armed = False
            raise KeyboardInterrupt
        return super().write(s)


def test_repl_runs_blocks_shows_values_saves_figures_and_cancels_on_ctrl_c(daemon, tmp_path):
    out = _CtrlCOnce("started")
    figures = tmp_path / "figs"
    lines = [
        "x = 20",
        "def f(a):",
        "    return a + x",
        "",
        "f(22)",
        "import time",
        "print('started', flush=True); time.sleep(60)",
        "x",
        "import matplotlib.pyplot as plt",
        "plt.plot([1, 3, 2]); print('plotted')",
        "1/0",
        "open('data.csv').read()",
        "import os; os._exit(3)",
        "x",
        "if True:",
        "    print('no blank line at the end')",
    ]
    with Client(daemon.ipc) as c:
        repl = Repl(c, out, files={"data.csv": b"a,b\n"}, figures=figures, timeout=30)
        repl.start()
        first_id = repl.session.id
        interact(lines, repl)
    text = out.getvalue()
    assert f"session {first_id} at {daemon.ipc}" in text
    assert "42\n" in text and "runnerd: cancelling the run" in text
    assert "\n20\n" in text.split("cancelling the run", 1)[1]  # after the cancel, the session still has x
    assert text.count("started") == 1  # a resumed stream does not print twice
    assert "plotted\n" in text and f"figure saved: {figures / 'run8-figure_001.png'}" in text
    assert (figures / "run8-figure_001.png").read_bytes().startswith(b"\x89PNG")
    assert text.count("ZeroDivisionError: division by zero") == 1
    assert "'a,b\\n'" in text
    assert "the session ended: its Python process ended" in text
    assert "NameError: name 'x' is not defined" in text  # the next input ran in a new session
    assert text.count("runnerd: session ") == 2
    assert "no blank line at the end" in text
    assert repl.session.ended is SessionEnd.CLOSED  # the end of input closed it


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_runnerd_repl_command_with_ctrl_c_and_ctrl_d(daemon, tmp_path, sigint):
    data = tmp_path / "data.csv"
    data.write_bytes(b"x,y\n1,2\n2,5\n")
    # "ignored": started as a shell without job control starts `cmd &` (a test run started so
    # passes it on to the repl): Python then leaves SIGINT ignored, and the Ctrl-C went nowhere.
    # A Python handler here is SIG_DFL in the child (exec resets it); SIG_IGN is inherited.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler if sigint == "default" else signal.SIG_IGN)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runnerd", "repl", "--endpoint", daemon.tcp, "--file", str(data), "--figures", "figs"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path, text=True,
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, inherited)
    script = (
        "import pandas as pd\n"
        "df = pd.read_csv('data.csv')\n"
        "for v in df['y']:\n"
        "    print('y', v)\n"
        "\n"
        "int(df['y'].sum())\n"
        "import time\n"
        "print('started', flush=True); time.sleep(60)\n"
        "df.plot(); len(df)\n"
    )
    proc.stdin.write(script)
    proc.stdin.flush()
    seen = []
    for line in proc.stdout:  # read as it comes: the Ctrl-C goes in while the run sleeps
        seen.append(line)
        if "started" in line:
            proc.send_signal(signal.SIGINT)
            break
    proc.stdin.close()  # Ctrl-D after the last line
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 0, "".join(seen) + rest
    text = "".join(seen) + rest
    assert "y 2\n" in text and "y 5\n" in text and "7\n" in text
    assert "cancelling the run" in text
    assert "2\n" in rest and "figure saved: figs/run7-figure_001.png" in rest
    assert (tmp_path / "figs" / "run7-figure_001.png").read_bytes().startswith(b"\x89PNG")


class _CtrlCAtSend:
    """The client's socket, where Ctrl-C comes as the run request is sent, and the request is held back.

    *overtaken*: the request reaches the daemon only after the first cancel
    was answered, as when the cancel (on a connection of its own) is read
    first; else it never goes (Ctrl-C came before it was sent), and only a
    later send of the run brings it.
    """

    def __init__(self, sock: object, overtaken: bool) -> None:
        self.sock = sock
        self.overtaken = overtaken
        self.held: list[bytes] = []
        self.armed = True

    def __getattr__(self, name: str) -> object:
        return getattr(self.sock, name)

    def send(self, frame: bytes, *args: object, **kwargs: object) -> object:
        if not self.armed:
            return self.sock.send(frame, *args, **kwargs)
        self.armed = False
        self.held.append(frame)
        signal.raise_signal(signal.SIGINT)  # the handler runs here: KeyboardInterrupt in the client's wait
        raise AssertionError("SIGINT did not interrupt the run")

    def release(self) -> None:
        if self.overtaken:
            while self.held:
                self.sock.send(self.held.pop())


@pytest.mark.parametrize("when", ["before_send", "overtaken"])
def test_repl_ctrl_c_before_the_daemon_has_the_run_cancels_it(daemon, when):
    # The cancel went out at once, heard NOT_FOUND (no such run yet), took that for "finished", and
    # streamed the run again: the run ran to its deadline. Now it waits for the run's accepted.
    out = io.StringIO()
    with Client(daemon.ipc) as c:
        repl = Repl(c, out, timeout=10)
        repl.start()
        assert repl.feed("x = 1") is not None
        sock = _CtrlCAtSend(c._sock, overtaken=when == "overtaken")
        c._sock = sock
        cancel = c.cancel

        def cancel_then_release(job_id: str, timeout: float = 10.0) -> dict:
            try:
                return cancel(job_id, timeout)
            finally:
                sock.release()

        c.cancel = cancel_then_release
        result = repl.feed("import time; time.sleep(60)")
        after = repl.feed("x + 1")
        repl.finish()
    text = out.getvalue()
    assert result is not None and result.reason is Reason.CANCELLED, (result, text)  # not its deadline
    assert "cancelling the run" in text
    assert not sock.held or when == "before_send"  # overtaken: the run reached the daemon after the cancel
    # The prompt goes on: in the same session, or (a cancel that reaches the session before its code
    # starts is lost in the cage, and the daemon kills it as interrupt_ignored) in a new one, said so.
    assert after is not None and (after.value == "2" or "the session ended" in text), (after, text)


def test_threads_each_with_a_session(daemon):
    values: dict[int, str | None] = {}

    def one(i: int) -> None:
        with Client(daemon.ipc) as c, c.session() as s:
            s.run(f"k = {i}")
            values[i] = s.run("k * 100", wait=120).value

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert values == {i: str(i * 100) for i in range(4)}


def _sessions_after(c: Client, before: dict, deadline: float) -> dict:
    """The daemon's session counts once an open beyond *before* happened and ended closed (its state, polled)."""
    while True:
        now = c.stats()["sessions"]
        if now["opened"] > before["opened"] and now["closed"] > before["closed"] and now["open"] == before["open"]:
            return now
        assert time.monotonic() < deadline, f"the timed-out open was not closed: before {before}, now {now}"
        time.sleep(0.05)


def test_an_open_that_times_out_is_closed_not_orphaned(daemon):
    # A cold open starts a cage (about 50 ms here): a 10 ms timeout gives up before the daemon answers, and
    # the daemon opens the session anyway. The client must close that id, or it lives to its idle timeout.
    async def async_open(sid: str, handle: list) -> None:
        async with AsyncClient(daemon.ipc) as ac:
            handle.append(ac.session(session_id=sid, timeout=0.01))
            await handle[0].open()

    with Client(daemon.ipc) as c:
        for flavour in ("sync", "async"):
            sid = f"t-{flavour}-{uuid.uuid4().hex}"
            before = c.stats()["sessions"]
            handle: list = []
            with pytest.raises(ClientError, match="no answer to open") as timed_out:
                if flavour == "sync":
                    handle.append(c.session(session_id=sid, timeout=0.01))
                    handle[0].open()
                else:
                    asyncio.run(async_open(sid, handle))
            assert not isinstance(timed_out.value, RemoteError)
            assert handle[0].id != sid and not handle[0].opened  # a next open() is a new session
            _sessions_after(c, before, time.monotonic() + 20)
            with pytest.raises(RemoteError) as ended:  # that very id: opened by the daemon, then closed
                c.session(session_id=sid).open()
            assert ended.value.code == "NOT_FOUND" and ended.value.ended == "closed", ended.value
