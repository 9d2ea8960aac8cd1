"""Code that runs inside a cage, in the sandbox env's Python: stdlib only, programs and the files they load by path.

The host copies these files into its state dir and binds them read-only at
``/runnerd/`` in a cage (:data:`COLD_FILES` in a cold one, :data:`FILES` in
a zygote's): the harness (a cold job's PID 1 and the runner of the user's
code, whose API the zygote's children use too), the value repr (the
harness's cut of a trailing value and of long texts), the inline Matplotlib
backend, the session (a session's interpreter and a cold session's PID 1;
the control-socket framing and the loader of the files beside it, which
the zygote uses too), the zygote (warm mode's pre-armed parent of jobs and
sessions), the lockdown (a warm child's capabilities, no_new_privs and
seccomp filter) and the session init (a warm session's PID 1). Nothing here
imports runnerd's host code.
"""

from pathlib import Path

DIR = Path(__file__).resolve().parent
# Bound into every cold cage; a zygote's cage also gets the zygote's own files.
COLD_FILES = ("harness.py", "value_repr.py", "runnerd_inline.py", "session.py")
FILES = (*COLD_FILES, "zygote.py", "lockdown.py", "session_init.py")
