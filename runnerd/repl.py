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

A Ctrl-C during a run must become a cancel, and only once the daemon has
the run: the cancel goes on a socket of its own, so sent earlier it may
reach the daemon before the run does and hear NOT_FOUND, which after the
run's ``accepted`` means it finished. And Python raises KeyboardInterrupt
wherever the main thread is, so while a run streams SIGINT is taken by a
handler of the run's own (:class:`_CtrlC`), which raises only inside the
wait for the daemon's next reply and otherwise notes the press for the
run's loop to act on.
"""

from __future__ import annotations

import codecs
import codeop
import contextlib
import os
import signal
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TextIO

from . import wire
from .client import Accepted, Client, Event, Finished, Output, Session, new_id, resolve_endpoint
from .errors import ClientError, RemoteError
from .explain import how_it_ended, what_happened
from .result import Result

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


class _CtrlC:
    """SIGINT while a run streams: noted, and raised as KeyboardInterrupt only inside the wait for a reply.

    Raised anywhere else it could land between the run loop's steps (after
    a reply was taken, while a cancel is decided, in a finalizer, where it
    is dropped) and leave the run uncancelled; noted, the loop acts on it
    after the step it came in.
    """

    def __init__(self) -> None:
        self.pressed = False
        self.waiting = False

    def __call__(self, signum: int, frame: object) -> None:
        self.pressed = True  # kept if the exception is lost: the next reply acts on it
        if self.waiting:
            self.waiting = False
            raise KeyboardInterrupt

    def take(self) -> bool:
        """Whether Ctrl-C was pressed since the last take."""
        pressed, self.pressed = self.pressed, False
        return pressed

    @contextlib.contextmanager
    def handling(self) -> Iterator[None]:
        """SIGINT comes here inside the block, whatever its handler was (ignored too): a run's Ctrl-C is the repl's."""
        previous = signal.getsignal(signal.SIGINT)
        if previous is None or threading.current_thread() is not threading.main_thread():
            # A handler that is not Python's is left alone; and Python runs handlers in the main thread only.
            yield
            return
        # A press just before the swap is not lost: the previous handler raises (the run is not sent yet),
        # or this one notes it.
        signal.signal(signal.SIGINT, self)
        try:
            yield
        finally:
            # A press noted after the last reply was taken is dropped: the run has ended.
            signal.signal(signal.SIGINT, previous)

    def waits(self, events: Iterator[Event]) -> Iterator[Event]:
        """*events*, each waited for where Ctrl-C raises KeyboardInterrupt."""
        while True:
            self.waiting = True
            try:
                if self.take():
                    raise KeyboardInterrupt  # pressed just before this wait: not after the next reply
                event = next(events)
            except StopIteration:
                return
            finally:
                self.waiting = False
            yield event


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
                if exc.code != wire.NOT_FOUND:
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
        ctrl_c = _CtrlC()
        accepted = False  # the daemon has the run: a cancel sent from now on cannot overtake it
        cancel = False  # Ctrl-C asked for a cancel not sent yet
        with ctrl_c.handling():
            while True:
                try:
                    for event in ctrl_c.waits(self.session.stream(source, timeout=self.timeout, job_id=job_id)):
                        if isinstance(event, Accepted):
                            accepted = True
                        elif isinstance(event, Output):
                            echo.write(event.stream, event.data)
                        elif isinstance(event, Finished):
                            return event.result, echo
                        cancel = ctrl_c.take() or cancel
                        if cancel and accepted:
                            cancel = False
                            self._cancel(job_id)
                except KeyboardInterrupt:
                    # The wait (or a write) was broken off. A run not accepted yet may not have
                    # been sent: streaming it again sends it (the same id never runs twice), and
                    # its accepted sends the cancel.
                    ctrl_c.take()
                    cancel = True
                except RemoteError as exc:
                    if exc.code == wire.NOT_FOUND and (cancel or ctrl_c.take()):
                        # Its session ended before the run was taken: not to be run again in a
                        # new one (as execute would), the Ctrl-C stands.
                        raise KeyboardInterrupt from exc
                    raise
                # Streaming again with the same id loses nothing: the daemon replays the run's replies.
                echo.resume()

    def _cancel(self, job_id: str) -> None:
        try:
            self.client.cancel(job_id)
            self.say("cancelling the run")
        except RemoteError as exc:
            if exc.code != wire.NOT_FOUND:
                self.say(f"cancel: {exc}")  # NOT_FOUND after accepted: it finished meanwhile; its result follows
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
    # Started with SIGINT ignored (what a shell without job control does to a
    # command run with &, and what that command's children inherit), Python
    # leaves it ignored, and the prompt would promise a Ctrl-C that never comes.
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with Client(resolve_endpoint(endpoint), curve=curve) as client:
            client.ping()  # a daemon that is not there is said in seconds, not after an open's wait
            repl = Repl(client, out, err, files=files, idle_timeout=idle_timeout, figures=figures, timeout=timeout)
            repl.start()
            repl.say(f"figures go to {figures}/; Ctrl-C stops a run, Ctrl-D ends")
            try:
                interact(_prompted(repl), repl)
            finally:
                save_history()
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    return 0
