"""runnerd's harness: runs *inside* the cage, as the jailed user, under the sandbox env's Python.

Standard library only (the sandbox env does not have runnerd installed), and
never imported by the host: the host copies this file into the cage.

It runs the job's code the way ``python main.py`` would, from /work, so that
tracebacks name ``main.py`` and the user's own lines, then renders the
Matplotlib figures still open (those a notebook would show), and tells the
host what happened as JSON lines on the report fd (argv[1]):

    {"event": "start"}
    {"event": "end", "exit_code": 0, "error": null | {type, message, traceback, lineno},
     "figures": 2, "figures_dropped": 0}          (from the job's process)
    {"event": "exit", "exit_code": 0} | {"event": "exit", "signal": 9}
                                                  (from PID 1, once that process ended)

The host trusts none of it beyond its size: user code shares this process
and can write to the fd too. The report can only make a result look worse
(see runnerd/result.py), and outputs are collected by the host itself.

The API the warm zygote uses (it loads this file by path): :func:`reporter`,
:func:`ignore_signals`, :func:`install_backend_finder`, :func:`run_user_code`,
:func:`end_the_rest`
(the job's process), :func:`reap` (its PID 1) and :func:`close_reports`. A
session's interpreter (session.py, cold or warm) runs its cells with
:func:`prepare_user_process`, :func:`fresh_main`, :func:`execute`,
:func:`describe` and :func:`render_figures`.
"""

import ast
import builtins
import faulthandler
import importlib.util
import json
import linecache
import os
import signal
import sys
import traceback
import types
from collections.abc import Callable
from typing import NoReturn

CODE_PATH = "/runnerd/main.py"
BACKEND_NAME = "runnerd_inline"
_HERE = os.path.dirname(os.path.abspath(__file__))  # /runnerd in a cage
_SIBLINGS = {BACKEND_NAME: "runnerd_inline.py", "runnerd_value_repr": "value_repr.py"}
FILENAME = "main.py"
MAX_MESSAGE = 8 * 1024
MAX_TRACEBACK = 32 * 1024
# The names the user's code is compiled under: main.py, and a session's cells (cell1.py, ...).
USER_FILES = {FILENAME}
_REPORT_FDS: list[int] = []


class _SiblingFinder:
    """Makes the in-cage files beside this one importable by name without putting their folder on sys.path
    (-I keeps it off): the Matplotlib backend (MPLBACKEND=module://runnerd_inline) and the value repr."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        file = _SIBLINGS.get(name)
        return importlib.util.spec_from_file_location(name, os.path.join(_HERE, file)) if file else None


def install_backend_finder() -> None:
    if _SiblingFinder not in sys.meta_path:
        sys.meta_path.append(_SiblingFinder)


install_backend_finder()
_values = importlib.import_module("runnerd_value_repr")


def _user_frames(te):
    """Cut a TracebackException (and its chain) down to frames of the user's code.

    A chained exception left with no user frame at all happened wholly
    inside a library (pandas raising KeyError from its index engine, then
    again for the user): it is dropped, as it only repeats the error.
    """
    te.stack = traceback.StackSummary.from_list([f for f in te.stack if f.filename in USER_FILES])
    for attr in ("__cause__", "__context__"):
        chained = getattr(te, attr)
        if chained is None:
            continue
        _user_frames(chained)
        if not chained.stack:
            setattr(te, attr, None)
    return te


def describe(exc):
    """The error record of an exception raised by the user's code."""
    te = _user_frames(traceback.TracebackException.from_exception(exc))
    text = "".join(te.format())
    lineno = None
    if te.stack:
        lineno = te.stack[-1].lineno
    elif isinstance(exc, SyntaxError) and exc.filename in USER_FILES:
        lineno = exc.lineno
    try:
        message = str(exc)
    except Exception:  # a user exception whose __str__ raises
        message = f"<{_values.type_name(type(exc))} with an unprintable message>"
    if isinstance(exc, SyntaxError) and exc.msg:
        message = exc.msg
    return {
        "type": _values.type_name(type(exc)),
        "message": _values.cut(message, MAX_MESSAGE),
        "traceback": _values.cut(text, MAX_TRACEBACK),
        "lineno": lineno,
    }


