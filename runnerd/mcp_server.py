"""``runnerd mcp``: a Model Context Protocol server with the tools ``run_python`` and ``reset_session``.

(No ``from __future__ import annotations`` here: the SDK reads the tool's
annotations at run time, and the mcp types are imported lazily, so they must
be evaluated where the tool is defined.)

Serves over stdio with the official ``mcp`` SDK (``pip install 'runnerd[mcp]'``)
and runs each call through a runnerd daemon, so any MCP client (desktop
assistants, IDE agents) can use runnerd as its code-execution tool. The
tool returns the output as text content and each figure as image content;
a run that fails comes back as a tool error (``isError``) whose text holds
the traceback, so the model can fix its code.

The server (one per stdio connection) has one runnerd session, opened by
the first ``run_python``: successive calls share variables, imports and
files, as cells of a notebook do, and a trailing expression's value is
shown after the output. When the session ended (idle timeout, memory, ...) the next call
opens a new one and its output says so; ``reset_session`` closes it so the
next call starts fresh. The session is closed when the server stops (its
stdin closes); a server killed outright leaves it to the daemon's idle
timeout.
"""

import asyncio
import base64
import binascii
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from . import wire
from .client import AsyncClient, AsyncSession, resolve_endpoint
from .errors import ClientError, RemoteError, SessionLost
from .explain import LIBRARIES, result_text, session_replaced
from .result import Outcome, Result
from .shown_figures import shown

TOOL_DESCRIPTION = (
    f"Run Python 3 code in a sandbox (no network, 30 s, {LIBRARIES}) and return what it printed, the value "
    "of a trailing expression (as a notebook shows it), its error if any, and every Matplotlib figure as an "
    "image. Calls share one Python session: variables, imports and files stay for later calls until "
    "reset_session, or until the session ends (the output then says so). Input files are readable by their "
    "name from the working directory; a file given once stays there."
)
RESET_DESCRIPTION = (
    "Close the Python session that run_python calls share (its variables, imports and files); "
    "the next run_python starts in a fresh one."
)
# At the server's end: how long closing the sessions may hold it up.
CLOSE_AT_EXIT_S = 5.0


def _decode_files(files: Sequence[Mapping[str, Any]] | None) -> dict[str, bytes]:
    decoded: dict[str, bytes] = {}
    for f in files or []:
        name, content = f.get("name"), f.get("content", "")
        if not isinstance(name, str) or not isinstance(content, str):
            raise ValueError("each file needs a string name and a string content")
        if f.get("base64"):
            try:
                decoded[name] = base64.b64decode(content, validate=True)
            except binascii.Error as exc:
                raise ValueError(f"file {name!r}: content is not valid base64 ({exc})") from None
        else:
            decoded[name] = content.encode("utf-8")
    return decoded


class SessionSlot:
    """The runnerd session of one MCP connection: opened by its first run, anew after it ended.

    Runs are taken one at a time (the daemon runs a session's runs in order
    anyway, and they share the client's socket).
    """

    def __init__(self, endpoint: str, curve: Mapping[str, bytes] | None) -> None:
        self.client = AsyncClient(endpoint, curve=curve)
        self.session: AsyncSession | None = None
        self.lock = asyncio.Lock()

    async def run(self, code: str, inputs: dict[str, bytes], timeout: float | None) -> tuple[Result, list[str]]:
        """Run *code* in the session: its result and what to tell the model about the session first."""
        async with self.lock:
            notes: list[str] = []
            if self.session is None:
                self.session = self.client.session()
            session = self.session
            ended = session.ended
            if await session.ensure_open():
                notes.append(session_replaced(ended))
            try:
                return await session.run(code, files=_new_files(session, inputs), timeout=timeout), notes
            except RemoteError as exc:
                if exc.code != wire.NOT_FOUND:
                    raise
            except SessionLost:
                pass  # its daemon died or restarted (a fleet): the same as an ended session, said so
            # It ended since the last call said it was alive (an idle timeout, most likely), or was lost.
            notes.append(session_replaced(session.ended))
            await session.reopen()
            return await session.run(code, files=_new_files(session, inputs), timeout=timeout), notes

    async def reset(self) -> str:
        """Close the session (stopping a run under way); the next run opens a new one."""
        session, self.session = self.session, None
        if session is None or not session.opened:
            return "There was no session; the next run_python starts a fresh one."
        await session.close()
        return f"Closed the session ({session.id}); the next run_python starts a fresh one."

    async def aclose(self) -> None:
        session, self.session = self.session, None
        try:
            if session is not None:
                await session.close()
        finally:
            self.client.close()


