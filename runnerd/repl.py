"""``runnerd repl``: a Python prompt for a person, into a session in a runnerd sandbox.

Input is read as Python's own REPL reads it (:class:`InputBuffer`: a
statement that needs more lines gets the ``...`` prompt), each complete one
runs in the session, its output streams as it comes, and a trailing
expression's value is printed after it. Figures are written to a folder.
Ctrl-C during a run cancels that run (the session and its variables stay,
if the code stops within the daemon's grace); Ctrl-D closes the session and
ends the prompt. A session that ended is replaced by a new one at the next
input, and the prompt says so.

The core, :func:`interact`, reads lines from any iterable and writes to any
text streams, so it runs without a terminal; :func:`main` adds the
terminal: prompts, readline and its history.
"""

from __future__ import annotations

import codecs
import codeop
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TextIO

from .client import Client, Finished, Output, Session, new_id, resolve_endpoint
from .errors import ClientError, RemoteError
from .explain import how_it_ended, what_happened
from .result import Result
from .server import protocol

PS1 = ">>> "
PS2 = "... "
HISTORY_FILE = "~/.runnerd_history"
HISTORY_LENGTH = 2000
DEFAULT_FIGURES = "runnerd-figures"


class InputBuffer:
    """Lines typed so far, until they make a complete statement (the rules of Python's REPL)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    @property
    def prompt(self) -> str:
        return PS2 if self.lines else PS1

    def push(self, line: str) -> str | None:
        """Add a line: the source to run when it completes a statement, else None (more lines needed)."""
        if not self.lines and not line.strip():
            return None
        self.lines.append(line)
        source = "\n".join(self.lines)
        if self._incomplete(source):
            return None
        self.lines = []
        return source + "\n"

    def flush(self) -> str | None:
        """What is left at the end of input, to run as it is (None if nothing)."""
        source = "\n".join(self.lines)
        self.lines = []
        return source + "\n" if source.strip() else None

    def reset(self) -> None:
        self.lines = []

    @staticmethod
    def _incomplete(source: str) -> bool:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a SyntaxWarning is the sandbox's to show
                return codeop.compile_command(source, "<stdin>", "single") is None
        except (SyntaxError, OverflowError, ValueError):
            # The sandbox's Python (perhaps newer than this one) decides, and words the error.
            return False


class _Echo:
    """Writes a run's streamed output once, though a resumed run sends it again from the start."""

    def __init__(self, out: TextIO, err: TextIO) -> None:
        self.targets = {"stdout": out, "stderr": err}
        self.shown = {"stdout": 0, "stderr": 0}
        self.heard = {"stdout": 0, "stderr": 0}
        self.decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in self.targets}
        self.stdout_ends_line = True
        self.stderr_text = ""

    def resume(self) -> None:
        """The same run is streamed again: its chunks start over at offset 0."""
        self.heard = {"stdout": 0, "stderr": 0}

    def write(self, stream: str, data: bytes) -> None:
        start = self.heard[stream]
        self.heard[stream] += len(data)
        fresh = data[max(0, self.shown[stream] - start) :]
        if not fresh:
            return
        text = self.decoders[stream].decode(fresh)
        self.targets[stream].write(text)
        self.targets[stream].flush()
        self.shown[stream] += len(fresh)  # after the write: a write Ctrl-C broke is written again
        if stream == "stderr":
            self.stderr_text += text
        elif text:
            self.stdout_ends_line = text.endswith("\n")


