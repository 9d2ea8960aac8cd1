"""``runnerd bench --modes integrations``: one agent step through each framework integration, beside a direct
``Session.run``, through one daemon.

Each step's code is W1's (``print(1)``), so a row's time is what the layer adds to a run; sequential steps:

* ``Session.run`` - runnerd's own client in an open session: the floor the integrations build on;
* ``smolagents executor`` - :class:`~runnerd.integrations.smolagents.RunnerdExecutor` called with the code,
  as ``CodeAgent`` calls it for a step;
* ``CodeAgent step`` - a whole step of smolagents' ``CodeAgent`` (a scripted model, no LLM, logging off):
  the model's reply parsed, the code run, the step written to memory; the step's own timing;
* ``LangChain tool`` - :class:`~runnerd.integrations.langchain.RunnerdPython` invoked with a ``thread_id``
  (its session);
* ``LangGraph step`` - one round of LangChain's ``create_agent`` (a LangGraph graph) with a scripted model:
  model node, tool node; the time between two tool results.

The agents run in runs of :data:`STEPS_PER_RUN` steps (their memory grows with each step; a run's set-up,
the executor's tools and variables, is not measured). The model is scripted, so these are the integration's
cost, not an LLM's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import RunnerdError
from ..result import Outcome
from .report import Progress, Row, row_of
from .workloads import WORKLOADS

STEPS_PER_RUN = 10
NEEDS = "pip install 'runnerd[smolagents,langchain]'"


def bench_integrations(endpoint: str, mode: str, n: int, progress: Progress) -> list[Row]:
    try:
        import langchain.agents  # noqa: F401
        import smolagents  # noqa: F401
    except ImportError as exc:
        raise RunnerdError(f"the integrations rows need the frameworks ({exc}): {NEEDS}") from None
    code = WORKLOADS["W1"]().code
    paths: list[tuple[str, Callable[[str, str, int], Iterator[float]]]] = [
        ("Session.run", _session),
        ("smolagents executor", _executor),
        ("CodeAgent step", _code_agent),
        ("LangChain tool", _tool),
        ("LangGraph step", _langgraph),
    ]
    rows = []
    for name, path in paths:
        label = f"{mode} {name}"
        times = []
        for t in path(endpoint, code, n):
            times.append(t)
            progress(label, len(times), n)
        rows.append(row_of("step", label, times, failures=0))
    floor = rows[0].p50_ms
    for row in rows[1:]:
        row.notes.append(f"step {row.mode}: p50 - Session.run's = {row.p50_ms - floor:+.2f} ms")
    return rows


def scripted_model(replies: list[str]) -> Any:
    """A smolagents model (no LLM) whose calls answer with *replies* in turn; ``seen`` keeps each call's messages,
    what the agent showed the model. The tests drive ``CodeAgent`` with it too."""
    from smolagents.models import ChatMessage, MessageRole, Model

    class Scripted(Model):
        def __init__(self) -> None:
            super().__init__(model_id="scripted")
            self.replies = replies
            self.seen: list[Any] = []

        def generate(self, messages: Any, stop_sequences: Any = None, **kwargs: Any) -> ChatMessage:
            self.seen.append(messages)
            return ChatMessage(role=MessageRole.ASSISTANT, content=self.replies.pop(0))

    return Scripted()


def scripted_chat(messages: list[Any], given: list[Any] | None = None) -> Any:
    """A LangChain chat model (no LLM) whose calls answer with *messages* in turn, whatever tools it is bound to;
    each call's messages are added to *given*. The tests drive LangGraph's agents with it too."""
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel

    class Scripted(GenericFakeChatModel):
        def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
            return self  # the script says which tool it calls

        def _generate(self, messages: Any, *args: Any, **kwargs: Any) -> Any:
            if given is not None:
                given.append(list(messages))
            return super()._generate(messages, *args, **kwargs)

    return Scripted(messages=iter(messages))


def python_call(code: str, call_id: str) -> Any:
    """A model's message that calls the tool (``python``) with *code*."""
    from langchain_core.messages import AIMessage

    return AIMessage(content="", tool_calls=[{"name": "python", "args": {"code": code}, "id": call_id}])


