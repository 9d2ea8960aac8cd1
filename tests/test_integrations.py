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

import subprocess
import sys
from typing import Any

import pytest

from runnerd.client import Client

CSV = b"region,amount\nnorth,10\nsouth,20\neast,30\n"
FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
NETWORK = "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=3)"
# The task, step by step: (code, what must be true of what the agent saw).
STEPS = [
    ("import pandas as pd\ndf = pd.read_csv('sales.csv')\nprint(df.shape)", "(3, 2)"),
    ("top = df.sort_values('amount').iloc[-1]['region']\nprint(top)", "east"),
    ("import matplotlib.pyplot as plt\ndf.plot(x='region', y='amount', kind='bar')\nplt.show()", None),
    ("print(df['missing'])", "KeyError"),
    (FORK_BOMB, None),
    (NETWORK, None),
    ("total = int(df['amount'].sum())\nprint(total)", "60"),
]


def confirmed(cage_confirmed: Any) -> None:
    """Hostile steps run only in a confirmed cage (the fixture fails the test otherwise)."""
    assert cage_confirmed.checks


@pytest.fixture(params=["cold", "warm"])
def endpoint(request: pytest.FixtureRequest, cage_confirmed: Any) -> str:
    confirmed(cage_confirmed)
    d = request.getfixturevalue("daemon" if request.param == "cold" else "warm_daemon")
    return str(d.ipc)


def test_a_smolagents_code_agent_runs_its_steps_in_one_session(endpoint: str) -> None:
    from smolagents.models import ChatMessage, MessageRole, Model

    from runnerd.integrations.smolagents import RunnerdExecutor, code_agent

    class Scripted(Model):
        def __init__(self) -> None:
            super().__init__(model_id="scripted")
            self.replies = [f"Thought: step {i}\n<code>\n{code}\n</code>" for i, (code, _) in enumerate(STEPS)]
            self.replies.append("Thought: done\n<code>\nfinal_answer(total)\n</code>")

        def generate(self, messages: Any, stop_sequences: Any = None, **kwargs: Any) -> ChatMessage:
            return ChatMessage(role=MessageRole.ASSISTANT, content=self.replies.pop(0))

    agent = code_agent(
        Scripted(), endpoint, files={"sales.csv": CSV}, additional_authorized_imports=["pandas", "matplotlib"],
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
        bomb, net = steps[4].error, steps[5].error
        assert bomb is not None and "TimeoutError" in str(bomb), bomb  # stopped in its cage at the deadline
        assert net is not None and ("OSError" in str(net) or "unreachable" in str(net)), net  # no network
        assert executor.session.alive  # one session all along
    finally:
        executor.cleanup()


def test_over_a_fleet_the_agents_session_stays_on_the_daemon_that_opened_it(daemon: Any, warm_daemon: Any) -> None:
    from smolagents.models import ChatMessage, MessageRole, Model

    from runnerd.integrations.smolagents import code_agent

    class Scripted(Model):
        def __init__(self) -> None:
            super().__init__(model_id="scripted")
            self.replies = [f"<code>\n{c}\n</code>" for c in ("x = 41", "y = x + 1", "final_answer(y)")]

        def generate(self, messages: Any, stop_sequences: Any = None, **kwargs: Any) -> ChatMessage:
            return ChatMessage(role=MessageRole.ASSISTANT, content=self.replies.pop(0))

    agent = code_agent(Scripted(), f"{daemon.ipc},{warm_daemon.ipc}", max_steps=5)
    try:
        assert agent.run("Add one to 41.") == 42
        pin = agent.python_executor.session.pin
        assert pin is not None and pin.endpoint in (daemon.ipc, warm_daemon.ipc)
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


def test_a_langgraph_react_agent_calls_the_tool_with_state_per_thread(endpoint: str) -> None:
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage, ToolMessage
    from langgraph.prebuilt import create_react_agent

    from runnerd.integrations.langchain import RunnerdPython

    class Scripted(GenericFakeChatModel):
        def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
            return self  # the script already says which tool it calls

    def call(i: int, code: str) -> AIMessage:
        return AIMessage(content="", tool_calls=[{"name": "python", "args": {"code": code}, "id": f"c{i}"}])

    script = [call(i, code) for i, (code, _) in enumerate(STEPS)] + [AIMessage(content="The total is 60.")]
    tool = RunnerdPython(endpoint=endpoint, files={"sales.csv": CSV}, timeout=10)
    try:
        agent = create_react_agent(Scripted(messages=iter(script)), [tool])
        out = agent.invoke({"messages": [("user", "Total sales?")]}, {"configurable": {"thread_id": "t1"}})
        replies = [m for m in out["messages"] if isinstance(m, ToolMessage)]
        assert len(replies) == len(STEPS) and out["messages"][-1].content == "The total is 60."
        for reply, (_, seen) in zip(replies, STEPS, strict=True):
            text = reply.content[0]["text"]
            assert seen is None or seen in text, (seen, text)
        plot = replies[2].content
        assert [b["type"] for b in plot] == ["text", "image"] and plot[1]["mime_type"] == "image/png"
        assert "TimeoutError" in replies[4].content[0]["text"]
        assert "OSError" in replies[5].content[0]["text"] or "unreachable" in replies[5].content[0]["text"]
        # Another thread has a session of its own; without a thread, a call is one-off.
        other = tool.invoke({"code": "print('df' in dir())"}, {"configurable": {"thread_id": "t2"}})
        assert other[0]["text"] == "False"
        again = tool.invoke({"code": "print('df' in dir())"}, {"configurable": {"thread_id": "t1"}})
        assert again[0]["text"] == "True"
        assert tool.invoke({"code": "print(6 * 7)"})[0]["text"] == "42"
    finally:
        tool.close()


def test_importing_runnerd_imports_no_framework() -> None:
    code = "import sys, runnerd, runnerd.client; print(sorted(m for m in ('smolagents', 'langchain_core', 'langgraph') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out