class Repl:
    """A session driven line by line: :meth:`feed` each line, :meth:`finish` at the end of input."""

    def __init__(
        self, client: Client, out: TextIO, err: TextIO | None = None, *,
        files: Mapping[str, bytes] | None = None, idle_timeout: float | None = None,
        figures: Path = Path(DEFAULT_FIGURES), timeout: float | None = None,
    ) -> None:  # fmt: skip
        self.client = client
        self.out = out
        self.err = err or out
        self.buffer = InputBuffer()
        self.figures = figures
        self.timeout = timeout
        self.session: Session = client.session(files=files, idle_timeout=idle_timeout)
        self.runs = 0

    @property
    def prompt(self) -> str:
        return self.buffer.prompt

    def say(self, text: str) -> None:
        self.err.write(f"runnerd: {text}\n")
        self.err.flush()

    def start(self) -> None:
        """Open the session (RemoteError/ClientError if the daemon cannot)."""
        self.session.ensure_open()
        self._announce()

    def _announce(self) -> None:
        limits = self.session.limits
        said = [f"session {self.session.id} at {self.client.endpoint}"]
        if isinstance(limits.get("run_timeout"), int | float):
            said.append(f"runs stop after {limits['run_timeout']:g} s")
        if isinstance(limits.get("idle_timeout"), int | float):
            said.append(f"it ends after {limits['idle_timeout']:g} s idle")
        self.say("; ".join(said))

    def interrupt(self) -> None:
        """Ctrl-C at the prompt: drop the lines typed so far, as Python does."""
        self.buffer.reset()
        self.out.write("\nKeyboardInterrupt\n")
        self.out.flush()

    def feed(self, line: str) -> Result | None:
        """Take one line; when it completes a statement, run it and return the result."""
        source = self.buffer.push(line)
        return self.execute(source) if source is not None else None

    def finish(self) -> None:
        """End of input: run what is left (a block without its closing blank line), then close the session."""
        try:
            source = self.buffer.flush()
            if source is not None:
                self.execute(source)
        finally:
            self.close()

    def close(self) -> None:
        try:
            self.session.close()
        except ClientError as exc:
            self.say(f"could not close session {self.session.id}: {exc}")

    def execute(self, source: str) -> Result | None:
        """Run *source* in the session (a new one if it ended), show what it did; None if it did not run."""
        try:
            if self.session.ensure_open():
                self._announce()
            self.runs += 1
            try:
                result, echo = self._run(source)
            except RemoteError as exc:
                if exc.code != protocol.NOT_FOUND:
                    raise
                # Ended since its last result (an idle timeout): run this in a new one.
                self.say(f"the session ended ({how_it_ended(self.session.ended)}); earlier variables are gone")
                self.session.reopen()
                self._announce()
                result, echo = self._run(source)
        except ClientError as exc:
            self.say(str(exc))
            return None
        self._show(result, echo)
        return result

    def _run(self, source: str) -> tuple[Result, _Echo]:
        job_id = new_id()
        echo = _Echo(self.out, self.err)
        while True:
            try:
                for event in self.session.stream(source, timeout=self.timeout, job_id=job_id):
                    if isinstance(event, Output):
                        echo.write(event.stream, event.data)
                    elif isinstance(event, Finished):
                        return event.result, echo
            except KeyboardInterrupt:
                self._cancel(job_id)
            # Streaming again with the same id loses nothing: the daemon replays the run's replies.
            echo.resume()

    def _cancel(self, job_id: str) -> None:
        try:
            self.client.cancel(job_id)
            self.say("cancelling the run")
        except RemoteError as exc:
            if exc.code != protocol.NOT_FOUND:
                self.say(f"cancel: {exc}")  # NOT_FOUND: it finished meanwhile; its result follows
        except (ClientError, KeyboardInterrupt):
            self.say("cancel not sent; Ctrl-C again to retry")

    def _show(self, result: Result, echo: _Echo) -> None:
        if not echo.stdout_ends_line:
            self.out.write("\n")
        if result.error is not None:
            # The harness writes the traceback to stderr; shown already unless that stream was cut.
            if result.error.traceback.strip() not in echo.stderr_text:
                self.err.write(result.error.traceback.rstrip("\n") + "\n")
        elif not result.ok:
            self.say(what_happened(result, self.timeout))
        if result.value is not None:
            self.out.write(result.value + "\n")
        self.out.flush()
        for path in self._save_figures(result):
            self.say(f"figure saved: {path}")
        if result.files:
            self.say("files written: " + ", ".join(f"{f.name} ({len(f.data)} bytes)" for f in result.files))
        for warning in result.warnings:
            self.say(f"warning: {warning}")
        state = result.session
        if state is not None and not state.alive:
            self.say(f"the session ended: {how_it_ended(state.ended)}; the next input opens a new one")

    def _save_figures(self, result: Result) -> list[Path]:
        saved = []
        for figure in result.figures:
            # A figure's name may be a path under the job's directory: one flat file here.
            name = f"run{self.runs}-{figure.name.replace('/', '-')}"
            self.figures.mkdir(parents=True, exist_ok=True)
            path = self.figures / name
            path.write_bytes(figure.data)
            saved.append(path)
        return saved


def interact(lines: Iterable[str], repl: Repl) -> None:
    """Feed every line to *repl*, then close its session. Ctrl-C outside a run drops the input typed so far."""
    iterator = iter(lines)
    try:
        while True:
            try:
                line = next(iterator)
            except StopIteration:
                break
            try:
                repl.feed(line)
            except KeyboardInterrupt:
                repl.interrupt()
    finally:
        repl.finish()


def _prompted(repl: Repl) -> Iterator[str]:
    """Lines typed at the terminal, each after the prompt the buffer asks for; ends at Ctrl-D."""
    while True:
        try:
            yield input(repl.prompt)
        except EOFError:
            repl.out.write("\n")
            return
        except KeyboardInterrupt:
            repl.interrupt()


def _history() -> Callable[[], None]:
    """Load readline's history; the function that saves it (bounded) at the end."""
    try:
        import readline
    except ImportError:  # pragma: no cover - a Python built without readline
        return lambda: None
    path = os.path.expanduser(HISTORY_FILE)
    try:
        readline.read_history_file(path)
    except OSError:
        pass  # none yet, or unreadable: start without
    readline.set_history_length(HISTORY_LENGTH)

    def save() -> None:
        try:
            readline.write_history_file(path)
        except OSError:
            pass  # a read-only home loses the history, not the session

    return save


def main(
    endpoint: str | None = None, curve: Mapping[str, bytes] | None = None, *,
    files: Mapping[str, bytes] | None = None, idle_timeout: float | None = None,
    figures: Path = Path(DEFAULT_FIGURES), timeout: float | None = None,
    out: TextIO | None = None, err: TextIO | None = None,
) -> int:  # fmt: skip
    """The prompt on this process's terminal (or its piped stdin): 0 at the end of input."""
    import sys

    out = out or sys.stdout
    err = err or sys.stderr
    save_history = _history() if sys.stdin.isatty() else (lambda: None)
    with Client(resolve_endpoint(endpoint), curve=curve) as client:
        client.ping()  # a daemon that is not there is said in seconds, not after an open's wait
        repl = Repl(client, out, err, files=files, idle_timeout=idle_timeout, figures=figures, timeout=timeout)
        repl.start()
        repl.say(f"figures go to {figures}/; Ctrl-C stops a run, Ctrl-D ends")
        try:
            interact(_prompted(repl), repl)
        finally:
            save_history()
    return 0
