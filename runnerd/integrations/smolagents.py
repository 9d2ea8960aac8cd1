"""runnerd as the code executor of smolagents' ``CodeAgent``: every step's code in one runnerd session.

``pip install runnerd[smolagents]``, then::

    from runnerd.integrations.smolagents import code_agent
    agent = code_agent(model, endpoint="tcp://h1:7700,tcp://h2:7700", files={"sales.csv": data})
    agent.run("Which region sold most?")

:class:`RunnerdExecutor` subclasses smolagents' ``RemotePythonExecutor``, as
its e2b, modal and docker executors do: tools and variables are sent as it
sends them to those (code run in the session); the final answer is found
as they find it (``final_answer`` raises ``FinalAnswerException``); a run
that fails raises ``AgentError`` with the text a model should read (runnerd's
one renderer for tools, :func:`runnerd.explain.result_text`), so the agent's own retry
works; the session (the agent's state between steps) lives on the daemon
that opened it, with one endpoint or over a fleet, and a session that ended
is replaced as the MCP server replaces its own (the step runs in the new
one, told so). Packages cannot be installed: a name that does not import in
the sandbox is refused, naming it. Each run's figures that a model may be
shown (:mod:`runnerd.shown_figures`) are kept as PIL images
(``last_figures``); the step callback :func:`show_figures` (which
:func:`code_agent` adds) puts them in the step's ``observations_images``,
where smolagents shows images to a model. Everything that comes back from
the cage is checked before this host decodes it: figures, and the final
answer (smolagents' JSON, never a pickle).
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from smolagents.local_python_executor import CodeOutput
from smolagents.remote_executors import RemotePythonExecutor
from smolagents.serialization import SafeSerializer
from smolagents.utils import AgentError

from ..client import Client, Session
from ..errors import ClientError, RemoteError
from ..explain import LIBRARIES, result_text, session_replaced
from ..result import Outcome, Result
from ..shown_figures import MAX_FIGURE_PIXELS, SHOWN_MIMES, image_size, shown

# Which of the names (modules, or distributions as smolagents names a tool's requirements: "pillow") the
# sandbox lacks; it runs in the session, and leaves nothing in its namespace.
HAVE = """\
def _runnerd_missing(names):
    import importlib.metadata, importlib.util, json
    def have(name):
        if importlib.util.find_spec(name) is not None:
            return True
        try:
            importlib.metadata.distribution(name)
            return True
        except importlib.metadata.PackageNotFoundError:
            return False
    print(json.dumps([n for n in names if not have(n)]))
_runnerd_missing({names})
del _runnerd_missing
"""

# smolagents' final answer travels as an exception's message, which runnerd cuts at 8 KiB (an error is for a
# model to read): its own final_answer also writes the whole answer to a file, which comes back with the result.
ANSWER_FILE = ".runnerd_final_answer"
KEEP_ANSWER = f"""\
def _runnerd_keep(tool):
    forward = tool.forward
    def forward_kept(*args, **kwargs):
        try:
            return forward(*args, **kwargs)
        except BaseException as exc:
            if type(exc).__name__ == "FinalAnswerException" and isinstance(exc.value, str):
                with open({ANSWER_FILE!r}, "w") as f:
                    f.write(exc.value)
            raise
    tool.forward = forward_kept
