"""Issue 19: runnerd under the agent frameworks' own loops, a scripted model driving each, through real daemons.

smolagents' ``CodeAgent`` (its ``Model`` interface, scripted) with
:class:`~runnerd.integrations.smolagents.RunnerdExecutor`, and LangGraph's
prebuilt ReAct agent (langchain-core's ``GenericFakeChatModel``, told to
accept tools) with :class:`~runnerd.integrations.langchain.RunnerdPython`,
against a cold and a warm daemon. One task for both: load a CSV in step 1,
use the DataFrame in step 2 (the session kept it), draw a plot (the image
reaches the agent), hit an error and recover, survive a fork bomb and a
network call (each fails inside the cage; the next step runs), answer.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import threading
import warnings
from typing import Any

import pytest

from runnerd.bench.integrations import python_call, scripted_chat, scripted_model
from runnerd.client import Client

from .test_sessions import wait_until

CSV = b"region,amount\nnorth,10\nsouth,20\neast,30\n"
FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
NETWORK = "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=3)"
# The task, step by step: (code, what must be true of what the agent saw). The fork bomb comes last before
# the answer: it may outlive its deadline's interrupt, and then the session ends (its variables with it), so the
# step after it loads the file again.
STEPS = [
    ("import pandas as pd\ndf = pd.read_csv('sales.csv')\nprint(df.shape)", "(3, 2)"),
    ("top = df.sort_values('amount').iloc[-1]['region']\nprint(top)", "east"),
    ("import matplotlib.pyplot as plt\ndf.plot(x='region', y='amount', kind='bar')\nplt.show()", None),
    ("print(df['missing'])", "KeyError"),
    (NETWORK, "OSError"),
    (FORK_BOMB, "at the limit of"),
    ("import pandas as pd\ntotal = int(pd.read_csv('sales.csv')['amount'].sum())\nprint(total)", "60"),
]
BOMB = 5
ENDED = "The session ended"


def confirmed(cage_confirmed: Any) -> None:
    """Hostile steps run only in a confirmed cage (the fixture fails the test otherwise)."""
    assert cage_confirmed.checks


@pytest.fixture(params=["cold", "warm"])
def endpoint(request: pytest.FixtureRequest, cage_confirmed: Any) -> str:
    confirmed(cage_confirmed)
    d = request.getfixturevalue("daemon" if request.param == "cold" else "warm_daemon")
    return str(d.ipc)


def test_a_smolagents_code_agent_runs_its_steps_in_one_session(endpoint: str) -> None:
    from runnerd.integrations.smolagents import RunnerdExecutor, code_agent

    replies = [f"Thought: step {i}\n<code>\n{code}\n</code>" for i, (code, _) in enumerate(STEPS)]
    replies.append("Thought: done\n<code>\nfinal_answer(total)\n</code>")
    model = scripted_model(replies)
    agent = code_agent(
        model, endpoint, files={"sales.csv": CSV}, additional_authorized_imports=["pandas", "matplotlib"],
        timeout=10, max_steps=len(STEPS) + 2,
    )  # fmt: skip
    executor = agent.python_executor
    assert isinstance(executor, RunnerdExecutor)
    try:
        answer = agent.run("What were the total sales?")
        assert answer == 60
        steps = [s for s in agent.memory.steps if type(s).__name__ == "ActionStep"]
        assert len(steps) == len(STEPS) + 1
        for step, (_, seen) in zip(steps, STEPS, strict=False):
            said = (step.observations or "") + (str(step.error) if step.error else "")
            assert seen is None or seen in said, (seen, said)
        plot = steps[2]
        assert plot.observations_images and plot.observations_images[0].format == "PNG"
        assert steps[3].error is not None and "KeyError" in str(steps[3].error)  # the agent's own retry saw it
        bomb = str(steps[BOMB].error)
        assert "TimeoutError" in bomb or ENDED in bomb, bomb  # stopped in its cage at the deadline
        # A session the bomb ended was opened again, its tools (final_answer) with it.
        assert executor.resets == (1 if ENDED in bomb else 0), bomb
        assert executor.session.alive
        # What the model was given: the plot as an image after step 2, the KeyError after step 3.
        parts = [[part for m in call for part in m.content] for call in model.seen]
        assert not any(p["type"] == "image" for p in parts[2]) and any(p["type"] == "image" for p in parts[3])
        assert not any("KeyError" in str(p.get("text")) for p in parts[3])
        assert any("KeyError" in str(p.get("text")) for p in parts[4])
    finally:
        executor.cleanup()


def test_over_a_fleet_the_agents_session_stays_on_the_daemon_that_opened_it(daemon: Any, warm_daemon: Any) -> None:
    from runnerd.integrations.smolagents import code_agent

    # 20 KB: past an error message's cap; then a second agent.run on the same session
    steps = ("x = 41", "y = x + 1", "final_answer(str(y) * 10_000)", "final_answer(y + 1)")
    model = scripted_model([f"<code>\n{c}\n</code>" for c in steps])
    both = (str(daemon.ipc), str(warm_daemon.ipc))
    before = {e: sessions_open(e) for e in both}
    agent = code_agent(model, ",".join(both), max_steps=5)
    try:
        assert agent.run("Add one to 41.") == "42" * 10_000
        assert agent.run("And one more.", reset=False) == 43  # the tools sent again, the variables kept
        pin = agent.python_executor.session.pin
        assert pin is not None
        home, other = (both[0], both[1]) if pin.endpoint == both[0] else (both[1], both[0])
        assert sessions_open(home) == before[home] + 1 and sessions_open(other) == before[other]
    finally:
        agent.python_executor.cleanup()


def test_smolagents_install_packages_is_refused_naming_the_library_set(endpoint: str) -> None:
    from smolagents.monitoring import AgentLogger, LogLevel
    from smolagents.utils import AgentError

    from runnerd.integrations.smolagents import RunnerdExecutor

    logger = AgentLogger(level=LogLevel.OFF)
    with Client(endpoint) as c:
        before = c.ping()["sessions_open"]
    with pytest.raises(AgentError, match="cannot install packages: leftpad not in its fixed library set"):
        RunnerdExecutor(["pandas", "leftpad"], logger, endpoint)
    with Client(endpoint) as c:
        assert c.ping()["sessions_open"] == before  # the refused executor closed its session
    ok = RunnerdExecutor(["pandas", "numpy.linalg", "pillow"], logger, endpoint)  # modules, or distributions
    try:
        assert ok.installed_packages == ["numpy", "pandas", "pillow"]
    finally:
        ok.cleanup()


def react_agent(builder: str, model: Any, tools: list[Any]) -> Any:
    """LangGraph's prebuilt ReAct agent, or LangChain 1.x's create_agent (its successor, built on LangGraph)."""
    if builder == "create_agent":
        from langchain.agents import create_agent

        return create_agent(model, tools)
    from langgraph.prebuilt import create_react_agent

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in LangGraph 1.x for create_agent, which is tested too
        return create_react_agent(model, tools)


@pytest.mark.parametrize("builder", ["create_react_agent", "create_agent"])
def test_a_langgraph_agent_calls_the_tool_with_state_per_thread(endpoint: str, builder: str) -> None:
    from langchain_core.messages import AIMessage, ToolMessage

    from runnerd.integrations.langchain import RunnerdPython

    given: list[Any] = []  # the messages of each call: what the agent showed the model

    script = [python_call(code, f"c{i}") for i, (code, _) in enumerate(STEPS)]
    script.append(AIMessage(content="The total is 60."))
    tool = RunnerdPython(endpoint=endpoint, files={"sales.csv": CSV}, timeout=10)
    try:
        agent = react_agent(builder, scripted_chat(script, given), [tool])
        out = agent.invoke({"messages": [("user", "Total sales?")]}, {"configurable": {"thread_id": "t1"}})
        replies = [m for m in out["messages"] if isinstance(m, ToolMessage)]
        assert len(replies) == len(STEPS) and out["messages"][-1].content == "The total is 60."
        for reply, (_, seen) in zip(replies, STEPS, strict=True):
            text = reply.content[0]["text"]
            assert seen is None or seen in text, (seen, text)
        plot = replies[2].content
        assert [b["type"] for b in plot] == ["text", "image"] and plot[1]["mime_type"] == "image/png"
        bomb = replies[BOMB].content[0]["text"]
        assert "TimeoutError" in bomb or ENDED in bomb, bomb
        if ENDED in bomb:  # the next call said the session was new
            assert "The previous session ended" in replies[BOMB + 1].content[0]["text"]
        # Another thread has a session of its own; without a thread, a call is one-off.
        other = tool.invoke({"code": "print('total' in dir())"}, {"configurable": {"thread_id": "t2"}})
        assert other[0]["text"] == "False"
        again = tool.invoke({"code": "print('total' in dir())"}, {"configurable": {"thread_id": "t1"}})
        assert again[0]["text"] == "True"
        assert tool.invoke({"code": "print(6 * 7)"})[0]["text"] == "42"
        # What the model was given: the plot's image block after step 2, the KeyError after step 3.
        last = [call[-1] for call in given]
        assert isinstance(last[3], ToolMessage) and last[3].content[1]["type"] == "image"
        assert "KeyError" in last[4].content[0]["text"]
    finally:
        tool.close()


def test_importing_runnerd_imports_no_framework() -> None:
    code = "import sys, runnerd, runnerd.client; print(sorted(m for m in ('smolagents', 'langchain', 'langchain_core', 'langgraph') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out


def test_the_integrations_bench_measures_each_path(warm_daemon: Any) -> None:
    from runnerd.bench import Progress, bench_integrations

    rows = bench_integrations(str(warm_daemon.ipc), "warm", 3, Progress())
    assert [r.mode for r in rows] == [
        "warm Session.run", "warm smolagents executor", "warm CodeAgent step", "warm LangChain tool",
        "warm LangGraph step",
    ]  # fmt: skip
    assert all(r.jobs == 3 and r.failures == 0 and r.p50_ms > 0 for r in rows), rows


def sessions_open(endpoint: str) -> int:
    with Client(endpoint) as c:
        return int(c.ping()["sessions_open"])


def assert_reopened_and_told(executor: Any, tool: Any, thread: Any, cause: str) -> None:
    """After their sessions ended under them, each integration runs the next step in a new session and says so
    first, naming *cause*: the executor's has the agent's tools (final_answer), neither has ``x``."""
    from smolagents.utils import AgentError

    told = f"(?s)The previous session ended: {cause}.*This code ran in a new session.*NameError"
    with pytest.raises(AgentError, match=told):
        executor("print(x)")
    out = executor("final_answer('x' in dir())")
    assert out.is_final_answer and out.output is False and executor.resets == 1
    text = tool.invoke({"code": "print(x)"}, thread)[0]["text"]
    assert re.search(told, text), text
    assert tool.invoke({"code": "print('x' in dir())"}, thread)[0]["text"] == "False"


def test_a_session_that_ends_between_steps_is_opened_again_and_the_agent_is_told(daemon: Any) -> None:
    from smolagents.default_tools import FinalAnswerTool
    from smolagents.monitoring import AgentLogger, LogLevel

    from runnerd.integrations.langchain import RunnerdPython
    from runnerd.integrations.smolagents import RunnerdExecutor

    endpoint = str(daemon.ipc)
    before = sessions_open(endpoint)
    executor = RunnerdExecutor([], AgentLogger(level=LogLevel.OFF), endpoint, idle_timeout=1)
    tool = RunnerdPython(endpoint=endpoint, idle_timeout=1)
    thread = {"configurable": {"thread_id": "t"}}
    try:
        executor.send_tools({"final_answer": FinalAnswerTool()})
        executor("x = 1")
        tool.invoke({"code": "x = 1"}, thread)
        wait_until(lambda: sessions_open(endpoint) == before, 60, "both sessions ended idle")
        assert_reopened_and_told(executor, tool, thread, "nothing ran in it for its idle timeout")
    finally:
        executor.cleanup()
        tool.close()
    assert sessions_open(endpoint) == before


def test_the_langchain_tools_threads_run_side_by_side(daemon: Any) -> None:
    from runnerd.integrations.langchain import RunnerdPython

    endpoint = str(daemon.ipc)
    tool = RunnerdPython(endpoint=endpoint, timeout=20)
    slow = threading.Thread(
        target=tool.invoke, args=({"code": "import time\ntime.sleep(8)"}, {"configurable": {"thread_id": "slow"}})
    )
    try:
        slow.start()

        def running() -> bool:
            with Client(endpoint) as c:
                return int(c.ping()["running"]) == 1

        wait_until(running, 60, "the slow thread's code running")
        fast = tool.invoke({"code": "print(1)"}, {"configurable": {"thread_id": "fast"}})
        assert fast[0]["text"] == "1"
        assert slow.is_alive()  # the fast thread did not wait for the slow one's turn
        assert tool.invoke({"code": "print(2)"})[0]["text"] == "2"  # a one-off beside it too
        assert slow.is_alive()
    finally:
        slow.join()
        tool.close()


def make_png(width: int, height: int, rows: int = 0) -> bytes:
    """A PNG that claims *width* x *height* pixels (RGB), with *rows* rows of black: a few bytes for any canvas."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    head = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    pixels = zlib.compress(b"\x00" * (rows * (1 + 3 * width)))
    return b"\x89PNG\r\n\x1a\n" + head + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def writes(name: str, data: bytes) -> str:
    """A step that writes *data* to *name* in its working directory (a PNG there comes back as a figure)."""
    return f"open({name!r}, 'wb').write({data!r})"


