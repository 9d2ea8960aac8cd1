"""runnerd as a LangChain tool: Python in a runnerd sandbox, one session per agent thread.

``pip install runnerd[langchain]``, then, with LangChain's agent (a LangGraph graph; LangGraph's prebuilt
``create_react_agent`` takes the tool too)::

    from langchain.agents import create_agent
    from runnerd.integrations.langchain import RunnerdPython
    tool = RunnerdPython(endpoint="tcp://h1:7700", files={"sales.csv": data})
    agent = create_agent(model, [tool])
    agent.invoke({"messages": [("user", "Which region sold most?")]}, {"configurable": {"thread_id": "t1"}})

Each call's output is what a model should read (runnerd's one renderer,
:func:`runnerd.explain.result_text`, the MCP server's too: stdout, the value, the error, a line on
what happened), then each figure as an image content block. With a
``thread_id`` in the run's config, the thread's calls share one session
(variables, imports and files kept between calls, on one daemon of a
fleet; each thread on its own connection, so threads run side by side); without one, or with
``stateful=False``, each call is a one-off run. A session that ended is opened again at the next call, and
the text says its variables are gone; a run the daemon refuses (``BUSY``, too large) is a text too.
:meth:`RunnerdPython.close` closes the sessions and the clients.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Mapping
from typing import Any

from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from ..client import Client, Session
from ..errors import RemoteError, SessionLost
from ..explain import result_text
from ..result import Result

DESCRIPTION = (
    "Run Python 3 code in a sandbox and see what it printed, the value of its last expression, any error, and "
    "its Matplotlib figures as images. Variables, imports and files are kept between calls in this conversation. "
    "Libraries: a fixed set (numpy, pandas, matplotlib, scipy, scikit-learn, sympy, ...); nothing can be "
    "installed; there is no network. Input files are in the working directory, by their bare names."
)

AFTER_RESET = "A new session is open with the input files, but none of the variables or imports: run the set-up again."
NEW_SESSION = "[a new sandbox session: the earlier one ended, its variables are gone]\n"


class _Code(BaseModel):
    code: str = Field(description="Python 3 source code to run")


class RunnerdPython(BaseTool):
    """The tool. A session per ``thread_id`` of the run's config (a lost one is opened anew, with a note), each on
    its own connection, so parallel threads run in parallel."""

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

    _threads: dict[str, _Thread] = PrivateAttr(default_factory=dict)
    _idle: list[Client] = PrivateAttr(default_factory=list)  # one-off calls' clients, free for the next
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def _run(self, code: str, config: RunnableConfig, run_manager: Any = None) -> list[str | dict[str, Any]]:
        thread = ((config or {}).get("configurable") or {}).get("thread_id")
        if not self.stateful or thread is None:
            return self._one_off(code)
        with self._lock:
            mine = self._threads.get(str(thread))
            if mine is None:
                client = self._client()
                mine = _Thread(client, client.session(files=self.files, idle_timeout=self.idle_timeout))
                self._threads[str(thread)] = mine
        with mine.lock:  # a thread's calls take turns; other threads' run beside them, each on its own socket
            session, note = mine.session, ""
            try:
                if session.ensure_open():
                    note = NEW_SESSION
                result = session.run(code, timeout=self.timeout)
            except (SessionLost, RemoteError) as exc:
                if isinstance(exc, RemoteError) and session.alive:
                    return [_text(f"runnerd refused the code: {exc}")]  # too large, busy: the model can act on it
                session.ensure_open()
                return [_text(f"The sandbox session ended before this code ran ({exc}). {AFTER_RESET}")]
        return blocks(result, note)

    def _one_off(self, code: str) -> list[str | dict[str, Any]]:
        with self._lock:
            client = self._idle.pop() if self._idle else self._client()
        try:
            result = client.run(code, files=self.files, timeout=self.timeout)
        except RemoteError as exc:
            return [_text(f"runnerd refused the code: {exc}")]
        finally:
            with self._lock:
                self._idle.append(client)
        return blocks(result)

    def _client(self) -> Client:
        return Client(self.endpoint, curve=self.curve, tenant=self.tenant)

    def close(self) -> None:
        """Close every thread's session and every client."""
        with self._lock:
            threads, idle = list(self._threads.values()), list(self._idle)
            self._threads.clear()
            self._idle.clear()
        for mine in threads:
            with mine.lock:
                try:
                    mine.session.close()
                finally:
                    mine.client.close()
        for client in idle:
            client.close()


class _Thread:
    """An agent thread's own client (a blocking client is one caller's), session, and turn."""

    def __init__(self, client: Client, session: Session) -> None:
        self.client = client
        self.session = session
        self.lock = threading.Lock()


def blocks(result: Result, note: str = "") -> list[str | dict[str, Any]]:
    """The tool message's content: the text a model reads, then each figure as an image block."""
    content: list[str | dict[str, Any]] = [_text(note + result_text(result))]
    for fig in result.figures:
        if fig.mime.startswith("image/") and fig.mime != "image/svg+xml":
            data = base64.b64encode(fig.data).decode()
            content.append({"type": "image", "base64": data, "mime_type": fig.mime})
    return content


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}