_runnerd_keep(final_answer)
del _runnerd_keep
"""
# What a final answer from the cage may hold before smolagents decodes it here: nesting no deeper than this,
# numpy arrays of plain dtypes only (a sub-array dtype multiplies the memory), images as figures are checked.
MAX_ANSWER_DEPTH = 64
PLAIN_DTYPE = re.compile(r"[<>|=]?[a-zA-Z]+[0-9]*")
# Images kept in the agent's memory (re-sent with every model call) are cut down to this edge.
MAX_IMAGE_EDGE = 2048


class RunnerdExecutor(RemotePythonExecutor):
    """smolagents' executor on a runnerd session (opened at once, closed by :meth:`cleanup`).

    A session that ends under the agent (a step that ignored its deadline, an idle timeout, its daemon lost) is
    opened again with the tools and the agent's initial variables, and the step is told its variables are gone.
    """

    def __init__(
        self,
        additional_imports: list[str],
        logger: Any,
        endpoint: str | None = None,
        *,
        files: Mapping[str, bytes] | None = None,
        curve: Mapping[str, bytes] | None = None,
        tenant: str | None = None,
        timeout: float | None = None,
        idle_timeout: float | None = None,
        allow_pickle: bool = False,
    ) -> None:
        if allow_pickle:
            raise ValueError(
                "RunnerdExecutor does not take allow_pickle=True: smolagents would unpickle what the sandbox sends "
                "back, and a pickle made by the caged code runs code on this host; answers travel as JSON"
            )
        super().__init__(additional_imports, logger, allow_pickle=False)
        self.client = Client(endpoint, curve=curve, tenant=tenant)
        self.timeout = timeout
        self.session: Session = self.client.session(files=files, idle_timeout=idle_timeout)
        self.last_result: Result | None = None
        self.last_figures: list[Any] = []
        self.resets = 0  # sessions opened again after one ended
        # What a new session is given before the agent's next step: the code of the last send_variables and
        # send_tools (smolagents sends both at the start of every agent.run).
        self._setup: dict[str, str] = {}
        self._sending: str | None = None
        try:
            self.session.open()
            self.installed_packages = self.install_packages(additional_imports)
        except BaseException:
            try:
                self.cleanup()  # a refused package: nothing left open on the daemon
            except ClientError:
                pass  # the error on its way out says more
            raise
        self.logger.log(f"runnerd session {self.session.id} open on {self.client.endpoint}")

    def send_variables(self, variables: dict[str, Any]) -> None:
        self._setup.pop("variables", None)
        self._send("variables", super().send_variables, variables)

    def send_tools(self, tools: dict[str, Any]) -> None:
        self._setup.pop("tools", None)
        self._send("tools", super().send_tools, tools)
        if "final_answer" in tools:
            self._setup["tools"] = self._setup.get("tools", "") + "\n" + KEEP_ANSWER
            self._run_setup(KEEP_ANSWER)

    def _patch_final_answer_with_exception(self, final_answer_tool: Any) -> None:
        # smolagents (1.26) patches the tool again at every agent.run, over its own patch, and the second
        # run's final_answer then fails in the sandbox (NameError: allow_pickle_setting): patch it once.
        if not getattr(type(final_answer_tool), "_runnerd_patched", False):
            super()._patch_final_answer_with_exception(final_answer_tool)
            type(final_answer_tool)._runnerd_patched = True

    def _send(self, what: str, send: Any, arg: dict[str, Any]) -> None:
        self._sending = what
        try:
            send(arg)
        finally:
            self._sending = None

    def run_code_raise_errors(self, code: str) -> CodeOutput:
        if self._sending is not None:
            self._setup[self._sending] = self._setup.get(self._sending, "") + "\n" + code
        self.last_result, self.last_figures = None, []
        # smolagents turns any exception of a step into the step's error; AgentError carries our words.
        try:
            result, notes = self._run(code)
        except RemoteError as exc:
            raise AgentError(f"runnerd refused the step: {exc}", self.logger) from None
        except ClientError as exc:
            raise AgentError(f"runnerd could not run the step: {exc}", self.logger) from None
        self.last_result = result
        self.last_figures, unshown = _images(result)
        error = result.error
        if error is not None and error.type.rsplit(".", 1)[-1] == self.FINAL_ANSWER_EXCEPTION:
            logs = "\n\n".join([*notes, result.stdout.rstrip("\n")]).strip("\n")
            return CodeOutput(output=self._final_answer(result), logs=logs, is_final_answer=True)
        if result.session is not None and not result.session.alive:
            failed = self._reset_quietly()  # the text says the variables are gone; the tools are back
            notes += [failed] if failed else []
        if result.outcome is not Outcome.OK:
            raise AgentError("\n\n".join([*notes, result_text(result), *unshown]), self.logger)
        # The value is the step's output; the logs are the rest of what a tool shows (stdout, stderr, notes).
        text = result_text(replace(result, value=None))
        logs = "\n\n".join([*notes, "" if text == "(no output)" else text, *unshown]).strip("\n")
        output: Any = result.value
        if output is None and self.last_figures:
            output = self.last_figures[-1]  # as smolagents' e2b executor: an image as the step's output
        return CodeOutput(output=output, logs=logs, is_final_answer=False)

    def _run(self, code: str) -> tuple[Result, list[str]]:
        """*code* in the session, a new one if it had ended (as the MCP server does); notes on what happened."""
        result, replaced = self.session.run_renewing(code, self.timeout, on_new=self._set_up_again)
        return result, [session_replaced(ended) for ended in replaced]

    def _final_answer(self, result: Result) -> Any:
        kept = next((f.data for f in result.files if f.name == ANSWER_FILE), None)
        encoded = kept.decode("utf-8", "replace") if kept is not None else result.error.message  # type: ignore[union-attr]
        try:
            if not encoded.startswith("safe:"):
                raise ValueError("not smolagents' safe JSON")
            data = json.loads(encoded[5:])
            _check_answer(data, 0)
            return SafeSerializer.from_json_safe(data)
        except Exception as exc:  # anything the cage sent: deep nesting, overflowing values, bad base64, ...
            raise AgentError(
                f"The final answer could not be read back from the sandbox: {type(exc).__name__}: {exc}"[:2000],
                self.logger,
            ) from None

    def _set_up_again(self) -> None:
        """A new session took the place of one that ended: the tools and initial variables again."""
        self.resets += 1
        for code in self._setup.values():
            self._run_setup(code)
        self.logger.log(f"runnerd session ended; a new one is open: {self.session.id}")

    def _reset_quietly(self) -> str:
        """A new session after a run that ended its own (whose text says so): a line if that failed."""
        try:
            self.session.ensure_open()
            self._set_up_again()
        except (ClientError, AgentError) as exc:
            return f"(runnerd could not open a new session yet: {exc}; the next step tries again)"
        return ""

    def _run_setup(self, code: str) -> None:
        result = self.session.run(code, timeout=self.timeout)
        if result.outcome is not Outcome.OK:
            raise AgentError(f"runnerd could not set up the agent's session: {result_text(result)}", self.logger)

    def install_packages(self, additional_imports: list[str]) -> list[str]:
        """Nothing is installed: each name must import in the sandbox already, or this refuses it."""
        names = sorted({n.split(".")[0] for n in additional_imports if n and n != "*" and not n.endswith(".*")})
        if not names:
            return []
        result = self.session.run(HAVE.format(names=json.dumps(names)), timeout=self.timeout)
        if result.outcome is not Outcome.OK:
            raise AgentError(f"runnerd could not check the sandbox's libraries: {result_text(result)}", self.logger)
        try:  # the session's earlier steps may have changed print or json: a check that cannot be read fails
            missing = json.loads(result.stdout.strip().splitlines()[-1])
            if not isinstance(missing, list) or not all(isinstance(n, str) for n in missing):
                raise ValueError(missing)
        except (IndexError, ValueError):
            raise AgentError(
                f"runnerd could not check the sandbox's libraries: {result.stdout[-500:]!r}", self.logger
            ) from None
        if missing:
            raise AgentError(
                f"runnerd cannot install packages: {', '.join(missing)} not in its fixed library set "
                f"({LIBRARIES}: the Gemini code-execution list, in runnerd's README)",
                self.logger,
            )
        return names

    def cleanup(self) -> None:
        try:
            self.session.close()
        finally:
            self.client.close()

    def delete(self) -> None:
        self.cleanup()


def _check_answer(data: Any, depth: int) -> None:
    """Refuse what would cost this host more than the answer's own bytes once smolagents decodes it."""
    if depth > MAX_ANSWER_DEPTH:
        raise ValueError(f"nested deeper than {MAX_ANSWER_DEPTH}")
    if isinstance(data, list):
        for item in data:
            _check_answer(item, depth + 1)
    elif isinstance(data, dict):
        kind = data.get("__type__")
        if kind == "ndarray" and not PLAIN_DTYPE.fullmatch(str(data.get("dtype"))):
            raise ValueError(f"an array of dtype {data.get('dtype')!r}")
        if kind == "PIL.Image":
            image = base64.b64decode(str(data.get("data")), validate=True)
            sizes = [image_size(image, mime) for mime in SHOWN_MIMES]
            size = next((s for s in sizes if s is not None), None)
            if size is None or size[0] * size[1] > MAX_FIGURE_PIXELS:
                raise ValueError(f"an image that is not a PNG, JPEG or GIF of at most {MAX_FIGURE_PIXELS} pixels")
        for value in data.values():
            _check_answer(value, depth + 1)


