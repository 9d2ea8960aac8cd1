"""Which of a run's figures a tool shows a model, checked on this host before anything decodes them.

A figure's bytes come from the cage: a PNG of a few hundred bytes can claim a canvas of gigapixels, and a
step can write as many figures as the daemon returns (32). The agent frameworks' tools and the MCP server
pass figures on to a model, which re-sends them with every later call, and smolagents decodes them here.
So a figure is shown only in a format every model API takes (PNG, JPEG, GIF), at most
:data:`MAX_FIGURE_PIXELS` by its own header, and at most :data:`MAX_SHOWN` of them per run; each one left out
gets a line the model reads instead.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .result import Artifact, Result

MAX_FIGURE_PIXELS = 4096 * 4096  # a Matplotlib figure at its default 100 dpi is 640x480
MAX_SHOWN = 8
SHOWN_MIMES = ("image/png", "image/jpeg", "image/gif")
# JPEG's start-of-frame markers (which carry the size): C0-CF but C4 (Huffman), C8 (reserved), CC (arithmetic).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


@dataclass
class Shown:
    figures: list[Artifact] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one line for each figure left out


def shown(result: Result) -> Shown:
    out = Shown()
    for fig in result.figures:
        size = image_size(fig.data, fig.mime)
        if size is None:
            out.notes.append(f"figure {fig.name} not shown: not a PNG, JPEG or GIF image with a readable size")
        elif size[0] * size[1] > MAX_FIGURE_PIXELS:
            out.notes.append(f"figure {fig.name} not shown: {size[0]}x{size[1]} pixels, more than {MAX_FIGURE_PIXELS}")
        elif len(out.figures) >= MAX_SHOWN:
            out.notes.append(f"figure {fig.name} not shown: more than {MAX_SHOWN} figures in one run")
        else:
            out.figures.append(fig)
    return out


def image_size(data: bytes, mime: str) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG or GIF; None for any other format or a header that lies."""
    if mime == "image/png" and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if mime == "image/gif" and data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return struct.unpack("<HH", data[6:10])
    if mime == "image/jpeg" and data[:2] == b"\xff\xd8":
        return _jpeg_size(data)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill bytes before a marker
            i += 1
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF:
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        if length < 2:
            return None
        i += 2 + length
    return None