def _new_files(session: AsyncSession, inputs: dict[str, bytes]) -> dict[str, bytes]:
    # A model resends its files with each call; the session refuses a name it holds, so send only new ones.
    try:
        return session.new_files(inputs)
    except ValueError as exc:
        raise _BadFiles(f"{exc}: give the new data another name, or call reset_session first") from None


class _BadFiles(Exception):
    pass


def build_server(endpoint: str | None = None, curve: Mapping[str, bytes] | None = None) -> Any:
    """The MCPServer with its tools (run_python, reset_session), talking to the daemon at *endpoint*."""
    try:
        from mcp.server.mcpserver import MCPServer
        from mcp.types import CallToolResult, ImageContent, TextContent
    except ImportError:  # pragma: no cover - depends on the extra
        raise ImportError("runnerd mcp needs the mcp package: pip install 'runnerd[mcp]'") from None

    # One per server: `runnerd mcp` serves stdio, where the process is the connection. (The SDK's
    # request context holds a per-request object, not the connection, so nothing finer is keyed.)
    slot = SessionSlot(resolve_endpoint(endpoint), curve)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[dict[str, Any]]:
        try:
            yield {}
        finally:
            # Else the session would hold its memory on the daemon until its idle timeout.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(slot.aclose(), CLOSE_AT_EXIT_S)

    server = MCPServer("runnerd", instructions=TOOL_DESCRIPTION, lifespan=lifespan)

    async def run_python(
        code: str, files: list[dict[str, Any]] | None = None, timeout: float | None = None
    ) -> CallToolResult:
        """Run Python code in runnerd's sandbox, in the session earlier calls ran in.

        Args:
            code: the Python source to run.
            files: input files, each {"name": "data.csv", "content": "...", "base64": false}; content is
                text, or base64 when "base64" is true. The code opens them by name.
            timeout: seconds of wall clock (at most the server's maximum, 30 by default).
        """
        try:
            inputs = _decode_files(files)
        except ValueError as exc:
            return CallToolResult(content=[TextContent(text=f"bad files argument: {exc}")], is_error=True)
        try:
            result, notes = await slot.run(code, inputs, timeout)
        except _BadFiles as exc:
            return CallToolResult(content=[TextContent(text=f"bad files argument: {exc}")], is_error=True)
        except ClientError as exc:
            return CallToolResult(content=[TextContent(text=f"runnerd: {exc}")], is_error=True)
        figures = shown(result)
        content: list[Any] = [TextContent(text="\n\n".join([*notes, result_text(result), *figures.notes]))]
        for figure in figures.figures:
            content.append(ImageContent(data=base64.b64encode(figure.data).decode("ascii"), mime_type=figure.mime))
        return CallToolResult(content=content, is_error=result.outcome is not Outcome.OK)

    async def reset_session() -> CallToolResult:
        """Close the session run_python calls share; the next call starts fresh."""
        try:
            text = await slot.reset()
        except ClientError as exc:
            return CallToolResult(content=[TextContent(text=f"runnerd: {exc}")], is_error=True)
        return CallToolResult(content=[TextContent(text=text)], is_error=False)

    server.add_tool(run_python, name="run_python", description=TOOL_DESCRIPTION)
    server.add_tool(reset_session, name="reset_session", description=RESET_DESCRIPTION)
    return server


def serve(endpoint: str | None = None, curve: Mapping[str, bytes] | None = None) -> None:
    build_server(endpoint, curve).run("stdio")