def _exit_code(exc):
    """Python's own rules for SystemExit."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int) and not isinstance(code, bool):
        return code & 0xFF
    try:
        print(code, file=sys.__stderr__)
    except Exception:
        pass
    return 1


def _write_stderr(text):
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:
        pass


def _split_value(tree: ast.Module) -> tuple[ast.Module, ast.Expression | None]:
    """The code without its trailing bare expression, and that expression (as a notebook cell shows it)."""
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body[-1]
        return ast.Module(body=tree.body[:-1], type_ignores=tree.type_ignores), ast.Expression(body=last.value)
    return tree, None


def execute(source: str, filename: str, namespace: dict, max_value: int) -> tuple[int, dict | None, str | None]:
    """Run *source* in *namespace*: (exit code, error record, the trailing expression's repr or None).

    SystemExit follows Python's rules; any other exception is described
    (and its traceback written to stderr), exit code 1.
    """
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    USER_FILES.add(filename)
    try:
        tree = compile(source, filename, "exec", ast.PyCF_ONLY_AST, dont_inherit=True)
        assert isinstance(tree, ast.Module)
        body, last = _split_value(tree)
        exec(compile(body, filename, "exec", dont_inherit=True), namespace)
        if last is None:
            return 0, None, None
        value = eval(compile(last, filename, "eval", dont_inherit=True), namespace)
        return 0, None, None if value is None else _values.value_repr(value, max_value)
    except SystemExit as exc:
        return _exit_code(exc), None, None
    except BaseException as exc:
        error = describe(exc)
        _write_stderr(error["traceback"])
        return 1, error, None


def fresh_main() -> types.ModuleType:
    """A fresh __main__ without __file__: multiprocessing's spawn then treats it as interactive."""
    module = types.ModuleType("__main__")
    module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = module
    return module


def prepare_user_process(max_figures: int) -> None:
    """What the user's process needs before any of its code: faulthandler, the backend, argv, sys.path."""
    faulthandler.enable(file=sys.__stderr__ or sys.stderr)
    install_backend_finder()
    # Read by the backend; the host enforces the cap again on what it collects.
    os.environ["RUNNERD_MAX_FIGURES"] = str(max_figures)
    sys.argv = [FILENAME]
    sys.path.insert(0, os.getcwd())


def render_figures() -> tuple[int, int]:
    """Render (and close) the Matplotlib figures still open: (rendered, dropped)."""
    if "matplotlib.pyplot" not in sys.modules:
        return 0, 0
    try:
        backend = importlib.import_module(BACKEND_NAME)
        return backend.render_open_figures(skip_saved=True)
    except BaseException as exc:
        _write_stderr(f"runnerd: the open figures could not be rendered: {type(exc).__name__}: {exc}\n")
        return 0, 0


def run_user_code(send: Callable[..., None], max_figures: int, max_value: int) -> NoReturn:
    """Run the job's code in this (forked) process, then exit it (never returns)."""
    with open(CODE_PATH, encoding="utf-8") as fh:
        source = fh.read()
    prepare_user_process(max_figures)
    module = fresh_main()
    exit_code, error, value = execute(source, FILENAME, module.__dict__, max_value)
    rendered, dropped = render_figures()
    send(event="end", exit_code=exit_code, error=error, figures=rendered, figures_dropped=dropped, value=value)
    _exit_like_python(exit_code, module)


def _exit_like_python(exit_code: int, module: types.ModuleType) -> NoReturn:
    """What a normal interpreter exit does for the user, without tearing every module down.

    Non-daemon threads are waited for, atexit handlers run, the user's own
    objects are released (so files they left open are flushed), stdout and
    stderr are flushed. Skipping the module teardown matters in warm mode:
    there it would touch, and so copy, every page the zygote shares with
    this process (hundreds of ms for pandas and Matplotlib).
    """
    import atexit
    import gc

    threading = sys.modules.get("threading")
    if threading is not None:
        try:
            threading._shutdown()
        except Exception:
            pass
    atexit._run_exitfuncs()
    module.__dict__.clear()
    gc.collect()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    # Close our ends now: the host sees EOF before the kernel has torn this
    # (large, in warm mode) process down.
    for fd in (1, 2, *_REPORT_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    os._exit(exit_code)


def reap(child: int, send: Callable[..., None]) -> int:
    """PID 1 of the cage: reap every process until the job's own process ends.

    The kernel gives a pid namespace's init odd rules (signals without a
    handler are ignored, orphans become its zombies), so the user's code runs
    in a child with ordinary semantics, and this small process reaps. When
    it exits, the kernel kills whatever is left in the namespace: a job
    cannot leave a daemon behind.
    """
    ignore_signals()
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return 1
        except InterruptedError:
            continue
        if pid != child:
            continue
        if os.WIFSIGNALED(status):
            signum = os.WTERMSIG(status)
            send(event="exit", signal=signum)
            return 128 + signum
        code = os.waitstatus_to_exitcode(status)
        send(event="exit", exit_code=code)
        return code


class Reporter:
    """Writes one JSON record per line to a report fd; ``close()`` ends the report (a session's run)."""

    def __init__(self, report_fd: int) -> None:
        os.set_inheritable(report_fd, False)
        self.fd = report_fd
        self.file = os.fdopen(report_fd, "w", encoding="utf-8")
        _REPORT_FDS.append(report_fd)

    def __call__(self, **record: object) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except (OSError, ValueError):
            pass  # the user's code closed or broke the fd; the host copes

    def close(self) -> None:
        if self.fd in _REPORT_FDS:
            _REPORT_FDS.remove(self.fd)
        try:
            self.file.close()
        except OSError:
            pass


def end_the_rest() -> None:
    """PID 1, once the user's process ended: kill every other process of the namespace and reap them."""
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    while True:
        try:
            os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue


def reporter(report_fd: int) -> Reporter:
    """A function that writes one JSON record per line to the report fd."""
    return Reporter(report_fd)


def ignore_signals() -> None:
    """PID 1 of a namespace: signals from inside must not stop it (nor raise KeyboardInterrupt)."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)


def serve_job(
    report_fd: int, max_figures: int, max_value: int, before_user_code: Callable[[], None] | None = None
) -> NoReturn:
    """Report "start", run the user's code in a child, reap as PID 1, exit with its status. Never returns."""
    send = reporter(report_fd)

    send(event="start")
    child = os.fork()
    if child == 0:
        if before_user_code is not None:
            before_user_code()
        run_user_code(send, max_figures, max_value)  # exits the process
    os._exit(reap(child, send))


def close_reports() -> None:
    """Close every report fd this process opened: the host sees the report's end now."""
    for fd in _REPORT_FDS:
        try:
            os.close(fd)
        except OSError:
            pass


def main(argv: list[str]) -> None:
    serve_job(int(argv[1]), int(argv[2]), int(argv[3]))


if __name__ == "__main__":
    main(sys.argv)
