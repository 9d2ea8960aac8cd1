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
that opened it, with one endpoint or over a fleet. Packages cannot be
installed: a name that does not import in the sandbox is refused, naming it.
Each run's figures are kept as PIL images (``last_figures``); the step
callback :func:`show_figures` (which :func:`code_agent` adds) puts them in
the step's ``observations_images``, where smolagents shows images to a model.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

from smolagents.local_python_executor import CodeOutput
from smolagents.remote_executors import RemotePythonExecutor
from smolagents.utils import AgentError

from ..client import Client, Session
from ..errors import RemoteError, SessionLost
from ..explain import result_text
from ..result import Outcome, Result

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


SHOWN_MIMES = ("image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp")
MAX_PIXELS = 4096 * 4096  # a Matplotlib figure at 100 dpi is 640x480


class RunnerdExecutor(RemotePythonExecutor):
    """smolagents' executor on a runnerd session (opened at once, closed by :meth:`cleanup`).

    A session that ends under the agent (a step that ignored its deadline, an idle timeout, its daemon lost) is
    opened again with the tools and the agent's initial variables; the step is told its own variables are gone.
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
            self.cleanup()  # a refused package: nothing left open on the daemon
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
        note = ""
        if self.session.opened and not self.session.alive:
            note = self._reset()
        try:
            result = self.session.run(code, timeout=self.timeout)
        except (SessionLost, RemoteError) as exc:
            if isinstance(exc, RemoteError) and self.session.alive:
                raise AgentError(f"runnerd refused the step: {exc}", self.logger) from None
            self._reset()
            raise AgentError(
                f"The sandbox session ended before this step ran ({exc}). A new session is open with the input "
                "files and tools, but none of your variables or imports: run the set-up again.",
                self.logger,
            ) from None
        self.last_result = result
        self.last_figures, unshown = _images(result)
        logs = note + result.stdout + "".join(f"\n[{line}]" for line in unshown)
        error = result.error
        if error is not None and error.type.rsplit(".", 1)[-1] == self.FINAL_ANSWER_EXCEPTION:
            return CodeOutput(output=self._final_answer(result), logs=logs, is_final_answer=True)
        if result.session is not None and not result.session.alive:
            self._reset()  # the text below says the variables are gone; the next step finds the tools again
        if result.outcome is not Outcome.OK:
            raise AgentError(note + result_text(result), self.logger)
        output: Any = result.value
        if output is None and self.last_figures:
            output = self.last_figures[-1]  # as smolagents' e2b executor: an image as the step's output
        return CodeOutput(output=output, logs=logs, is_final_answer=False)

    def _final_answer(self, result: Result) -> Any:
        kept = next((f.data for f in result.files if f.name == ANSWER_FILE), None)
        encoded = kept.decode("utf-8", "replace") if kept is not None else result.error.message  # type: ignore[union-attr]
        try:
            return self._deserialize_final_answer(encoded, self.allow_pickle)
        except ValueError as exc:  # json's error, and smolagents' SerializationError
            raise AgentError(f"The final answer could not be read back from the sandbox: {exc}", self.logger) from None

    def _reset(self) -> str:
        """A new session for the one that ended, given the tools and initial variables again."""
        self.session.ensure_open()
        self.resets += 1
        for code in self._setup.values():
            self._run_setup(code)
        self.logger.log(f"runnerd session ended; a new one is open: {self.session.id}")
        return "[a new sandbox session: the earlier one ended, its variables are gone]\n"

    def _run_setup(self, code: str) -> None:
        result = self.session.run(code, timeout=self.timeout)
        if result.outcome is not Outcome.OK:
            raise AgentError(f"runnerd could not set up the agent's session: {result_text(result)}", self.logger)

    def install_packages(self, additional_imports: list[str]) -> list[str]:
        """Nothing is installed: each name must import in the sandbox already, or this refuses it."""
        names = sorted({n.split(".")[0] for n in additional_imports if n and n != "*" and not n.endswith(".*")})
        if not names:
            return []
        result = self.session.run(HAVE.format(names=json.dumps(names)), timeout=30)
        if result.outcome is not Outcome.OK:
            raise AgentError(f"runnerd could not check the sandbox's libraries: {result_text(result)}", self.logger)
        try:  # the session's earlier steps may have changed print or json: a check that cannot be read fails
            missing = json.loads(result.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise AgentError(
                f"runnerd could not check the sandbox's libraries: {result.stdout[-500:]!r}", self.logger
            ) from None
        if missing:
            raise AgentError(
                f"runnerd cannot install packages: {', '.join(missing)} not in its fixed library set "
                "(the Gemini code-execution list: numpy, pandas, matplotlib, scipy, scikit-learn, ...; "
                "see the README's library set)",
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


def _images(result: Result) -> tuple[list[Any], list[str]]:
    """The run's figures decoded (PIL images), and a line for each one not shown.

    The bytes come from the cage: a figure is decoded here only under :data:`MAX_PIXELS` (a small PNG can
    claim a huge canvas) and whole (a truncated one fails here, not later in smolagents' encoder).
    """
    from PIL import Image

    images, unshown = [], []
    for fig in result.figures:
        if fig.mime not in SHOWN_MIMES:
            continue
        try:
            image = Image.open(io.BytesIO(fig.data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                unshown.append(f"figure {fig.name} not shown: {width}x{height} pixels, more than {MAX_PIXELS}")
                continue
            image.load()
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            unshown.append(f"figure {fig.name} not shown: it could not be decoded ({exc})")
            continue
        images.append(image)
    return images, unshown


def show_figures(memory_step: Any, agent: Any) -> None:
    """A step callback: the figures of the step's run as the step's observation images."""
    executor = getattr(agent, "python_executor", None)
    if isinstance(executor, RunnerdExecutor) and executor.last_figures:
        memory_step.observations_images = list(executor.last_figures)


EXECUTOR_ARGS = ("files", "curve", "tenant", "timeout", "idle_timeout")


def code_agent(model: Any, endpoint: str | None = None, **kwargs: Any) -> Any:
    """A ``CodeAgent`` whose steps run in a runnerd session; :data:`EXECUTOR_ARGS` go to its executor."""
    from smolagents import CodeAgent
    from smolagents.monitoring import AgentLogger, LogLevel

    executor_args = {k: kwargs.pop(k) for k in EXECUTOR_ARGS if k in kwargs}
    logger = kwargs.pop("logger", None) or AgentLogger(level=kwargs.pop("verbosity_level", LogLevel.INFO))
    executor = RunnerdExecutor(
        list(kwargs.get("additional_authorized_imports") or []), logger, endpoint, **executor_args
    )
    callbacks = list(kwargs.pop("step_callbacks", None) or []) + [show_figures]
    return CodeAgent(
        tools=kwargs.pop("tools", []), model=model, executor=executor, logger=logger, step_callbacks=callbacks, **kwargs
    )
