"""``python -m runnerd``: the same as the ``runnerd`` command."""

from .cli import main

main()
