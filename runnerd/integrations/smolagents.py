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
from ..errors import SessionLost
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


class RunnerdExecutor(RemotePythonExecutor):
    """smolagents' executor on a runnerd session (opened at once, closed by :meth:`cleanup`)."""

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
        allow_pickle: bool = False,
    ) -> None:
        super().__init__(additional_imports, logger, allow_pickle=allow_pickle)
        self.client = Client(endpoint, curve=curve, tenant=tenant)
        self.timeout = timeout
        self.session: Session = self.client.session(files=files)
        self.last_result: Result | None = None
        self.last_figures: list[Any] = []
        try:
            self.session.open()
            self.installed_packages = self.install_packages(additional_imports)
        except BaseException:
            self.cleanup()  # a refused package: nothing left open on the daemon
            raise
        self.logger.log(f"runnerd session {self.session.id} open on {self.client.endpoint}")

    def run_code_raise_errors(self, code: str) -> CodeOutput:
        try:
            result = self.session.run(code, timeout=self.timeout)
        except SessionLost as exc:
            raise AgentError(f"The sandbox session was lost ({exc}); its variables are gone.", self.logger) from None
        self.last_result = result
        self.last_figures = _images(result)
        logs = result.stdout
        error = result.error
        if error is not None and error.type.rsplit(".", 1)[-1] == self.FINAL_ANSWER_EXCEPTION:
            answer = self._deserialize_final_answer(error.message, self.allow_pickle)
            return CodeOutput(output=answer, logs=logs, is_final_answer=True)
        if result.outcome is not Outcome.OK:
            raise AgentError(result_text(result), self.logger)
        output: Any = result.value
        if output is None and self.last_figures:
            output = self.last_figures[-1]  # as smolagents' e2b executor: an image as the step's output
        return CodeOutput(output=output, logs=logs, is_final_answer=False)

    def install_packages(self, additional_imports: list[str]) -> list[str]:
        """Nothing is installed: each name must import in the sandbox already, or this refuses it."""
        names = sorted({n.split(".")[0] for n in additional_imports if n and n != "*" and not n.endswith(".*")})
        if not names:
            return []
        result = self.session.run(HAVE.format(names=json.dumps(names)), timeout=30)
        if result.outcome is not Outcome.OK:
            raise AgentError(f"runnerd could not check the sandbox's libraries: {result_text(result)}", self.logger)
        missing = json.loads(result.stdout.strip().splitlines()[-1])
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


def _images(result: Result) -> list[Any]:
    from PIL import Image

    images = []
    for fig in result.figures:
        if fig.mime in ("image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp"):
            images.append(Image.open(io.BytesIO(fig.data)))
    return images


def show_figures(memory_step: Any, agent: Any) -> None:
    """A step callback: the figures of the step's run as the step's observation images."""
    executor = getattr(agent, "python_executor", None)
    if isinstance(executor, RunnerdExecutor) and executor.last_figures:
        memory_step.observations_images = list(executor.last_figures)


def code_agent(model: Any, endpoint: str | None = None, **kwargs: Any) -> Any:
    """A ``CodeAgent`` whose steps run in a runnerd session (executor arguments: files, curve, tenant, timeout)."""
    from smolagents import CodeAgent
    from smolagents.monitoring import AgentLogger, LogLevel

    executor_args = {k: kwargs.pop(k) for k in ("files", "curve", "tenant", "timeout") if k in kwargs}
    logger = kwargs.pop("logger", None) or AgentLogger(level=kwargs.pop("verbosity_level", LogLevel.INFO))
    executor = RunnerdExecutor(
        list(kwargs.get("additional_authorized_imports") or []), logger, endpoint, **executor_args
    )
    callbacks = list(kwargs.pop("step_callbacks", None) or []) + [show_figures]
    return CodeAgent(
        tools=kwargs.pop("tools", []), model=model, executor=executor, logger=logger, step_callbacks=callbacks, **kwargs
    )
