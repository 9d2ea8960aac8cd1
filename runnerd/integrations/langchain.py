"""runnerd as a LangChain tool: Python in a runnerd sandbox, one session per agent thread.

``pip install runnerd[langchain]``, then, with LangGraph's prebuilt agent::

    from langgraph.prebuilt import create_react_agent
    from runnerd.integrations.langchain import RunnerdPython
    tool = RunnerdPython(endpoint="tcp://h1:7700", files={"sales.csv": data})
    agent = create_react_agent(model, [tool])
    agent.invoke({"messages": [("user", "Which region sold most?")]}, {"configurable": {"thread_id": "t1"}})

Each call's output is what a model should read (runnerd's one renderer,
:func:`runnerd.explain.result_text`, the MCP server's too: stdout, the value, the error, a line on
what happened), then each figure as an image content block. With a
``thread_id`` in the run's config, the thread's calls share one session
(variables, imports and files kept between calls, on one daemon of a
fleet); without one, or with ``stateful=False``, each call is a one-off
run. :meth:`RunnerdPython.close` closes the sessions and the client.
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
from ..errors import SessionLost
from ..explain import result_text
from ..result import Result

DESCRIPTION = (
    "Run Python 3 code in a sandbox and see what it printed, the value of its last expression, any error, and "
    "its Matplotlib figures as images. Variables, imports and files are kept between calls in this conversation. "
    "Libraries: a fixed set (numpy, pandas, matplotlib, scipy, scikit-learn, sympy, ...); nothing can be "
    "installed; there is no network. Input files are in the working directory, by their bare names."
)


class _Code(BaseModel):
    code: str = Field(description="Python 3 source code to run")


class RunnerdPython(BaseTool):
    """The tool. Its sessions are per ``thread_id`` of the run's config; a lost one is opened anew, with a note."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str = "python"
    description: str = DESCRIPTION
    args_schema: type[BaseModel] = _Code
    endpoint: str | None = None
    files: Mapping[str, bytes] | None = None
    curve: Mapping[str, bytes] | None = None
    tenant: str | None = None
    timeout: float | None = None
    stateful: bool = True

    _client: Client | None = PrivateAttr(default=None)
    _sessions: dict[str, Session] = PrivateAttr(default_factory=dict)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def _run(self, code: str, config: RunnableConfig, run_manager: Any = None) -> list[str | dict[str, Any]]:
        thread = ((config or {}).get("configurable") or {}).get("thread_id")
        with self._lock:  # one blocking client: the calls of parallel threads take turns
            if self._client is None:
                self._client = Client(self.endpoint, curve=self.curve, tenant=self.tenant)
            note = ""
            if self.stateful and thread is not None:
                session = self._sessions.get(str(thread))
                if session is None:
                    session = self._sessions[str(thread)] = self._client.session(files=self.files)
                try:
                    if session.ensure_open():
                        note = "[a new sandbox session: the earlier one ended, its variables are gone]\n"
                    result = session.run(code, timeout=self.timeout)
                except SessionLost as exc:
                    session.ensure_open()
                    return [f"The sandbox session was lost ({exc}); a new one is open: run the setup again."]
            else:
                result = self._client.run(code, files=self.files, timeout=self.timeout)
        return blocks(result, note)

    def close(self) -> None:
        with self._lock:
            for session in self._sessions.values():
                session.close()
            self._sessions.clear()
            if self._client is not None:
                self._client.close()
                self._client = None


def blocks(result: Result, note: str = "") -> list[str | dict[str, Any]]:
    """The tool message's content: the text a model reads, then each figure as an image block."""
    content: list[str | dict[str, Any]] = [{"type": "text", "text": note + result_text(result)}]
    for fig in result.figures:
        if fig.mime.startswith("image/") and fig.mime != "image/svg+xml":
            data = base64.b64encode(fig.data).decode()
            content.append({"type": "image", "base64": data, "mime_type": fig.mime})
    return content
