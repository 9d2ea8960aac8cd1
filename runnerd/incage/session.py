"""A session inside its cage: one interpreter that runs the session's runs one after another.

The user's process (U) keeps one ``__main__`` for the session's life, so
variables, imports and functions persist, and takes runs over the session's
control socket: each with three fresh fds (stdout, stderr, report), as a
job gets them. Per run it reports ``start`` and ``end`` (the job's report
records), renders and closes the figures still open, and says ``done`` on
the socket; the host then freezes the session's cgroup until the next run.
Its PID 1 (this file's :func:`main` in a cold cage, the zygote's G in a
warm one) reaps, and when U ends says how on the same socket.

Control socket, both ways: a 4-byte big-endian length, then JSON::

    host -> U     {"op": "run"}  + 4 fds: stdout, stderr, report, and the code (a sealed memfd)
                  (the run's inputs are in /work already)
    U -> host     {"event": "ready"}  once;  {"event": "done"}  after each run
    PID 1 -> host {"event": "exit", "exit_code": n} | {"event": "exit", "signal": n}

A deadline or cancel is SIGINT to U: ``KeyboardInterrupt`` in the user's
code. Outside it (between runs, in runnerd's own steps) SIGINT is ignored.
Like the harness, nothing here is trusted by the host beyond its size.

Also the framing the zygote speaks to the host (:func:`send_msg`,
:func:`recv_msg`) and the loader of the other in-cage files (:func:`sibling`).
"""

import importlib.util
import json
import os
import signal
import socket
import struct
import sys
import types
from collections.abc import Sequence
from typing import Any

FIGURES = "/runnerd/figures"
MAX_MESSAGE = 1 << 20  # orders and events are small: a run's code comes in a file of its own


def sibling(name: str) -> types.ModuleType:
    """Another in-cage file, loaded by its path: -I keeps this file's folder off sys.path."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"runnerd_{name}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def send_msg(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    body = json.dumps(message).encode()
    frame = struct.pack(">I", len(body)) + body
    if fds:
        socket.send_fds(sock, [frame], list(fds))
    else:
        sock.sendall(frame)


def recv_msg(sock: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the fds that came with it; (None, []) at EOF or on a malformed frame."""
    head, fds = b"", []
    while len(head) < 4:
        if max_fds:
            chunk, got, _, _ = socket.recv_fds(sock, 4 - len(head), max_fds)
            fds.extend(got)
        else:
            chunk = sock.recv(4 - len(head))
        if not chunk:
            return None, fds
        head += chunk
    (size,) = struct.unpack(">I", head)
    if size > MAX_MESSAGE:
        return None, fds
    body = b""
    while len(body) < size:
        chunk = sock.recv(size - len(body))
        if not chunk:
            return None, fds
        body += chunk
    message = json.loads(body)
    return (message if isinstance(message, dict) else None), fds


def _read_code(fd: int) -> str:
    """The run's code, from the sealed memfd the host sent (the order itself stays small)."""
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")


def _clear_figures() -> None:
    """The last run's rendered figures (the host has collected them): this run's names start afresh."""
    try:
        for entry in os.scandir(FIGURES):
            try:
                os.unlink(entry.path)
            except OSError:
                pass
    except OSError:
        pass
    backend = sys.modules.get("runnerd_inline")
    if backend is not None:
        backend.reset()


def _close_figures() -> None:
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None:
        try:
            pyplot.close("all")
        except Exception:
            pass


class _Pressed:
    """SIGINT between taking a run's order and its code starting: kept, so the run starts interrupted.

    Installed only once the order is taken (after the host was told
    ``running``, when its stop may send SIGINT): between runs SIGINT stays
    ignored, so one that comes late for the last run is dropped, never
    kept for the next.
    """

    def __init__(self) -> None:
        self.pressed = False

    def __call__(self, signum: int, frame: object) -> None:
        self.pressed = True


def _run(
    harness: types.ModuleType, code: str, filename: str, namespace: dict, max_value: int, early: _Pressed
) -> tuple:
    """One run of user code, interruptible by SIGINT only while the user's code runs."""
    try:
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            if early.pressed:
                raise KeyboardInterrupt
            return harness.execute(code, filename, namespace, max_value)
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    except KeyboardInterrupt as exc:  # arrived just after the user's code returned
        return 1, harness.describe(exc), None


def serve_runs(sock: socket.socket, harness: types.ModuleType, max_figures: int, max_value: int) -> None:
    """U: run the session's runs until the host closes the socket; then exit. Never returns."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    harness.prepare_user_process(max_figures)
    module = harness.fresh_main()
    devnull = os.open(os.devnull, os.O_RDWR)
    send_msg(sock, {"event": "ready"})
    count = 0
    while True:
        order, fds = recv_msg(sock, max_fds=4)
        if order is None or order.get("op") != "run" or len(fds) != 4:
            for fd in fds:
                os.close(fd)
            os._exit(0)  # closed (or a host that broke the protocol): the session ends
        early = _Pressed()
        signal.signal(signal.SIGINT, early)
        send_msg(sock, {"event": "running"})  # the host sends a stop's SIGINT only from now on
        code = _read_code(fds.pop())
        count += 1
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        os.close(fds[0])
        os.close(fds[1])
        report = harness.reporter(fds[2])
        report(event="start")
        _clear_figures()
        exit_code, error, value = _run(harness, code, f"cell{count}.py", module.__dict__, max_value, early)
        rendered = dropped = 0
        if error is not None and error["type"] == "KeyboardInterrupt":
            # Stopped at its deadline (or cancelled): what it drew is dropped, not rendered,
            # so the grace the host gives it is not spent on drawing.
            _close_figures()
        else:
            try:
                rendered, dropped = harness.render_figures()
            except KeyboardInterrupt:
                pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        report(event="end", exit_code=exit_code, error=error, figures=rendered, figures_dropped=dropped, value=value)
        report.close()
        # What the user's threads print once the session runs again, before
        # the next run's pipes are in place, goes nowhere.
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        send_msg(sock, {"event": "done"})


def reap_session(user: int, sock: socket.socket, harness: types.ModuleType) -> int:
    """PID 1 of a session: reap until U ends, say how on the control socket, end the rest. U's status."""

    def send(**record: Any) -> None:
        try:
            send_msg(sock, record)
        except OSError:
            pass

    code = harness.reap(user, send)
    harness.end_the_rest()
    return code


def main(argv: list[str]) -> None:
    """A cold session's PID 1: ``session.py CTL_FD MAX_FIGURES MAX_VALUE``."""
    sock = socket.socket(fileno=int(argv[1]))
    harness = sibling("harness")
    user = os.fork()
    if user == 0:
        serve_runs(sock, harness, int(argv[2]), int(argv[3]))
    harness.ignore_signals()
    os._exit(reap_session(user, sock, harness))


if __name__ == "__main__":
    main(sys.argv)
