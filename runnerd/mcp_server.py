"""``runnerd mcp``: a Model Context Protocol server with one tool, ``run_python``.

(No ``from __future__ import annotations`` here: the SDK reads the tool's
annotations at run time, and the mcp types are imported lazily, so they must
be evaluated where the tool is defined.)

Serves over stdio with the official ``mcp`` SDK (``pip install 'runnerd[mcp]'``)
and runs each call through a runnerd daemon, so any MCP client (desktop
assistants, IDE agents) can use runnerd as its code-execution tool. The
tool returns the output as text content and each figure as image content;
a run that fails comes back as a tool error (``isError``) whose text holds
the traceback, so the model can fix its code.
"""

import base64
import binascii
from collections.abc import Mapping, Sequence
from typing import Any

from .client import AsyncClient, resolve_endpoint
from .errors import ClientError
from .explain import what_happened
from .result import Outcome, Result

TOOL_DESCRIPTION = (
    "Run Python 3 code in a sandbox (no network, 30 s, numpy, pandas, matplotlib, scipy, scikit-learn, "
    "tensorflow, sympy, opencv and more) and return what it printed, its error if any, and every "
    "Matplotlib figure as an image. Input files are readable by their name from the working directory."
)


def result_text(result: Result) -> str:
    """The text content of a tool result: stdout, stderr, the error, what else came out."""
    sections: list[str] = []
    if result.stdout:
        sections.append(result.stdout.rstrip("\n"))
    if result.stderr_besides_error:
        sections.append("stderr:\n" + result.stderr.rstrip("\n"))
    if result.error is not None:
        where = f" (line {result.error.lineno})" if result.error.lineno else ""
        sections.append(f"{result.error.type}{where}: {result.error.message}\n{result.error.traceback.rstrip()}")
    if result.outcome is not Outcome.OK and result.error is None:
        sections.append(f"{result.outcome.value}: {what_happened(result)}")
    if result.files:
        sections.append("files written: " + ", ".join(f"{f.name} ({len(f.data)} bytes)" for f in result.files))
    for warning in result.warnings:
        sections.append(f"note: {warning}")
    return "\n\n".join(sections) or "(no output)"


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


def build_server(endpoint: str | None = None, curve: Mapping[str, bytes] | None = None) -> Any:
    """The MCPServer with its run_python tool, talking to the daemon at *endpoint*."""
    try:
        from mcp.server.mcpserver import MCPServer
        from mcp.types import CallToolResult, ImageContent, TextContent
    except ImportError:  # pragma: no cover - depends on the extra
        raise ImportError("runnerd mcp needs the mcp package: pip install 'runnerd[mcp]'") from None

    address = resolve_endpoint(endpoint)
    server = MCPServer("runnerd", instructions=TOOL_DESCRIPTION)

    async def run_python(
        code: str, files: list[dict[str, Any]] | None = None, timeout: float | None = None
    ) -> CallToolResult:
        """Run Python code in runnerd's sandbox.

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
        client = AsyncClient(address, curve=curve)
        try:
            result = await client.run(code, files=inputs, timeout=timeout)
        except ClientError as exc:
            return CallToolResult(content=[TextContent(text=f"runnerd: {exc}")], is_error=True)
        finally:
            client.close()
        content: list[Any] = [TextContent(text=result_text(result))]
        for figure in result.figures:
            content.append(ImageContent(data=base64.b64encode(figure.data).decode("ascii"), mime_type=figure.mime))
        return CallToolResult(content=content, is_error=result.outcome is not Outcome.OK)

    server.add_tool(run_python, name="run_python", description=TOOL_DESCRIPTION)
    return server


def serve(endpoint: str | None = None, curve: Mapping[str, bytes] | None = None) -> None:
    build_server(endpoint, curve).run("stdio")
