"""The model loop, Gemini-shaped parts and the MCP tool, through a real daemon."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runnerd.client import AsyncClient, Client
from runnerd.errors import AttemptNotRun
from runnerd.gemini import genai_parts, output_text, parts
from runnerd.loop import Attempt, arun_loop, feedback, manifest, run_loop
from runnerd.result import Outcome, Reason, Result

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import model_loop  # noqa: E402  (examples/model_loop.py)

SALES = (EXAMPLES / "sales.csv").read_bytes()


def test_scripted_loop_fixes_the_column_on_attempt_2(daemon):
    with Client(daemon.ipc) as client:
        outcome = run_loop(model_loop.TASK, model_loop.scripted_model, client=client, files={"sales.csv": SALES})
    assert outcome.ok and len(outcome.attempts) == 2
    first, second = outcome.attempts
    assert first.result.outcome is Outcome.FAILED and first.result.error.type == "KeyError"
    fb = first.feedback
    assert "revenue" in fb and "line 5" in fb  # the bad column and the line
    assert 'File "main.py", line 5' in fb and "site-packages" not in fb  # the model's own frames
    assert "sales.csv (850 bytes)" in fb and "month,region,sales" in fb  # the input manifest
    assert '["sales"]' in second.code and second.feedback is None
    assert second.result.stdout.splitlines()[1].split() == ["east", "3746"]
    assert [f.name for f in second.result.figures] == ["figure_001.png"]


def test_the_example_runs_as_a_user_would(daemon):
    env = {**os.environ, "RUNNERD_ENDPOINT": daemon.tcp}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "model_loop.py")], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "--- attempt 1: OUTCOME_FAILED" in proc.stdout and "solved after 2 attempt(s)" in proc.stdout


def test_a_generator_that_never_learns_stops_after_5(daemon):
    calls: list[int] = []

    def stubborn(task: str, history: tuple[Attempt, ...]) -> str:
        calls.append(len(history))
        return "import pandas as pd\npd.read_csv('sales.csv')['nope']\n"

    with Client(daemon.ipc) as client:
        outcome = run_loop("task", stubborn, client=client, files={"sales.csv": SALES})
        three = run_loop("task", stubborn, client=client, files={"sales.csv": SALES}, max_attempts=3)
    assert not outcome.ok and len(outcome.attempts) == 5
    assert calls[:5] == [0, 1, 2, 3, 4]  # each call saw the attempts so far
    assert all(a.result.reason.value == "exception" and a.feedback for a in outcome.attempts)
    assert len(three.attempts) == 3
    with pytest.raises(ValueError):
        with Client(daemon.ipc) as client:
            run_loop("t", stubborn, client=client, max_attempts=0)


def test_async_loop_with_a_coroutine_generator_and_a_deadline(daemon):
    async def generate(task: str, history: tuple[Attempt, ...]) -> str:
        await asyncio.sleep(0)
        if not history:
            return "import time\nprint('working', flush=True)\ntime.sleep(10)\n"
        assert "did not finish within 1 s" in history[-1].feedback and "working" in history[-1].feedback
        return "print('quick now')"

    async def main():
        async with AsyncClient(daemon.ipc) as client:
            return await arun_loop("be quick", generate, client=client, timeout=1)

    outcome = asyncio.run(main())
    assert outcome.ok and len(outcome.attempts) == 2
    assert outcome.attempts[0].result.outcome is Outcome.DEADLINE_EXCEEDED


def test_manifest_shows_text_heads_and_binary_sizes():
    text = manifest({"a.csv": b"x,y\n1,2\n" + b"3,4\n" * 100, "img.bin": b"\x00\x01\x02" * 10})
    assert "- a.csv (408 bytes)" in text and "    x,y" in text and "    3,4" in text
    assert "- img.bin (30 bytes)" in text and "first lines" in text.split("img.bin")[0]
    assert len([ln for ln in text.splitlines() if ln.startswith("    ")]) == 5


def test_gemini_parts_validate_as_genai_types(daemon):
    from google.genai import types

    code = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nprint('plotted')\n"
    with Client(daemon.ipc) as client:
        ok = client.run(code)
        failed = client.run("x = 1\n1 / 0\n")
        late = client.run("import time\nprint('partial', flush=True)\ntime.sleep(5)\n", timeout=1)
    got = genai_parts(code, ok)
    assert all(isinstance(p, types.Part) for p in got)
    assert got[0].executable_code.language == types.Language.PYTHON and got[0].executable_code.code == code
    assert got[1].code_execution_result.outcome == types.Outcome.OUTCOME_OK
    assert got[1].code_execution_result.output == "plotted\n"
    assert got[2].inline_data.mime_type == "image/png" and got[2].inline_data.data == ok.figures[0].data
    content = types.Content(role="model", parts=got)  # straight into a conversation history
    assert len(content.parts) == 3
    # the JSON form carries base64
    as_json = parts(code, ok)
    assert base64.b64decode(as_json[2]["inlineData"]["data"]) == ok.figures[0].data
    f = genai_parts("x = 1\n1 / 0\n", failed)
    assert f[1].code_execution_result.outcome == types.Outcome.OUTCOME_FAILED
    assert "ZeroDivisionError: division by zero" in f[1].code_execution_result.output
    assert 'File "main.py", line 2' in f[1].code_execution_result.output
    d = genai_parts("...", late, timeout=1)
    assert d[1].code_execution_result.outcome == types.Outcome.OUTCOME_DEADLINE_EXCEEDED
    assert output_text(late, 1).startswith("partial\nTimeoutError")


def test_feedback_for_limits_without_an_exception(daemon):
    with Client(daemon.ipc) as client:
        r = client.run("import sys\nprint('bye', file=sys.stderr)\nsys.exit(3)")
    text = feedback(r, {})
    assert "SystemExit: the code exited with status 3." in text and "bye" in text and "Input files: none." in text


def test_mcp_tool_through_a_daemon(daemon):
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    params = StdioServerParameters(
        command=sys.executable, args=["-m", "runnerd", "mcp", "--endpoint", daemon.ipc], env=dict(os.environ)
    )

    async def main():
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                tools = await session.list_tools()
                code = (
                    "import pandas as pd, matplotlib.pyplot as plt\n"
                    "df = pd.read_csv('sales.csv')\nprint(df['sales'].sum())\n"
                    "df.groupby('region')['sales'].sum().plot.bar()\n"
                )
                good = await session.call_tool(
                    "run_python", {"code": code, "files": [{"name": "sales.csv", "content": SALES.decode()}]}
                )
                bad = await session.call_tool("run_python", {"code": "import pandas as pd\npd.read_csv('sales.csv')['x']\n",
                                                             "files": [{"name": "sales.csv", "content": base64.b64encode(SALES).decode(), "base64": True}]})  # fmt: skip
                return tools, good, bad

    tools, good, bad = asyncio.run(main())
    names = sorted(t.name for t in tools.tools)
    assert names == ["reset_session", "run_python"]
    schema = next(t for t in tools.tools if t.name == "run_python").input_schema
    assert set(schema["properties"]) >= {"code", "files"} and schema["required"] == ["code"]
    assert not good.is_error
    kinds = [c.type for c in good.content]
    assert kinds == ["text", "image"]
    # The output, then the trailing expression's value (the bar chart's Axes), as a notebook shows them.
    assert good.content[0].text.splitlines()[0] == "12928" and "Axes" in good.content[0].text
    assert good.content[1].mime_type == "image/png" and base64.b64decode(good.content[1].data).startswith(b"\x89PNG")
    # The two calls share one session: the second is its second cell.
    assert bad.is_error and "KeyError" in bad.content[0].text and 'File "cell2.py", line 2' in bad.content[0].text


def test_a_broken_cage_is_not_the_models_attempt(daemon):
    """nsjail killed under attempt 1: the loop runs the same code again; the model never hears of it."""
    import psutil

    killed: list[int] = []
    stop = threading.Event()

    def kill_the_first_cage() -> None:
        daemon_proc = psutil.Process(daemon.proc.pid)
        while not stop.is_set() and not killed:
            for p in daemon_proc.children(recursive=True):
                try:
                    if p.name() == "nsjail":
                        p.kill()
                        killed.append(p.pid)
                        return
                except psutil.Error:
                    continue
            stop.wait(0.01)

    calls: list[int] = []

    def generate(task: str, history: tuple[Attempt, ...]) -> str:
        calls.append(len(history))
        return "import time\ntime.sleep(2)\nprint('done')"

    watcher = threading.Thread(target=kill_the_first_cage)
    watcher.start()
    try:
        with Client(daemon.ipc) as client:
            outcome = run_loop("task", generate, client=client, timeout=20)
    finally:
        stop.set()
        watcher.join()
    assert killed, "the watcher never saw the job's cage"
    assert outcome.ok and len(outcome.attempts) == 1 and calls == [0], outcome
    assert outcome.final.result.stdout == "done\n"


class _Canned:
    """A stand-in client answering with given results (the loop's own decisions, no cage)."""

    def __init__(self, *results: Result) -> None:
        self.results = list(results)
        self.runs = 0

    def run(self, code: str, files=None, timeout=None) -> Result:
        self.runs += 1
        return self.results.pop(0) if len(self.results) > 1 else self.results[0]


def test_cage_faults_are_retried_then_raised_and_a_cancel_stops_at_once():
    broken = Result(Outcome.FAILED, Reason.SANDBOX_ERROR, warnings=("zygote 1 died during the job",))
    client = _Canned(broken)
    with pytest.raises(AttemptNotRun, match="attempt 1 did not run: sandbox_error 3 times .zygote 1 died"):
        run_loop("t", lambda task, history: "print(1)", client=client)  # type: ignore[arg-type]
    assert client.runs == 3
    cancelled = _Canned(Result(Outcome.FAILED, Reason.CANCELLED))
    with pytest.raises(AttemptNotRun, match="cancelled"):
        run_loop("t", lambda task, history: "print(1)", client=cancelled)  # type: ignore[arg-type]
    assert cancelled.runs == 1
    # A shutdown, then the code's own exception: one attempt, and the model reads only the exception.
    err = Result(Outcome.FAILED, Reason.EXIT, exit_code=3)
    mixed = _Canned(Result(Outcome.FAILED, Reason.SHUTDOWN), err, Result(Outcome.OK, None, stdout="ok"))
    outcome = run_loop("t", lambda task, history: "print(1)", client=mixed)  # type: ignore[arg-type]
    assert [a.result.reason for a in outcome.attempts] == [Reason.EXIT, None]
    assert "SystemExit: the code exited with status 3." in outcome.attempts[0].feedback
    assert "shut down" not in outcome.attempts[0].feedback


@pytest.mark.parametrize("reason", list(Reason))
def test_one_wording_for_every_reason(reason):
    from runnerd.explain import result_text, what_happened

    r = Result(Outcome.FAILED, reason, exit_code=-9 if reason is Reason.SIGNAL else 3)
    said = what_happened(r)
    assert said and said in feedback(r) and said in output_text(r) and said in result_text(r)
