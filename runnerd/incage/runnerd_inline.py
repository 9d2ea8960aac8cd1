"""The Matplotlib backend of the cage: Agg, with ``show()`` handing figures to runnerd.

Runs inside the cage only (``MPLBACKEND=module://runnerd_inline``; the
harness makes it importable). Like a notebook's inline backend, ``show()``
renders every open figure to a PNG in /runnerd/figures and closes it; the
harness renders whatever is still open when the code ends. Without this,
Agg's ``show()`` would only warn that it cannot show anything.

A figure still open at the end that the code already saved with
``savefig`` (and did not change since) is not rendered again: its saved
file is among the results already, and the model should see it once.
"""

import os
import sys

from matplotlib import _pylab_helpers
from matplotlib.backend_bases import FigureManagerBase
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FIGURE_DIR = "/runnerd/figures"

FigureCanvas = FigureCanvasAgg
FigureManager = FigureManagerBase

_state = {"rendered": 0, "dropped": 0}
_SAVED = "_runnerd_saved"


def _mark_saved(savefig):
    def wrapper(self, *args, **kwargs):
        result = savefig(self, *args, **kwargs)
        setattr(self, _SAVED, True)  # drawn: .stale is False until the figure changes
        return result

    wrapper.__wrapped__ = savefig
    return wrapper


if not hasattr(Figure.savefig, "__wrapped__"):
    Figure.savefig = _mark_saved(Figure.savefig)


def _limit():
    try:
        return int(os.environ.get("RUNNERD_MAX_FIGURES", "32"))
    except ValueError:
        return 32


def _save(figure, path):
    try:
        figure.savefig(path, format="png", bbox_inches="tight")
    except Exception:
        # "tight" fails on some degenerate figures; the plain layout rarely does.
        figure.savefig(path, format="png")


def render_open_figures(skip_saved=False):
    """Render and close every open figure; returns (rendered, dropped) so far."""
    limit = _limit()
    for manager in _pylab_helpers.Gcf.get_all_fig_managers():
        try:
            figure = manager.canvas.figure
            if not figure.axes and not figure.lines:
                continue  # nothing drawn: IPython shows no image for it either
            if skip_saved and getattr(figure, _SAVED, False) and not figure.stale:
                continue  # saved by the code, unchanged since: already a result
            if _state["rendered"] >= limit:
                _state["dropped"] += 1
                continue
            path = os.path.join(FIGURE_DIR, f"figure_{_state['rendered'] + 1:03d}.png")
            _save(figure, path)
            _state["rendered"] += 1
        except Exception as exc:
            sys.__stderr__.write(f"runnerd: figure {manager.num} could not be rendered: {type(exc).__name__}: {exc}\n")
        finally:
            _pylab_helpers.Gcf.destroy(manager)
    return _state["rendered"], _state["dropped"]


def reset():
    """A new run of a session: its figures are numbered from 1 again (the host took the last run's)."""
    _state.update(rendered=0, dropped=0)


def show(*args, **kwargs):
    render_open_figures()