def test_figures_from_the_cage_are_decoded_on_the_host_only_when_small_and_whole(daemon: Any) -> None:
    from smolagents.monitoring import AgentLogger, LogLevel

    from runnerd.integrations.smolagents import RunnerdExecutor

    with pytest.raises(ValueError, match="a pickle made by the caged code runs code on this host"):
        RunnerdExecutor([], AgentLogger(level=LogLevel.OFF), str(daemon.ipc), allow_pickle=True)
    executor = RunnerdExecutor([], AgentLogger(level=LogLevel.OFF), str(daemon.ipc))
    try:
        out = executor(writes("huge.png", make_png(5000, 5000)))  # under PIL's own bomb check
        assert executor.last_result is not None and [f.name for f in executor.last_result.figures] == ["huge.png"]
        assert executor.last_figures == [] and "huge.png not shown: 5000x5000 pixels" in out.logs, out.logs
        out = executor(writes("cut.png", make_png(64, 64)))  # an IDAT with no rows: cut off
        assert executor.last_figures == [] and "cut.png not shown: it could not be decoded" in out.logs, out.logs
        out = executor(writes("small.png", make_png(4, 4, rows=4)))
        assert len(executor.last_figures) == 1 and executor.last_figures[0].size == (4, 4), out.logs
    finally:
        executor.cleanup()


