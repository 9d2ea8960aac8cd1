"""runnerd: run model-written Python in nsjail cages, locally or behind a ZeroMQ daemon."""

from .errors import RunnerdError
from .result import Artifact, ErrorInfo, Outcome, Reason, Result, SessionEnd, SessionState, Usage

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

__all__ = [
    "Artifact",
    "ErrorInfo",
    "Outcome",
    "PROTOCOL_VERSION",
    "Reason",
    "Result",
    "SessionEnd",
    "SessionState",
    "RunnerdError",
    "Usage",
    "__version__",
]