def _images(result: Result) -> tuple[list[Any], list[str]]:
    """The figures a model may be shown, decoded (PIL images cut down to :data:`MAX_IMAGE_EDGE`), and a line
    for each one not shown (a header that lied, a truncated file: they fail here, not later in smolagents)."""
    from PIL import Image

    figures = shown(result)
    images, unshown = [], list(figures.notes)
    for fig in figures.figures:
        try:
            image = Image.open(io.BytesIO(fig.data))
            image.load()
            image.thumbnail((MAX_IMAGE_EDGE, MAX_IMAGE_EDGE))
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            unshown.append(f"figure {fig.name} not shown: it could not be decoded ({exc})")
            continue
        images.append(image)
    return images, unshown


def show_figures(memory_step: Any, agent: Any) -> None:
    """A step callback: the figures of the step's run as the step's observation images (once: a later step
    that did not run, a parse error, gets none)."""
    executor = getattr(agent, "python_executor", None)
    if isinstance(executor, RunnerdExecutor) and executor.last_figures:
        memory_step.observations_images, executor.last_figures = executor.last_figures, []


EXECUTOR_ARGS = ("files", "curve", "tenant", "timeout", "idle_timeout")


def code_agent(model: Any, endpoint: str | None = None, **kwargs: Any) -> Any:
    """A ``CodeAgent`` whose steps run in a runnerd session; :data:`EXECUTOR_ARGS` go to its executor.

    The session outlives ``agent.run``: a new task of another user wants a new agent (or
    ``agent.python_executor.session.reopen()``).
    """
    from smolagents import CodeAgent
    from smolagents.memory import ActionStep
    from smolagents.monitoring import AgentLogger, LogLevel

    if kwargs.get("managed_agents"):
        raise ValueError("managed agents cannot run in a runnerd session: give each one its own code_agent")
    executor_args = {k: kwargs.pop(k) for k in EXECUTOR_ARGS if k in kwargs}
    logger = kwargs.pop("logger", None) or AgentLogger(level=kwargs.pop("verbosity_level", LogLevel.INFO))
    callbacks = kwargs.pop("step_callbacks", None)
    if isinstance(callbacks, Mapping):  # smolagents' form: step class -> callback(s)
        callbacks = dict(callbacks)
        mine = callbacks.get(ActionStep, [])
        callbacks[ActionStep] = [*(mine if isinstance(mine, list) else [mine]), show_figures]
    else:
        callbacks = [*(callbacks or []), show_figures]
    executor = RunnerdExecutor(
        list(kwargs.get("additional_authorized_imports") or []), logger, endpoint, **executor_args
    )
    try:
        return CodeAgent(
            tools=kwargs.pop("tools", []), model=model, executor=executor, logger=logger, step_callbacks=callbacks,
            **kwargs,
        )  # fmt: skip
    except BaseException:
        executor.cleanup()
        raise