def _runs(n: int) -> Iterator[int]:
    """The sizes of the agent runs that make *n* steps."""
    while n > 0:
        yield min(n, STEPS_PER_RUN)
        n -= STEPS_PER_RUN


def _session(endpoint: str, code: str, n: int) -> Iterator[float]:
    from ..client import Client

    with Client(endpoint) as client, client.session() as session:
        session.run(code)  # warm-up
        for _ in range(n):
            t = time.perf_counter()
            result = session.run(code)
            yield time.perf_counter() - t
            _ok(result.outcome is Outcome.OK, result)


def _executor(endpoint: str, code: str, n: int) -> Iterator[float]:
    from smolagents.monitoring import AgentLogger, LogLevel

    from ..integrations.smolagents import RunnerdExecutor

    executor = RunnerdExecutor([], AgentLogger(level=LogLevel.OFF), endpoint)
    try:
        executor(code)
        for _ in range(n):
            t = time.perf_counter()
            out = executor(code)
            yield time.perf_counter() - t
            _ok(out.logs.strip() == "1", out)
    finally:
        executor.cleanup()


def _code_agent(endpoint: str, code: str, n: int) -> Iterator[float]:
    from smolagents.memory import ActionStep
    from smolagents.monitoring import LogLevel

    from ..integrations.smolagents import code_agent

    model = scripted_model([])
    agent = code_agent(model, endpoint, verbosity_level=LogLevel.OFF, max_steps=STEPS_PER_RUN + 1)
    try:
        for steps in _runs(n):
            model.replies = [f"<code>\n{code}\n</code>"] * steps + ["<code>\nfinal_answer(1)\n</code>"]
            agent.run("Print 1.")
            done = [s for s in agent.memory.steps if isinstance(s, ActionStep)][:steps]
            for step in done:
                _ok(step.error is None and step.timing.duration is not None, step.error)
                yield step.timing.duration
    finally:
        agent.python_executor.cleanup()


def _tool(endpoint: str, code: str, n: int) -> Iterator[float]:
    from ..integrations.langchain import RunnerdPython

    tool = RunnerdPython(endpoint=endpoint)
    config: Any = {"configurable": {"thread_id": "bench"}}
    try:
        tool.invoke({"code": code}, config)
        for _ in range(n):
            t = time.perf_counter()
            out = tool.invoke({"code": code}, config)
            yield time.perf_counter() - t
            _ok(out[0]["text"] == "1", out)
    finally:
        tool.close()


def _langgraph(endpoint: str, code: str, n: int) -> Iterator[float]:
    from langchain.agents import create_agent
    from langchain_core.messages import AIMessage

    from ..integrations.langchain import RunnerdPython

    tool = RunnerdPython(endpoint=endpoint)
    try:
        for run, steps in enumerate(_runs(n)):
            calls = [python_call(code, f"c{i}") for i in range(steps + 1)]
            agent = create_agent(scripted_chat([*calls, AIMessage(content="done")]), [tool])
            config: Any = {"configurable": {"thread_id": f"bench-{run}"}}
            ask: Any = {"messages": [("user", "Print 1.")]}
            last = None
            for update in agent.stream(ask, config, stream_mode="updates"):
                if "tools" not in update:
                    continue
                now = time.perf_counter()
                reply = update["tools"]["messages"][-1].content
                _ok(reply[0]["text"] == "1", reply)
                if last is not None:  # the first round opens the thread's session: not a step's cost
                    yield now - last
                last = now
    finally:
        tool.close()


def _ok(ok: bool, what: object) -> None:
    if not ok:
        raise RunnerdError(f"integrations bench: a step did not print 1: {what!r}"[:2000])
