"""Code that runs inside a cage, in the sandbox env's Python: stdlib only, each file its own program.

The host copies these files into its state dir and binds them read-only at
``/runnerd/`` in every cage: the harness (a cold job's PID 1 and the runner
of the user's code), the zygote (warm mode's pre-armed parent of jobs) and
the inline Matplotlib backend. Nothing here imports runnerd's host code.
"""

from pathlib import Path

DIR = Path(__file__).resolve().parent
# Bound into every cold cage; a zygote's cage also gets zygote.py and lockdown.py.
COLD_FILES = ("harness.py", "runnerd_inline.py", "session.py")
FILES = (*COLD_FILES, "zygote.py", "lockdown.py")