def test_a_final_answer_from_the_cage_is_checked_before_this_host_decodes_it(daemon: Any) -> None:
    from smolagents.monitoring import AgentLogger, LogLevel
    from smolagents.utils import AgentError

    from runnerd.integrations.smolagents import RunnerdExecutor

    def answer(payload: str) -> str:  # what final_answer raises, forged by the step
        return f"class FinalAnswerException(BaseException): pass\nraise FinalAnswerException({payload!r})"

    huge = base64.b64encode(make_png(5000, 5000)).decode()
    refused = {
        "pickle:gASVIQAAAAAAAACMBXBvc2l4lIwGc3lzdGVtlJOUjAV0cnVlIJSFlFKULg==": "not smolagents' safe JSON",
        "safe:" + "[" * 100 + "]" * 100: "nested deeper than 64",
        'safe:{"__type__": "ndarray", "data": [1], "dtype": "(4096,)f8"}': "an array of dtype",
        'safe:{"__type__": "PIL.Image", "data": "%s"}' % huge: "not a PNG, JPEG or GIF of at most",
        'safe:{"__type__": "timedelta", "total_seconds": 1e300}': "OverflowError",
        'safe:{"__type__": "bytes", "data": 1}': "",
    }
    executor = RunnerdExecutor([], AgentLogger(level=LogLevel.OFF), str(daemon.ipc))
    try:
        for payload, why in refused.items():
            with pytest.raises(AgentError, match="could not be read back from the sandbox") as info:
                executor(answer(payload))
            assert why in str(info.value), (payload[:80], str(info.value))
        out = executor(answer('safe:{"__type__": "tuple", "data": [1, "a"]}'))
        assert out.is_final_answer and out.output == (1, "a")
        assert executor.session.alive
    finally:
        executor.cleanup()


def test_the_langchain_tool_answers_with_text_whatever_goes_wrong(daemon: Any) -> None:
    from runnerd.integrations.langchain import RunnerdPython

    big = RunnerdPython(endpoint=str(daemon.ipc), files={"big.bin": b"x" * (65 << 20)})  # past max_files_bytes
    try:
        for config in ({"configurable": {"thread_id": "t"}}, {}):  # the session's open, a one-off run
            text = big.invoke({"code": "print(1)"}, config)[0]["text"]
            assert text.startswith("runnerd refused the code: TOO_LARGE"), text
    finally:
        big.close()
    tool = RunnerdPython(endpoint=str(daemon.ipc))
    try:
        long = tool.invoke({"code": "print('x' * 100_000)\nraise ValueError('the end')"})[0]["text"]
        assert len(long) < 21_000 and "characters cut" in long and long.rstrip().endswith("ValueError: the end"), long[
            -300:
        ]
    finally:
        tool.close()
    assert "this tool was closed" in tool.invoke({"code": "print(1)"})[0]["text"]
