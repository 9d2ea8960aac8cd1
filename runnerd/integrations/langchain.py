"""runnerd as a LangChain tool: Python in a runnerd sandbox, one session per agent thread.

``pip install runnerd[langchain]``, then, with LangChain's agent (a LangGraph graph; LangGraph's prebuilt
``create_react_agent`` takes the tool too)::

    from langchain.agents import create_agent
    from runnerd.integrations.langchain import RunnerdPython
    tool = RunnerdPython(endpoint="tcp://h1:7700", files={"sales.csv": data})
    agent = create_agent(model, [tool])
    agent.invoke({"messages": [("user", "Which region sold most?")]}, {"configurable": {"thread_id": "t1"}})

Each call's output is what a model should read (runnerd's one renderer,
:func:`runnerd.explain.result_text`, the MCP server's too), then each figure a model may be shown
(:mod:`runnerd.shown_figures`) as an image content block. With a ``thread_id`` in the run's config, the
thread's calls share one session (variables, imports and files kept between calls, on one daemon of a
fleet; each thread on its own connection, so threads run side by side; at most ``max_threads`` kept);
without one, or with ``stateful=False``, each call is a one-off run. A session that ended is replaced at the
next call, which runs in the new one and says so first (as the MCP server does). Whatever goes wrong is the
tool message, never an exception that would end the agent's run. :meth:`RunnerdPython.close` closes the
sessions and the clients.
"""

from __future__ import annotations

import base64
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ..client import Client, Session
from ..errors import ClientError, RemoteError
from ..explain import LIBRARIES, result_text, session_replaced
from ..result import Result
from ..shown_figures import shown

DESCRIPTION = (
    "Run Python 3 code in a sandbox and see what it printed, the value of its last expression, any error, and "
    "its Matplotlib figures as images. Variables, imports and files are kept between calls in this conversation. "
    f"Libraries: a fixed set ({LIBRARIES}); nothing can be installed; there is no network. Input files are in "
    "the working directory, by their bare names."
)


class _Code(BaseModel):
    code: str = Field(description="Python 3 source code to run")


class RunnerdPython(BaseTool):
    """The tool. A session per ``thread_id`` of the run's config, each on its own connection (parallel threads
    run in parallel); at most ``max_threads`` threads are kept, the least recently used one closed for a new one."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = "python"
    description: str = DESCRIPTION
    args_schema: type[BaseModel] = _Code
    endpoint: str | None = None
    files: Mapping[str, bytes] | None = None
    curve: Mapping[str, bytes] | None = None
    tenant: str | None = None
    timeout: float | None = None
    idle_timeout: float | None = None  # a thread's session ends after this long without a call (the daemon's)
    stateful: bool = True
    max_threads: int = Field(default=64, ge=1)  # the daemon's own default cap on open sessions

    _threads: OrderedDict[str, _Thread] = PrivateAttr(default_factory=OrderedDict)
    _idle: list[Client] = PrivateAttr(default_factory=list)  # one-off calls' clients, free for the next
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _closed: bool = PrivateAttr(default=False)

    def _run(self, code: str, config: RunnableConfig, run_manager: Any = None) -> list[str | dict[str, Any]]:
        thread = ((config or {}).get("configurable") or {}).get("thread_id")
        # Whatever goes wrong is the tool message, as the MCP server's: an exception here ends the agent's run.
        try:
            if not self.stateful or thread is None:
                return self._one_off(code)
            return self._in_thread(str(thread), code)
        except RemoteError as exc:
            return [_text(f"runnerd refused the code: {exc}")]  # BUSY, too large: the model can act on it
        except ClientError as exc:
            return [_text(f"runnerd could not run the code: {exc}")]

    def _in_thread(self, key: str, code: str) -> list[str | dict[str, Any]]:
        evicted: list[_Thread] = []
        with self._lock:
            self._check_open()
            mine = self._threads.get(key)
            if mine is None:
                evicted = self._evict()
                client = self._client()
                mine = self._threads[key] = _Thread(client, client.session(self.files, self.idle_timeout))
            self._threads.move_to_end(key)
        for old in evicted:
            old.close()
        with mine.lock:  # a thread's calls take turns
            if mine.closed:
                raise ClientError("this tool was closed")
            result, replaced = mine.session.run_renewing(code, self.timeout)
        return blocks(result, [session_replaced(ended) for ended in replaced])

    def _evict(self) -> list[_Thread]:
        """Room for one more thread (called under the lock): the least recently used ones not in a call."""
        evicted = []
        while len(self._threads) >= self.max_threads:
            for key, old in self._threads.items():
                if old.lock.acquire(blocking=False):
                    old.closed = True
                    old.lock.release()
                    del self._threads[key]
                    evicted.append(old)
                    break
            else:
                raise ClientError(f"more than max_threads ({self.max_threads}) agent threads are in a call at once")
        return evicted

    def _one_off(self, code: str) -> list[str | dict[str, Any]]:
        with self._lock:
            self._check_open()
            client = self._idle.pop() if self._idle else self._client()
        try:
            result = client.run(code, files=self.files, timeout=self.timeout)
        finally:
            with self._lock:
                keep = not self._closed and len(self._idle) < self.max_threads
                if keep:
                    self._idle.append(client)
            if not keep:
                client.close()
        return blocks(result)

    def _client(self) -> Client:
        return Client(self.endpoint, curve=self.curve, tenant=self.tenant)

    def _check_open(self) -> None:
        if self._closed:
            raise ClientError("this tool was closed")

    def close(self) -> None:
        """Close every thread's session and every client (a call under way ends first)."""
        with self._lock:
            self._closed = True
            threads, idle = list(self._threads.values()), list(self._idle)
            self._threads.clear()
            self._idle.clear()
        for mine in threads:
            with mine.lock:
                mine.close()
        for client in idle:
            client.close()


class _Thread:
    """An agent thread's own client (a blocking client is one caller's), session, and turn."""

    def __init__(self, client: Client, session: Session) -> None:
        self.client = client
        self.session = session
        self.lock = threading.Lock()
        self.closed = False

    def close(self) -> None:
        self.closed = True
        try:
            self.session.close()
        except ClientError:
            pass  # gone with its daemon, or no answer: the daemon's idle timeout ends it
        finally:
            self.client.close()


def blocks(result: Result, notes: list[str] | None = None) -> list[str | dict[str, Any]]:
    """The tool message's content: the text a model reads, then each figure it may be shown as an image block."""
    figures = shown(result)
    content: list[str | dict[str, Any]] = [_text("\n\n".join([*(notes or []), result_text(result), *figures.notes]))]
    for fig in figures.figures:
        content.append({"type": "image", "base64": base64.b64encode(fig.data).decode(), "mime_type": fig.mime})
    return content


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}
