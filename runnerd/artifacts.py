"""Collect what a job wrote, safely: regular files only, no links followed, everything capped.

Runs on the host after the cage has died, so nothing can change under it.
Still, everything in the job dir was made by untrusted code: a symlink to
/etc/shadow named ``leak.png``, a FIFO that would block a reader, a sparse
file claiming terabytes, a million empty files. So: ``lstat`` before
anything, ``O_NOFOLLOW|O_NONBLOCK`` on open, ``fstat`` the open file, read
at most the cap, and bound the walk itself.

Images (checked by their first bytes, not only their name) come back as
``figures``; everything else as ``files``.
"""

from __future__ import annotations

import mimetypes
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .config import Limits
from .result import Artifact

MAX_DEPTH = 16
MAX_ENTRIES = 20_000
MAX_WARNINGS = 20

_IMAGE_MIME = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".svg": "image/svg+xml",
}


def sniff_image(data: bytes) -> str | None:
    """The image mime type *data* really is, from its first bytes; None if not an image."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"BM") and len(data) > 14:
        return "image/bmp"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff"
    head = data[:2048].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<?xml", b"<svg", b"<!--", b"<!doctype svg")) and b"<svg" in head:
        return "image/svg+xml"
    return None


def _display_name(relative: str) -> str:
    # File names are bytes; the wire wants valid UTF-8 text.
    return relative.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class _Warnings(list):
    """A list that keeps the first MAX_WARNINGS messages and counts the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.more = 0

    def append(self, message: str) -> None:
        if len(self) < MAX_WARNINGS:
            super().append(message)
        else:
            self.more += 1

    def final(self) -> list[str]:
        return [*self, f"... and {self.more} more like these"] if self.more else list(self)


@dataclass
class Collected:
    figures: list[Artifact] = field(default_factory=list)
    files: list[Artifact] = field(default_factory=list)
    warnings: _Warnings = field(default_factory=_Warnings)
    dropped: bool = False


def _walk(root: Path, exclude: frozenset[str], warnings: _Warnings) -> list[tuple[str, Path]]:
    """(relative name, path) of the regular files under *root*, sorted, links and specials skipped."""
    found: list[tuple[str, Path]] = []
    stack: list[tuple[Path, str, int]] = [(root, "", 0)]
    seen = 0
    while stack:
        directory, prefix, depth = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            seen += 1
            if seen > MAX_ENTRIES:
                warnings.append(f"stopped looking for outputs after {MAX_ENTRIES} directory entries")
                return sorted(found)
            relative = f"{prefix}{entry.name}"
            if not prefix and entry.name in exclude:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                if depth + 1 >= MAX_DEPTH:
                    warnings.append(f"skipped {_display_name(relative)}/: nested deeper than {MAX_DEPTH} levels")
                else:
                    stack.append((Path(entry.path), relative + "/", depth + 1))
            elif stat.S_ISREG(st.st_mode):
                found.append((relative, Path(entry.path)))
            elif stat.S_ISLNK(st.st_mode):
                warnings.append(f"skipped {_display_name(relative)}: a symbolic link (links are never followed)")
            else:
                warnings.append(f"skipped {_display_name(relative)}: not a regular file")
    return sorted(found)


def _read_capped(path: Path, cap: int) -> bytes | None:
    """The file's bytes if it is still a regular file no larger than *cap*; else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > cap:
            return None
        chunks = []
        remaining = cap + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        return data if len(data) <= cap else None
    finally:
        os.close(fd)


class _Budget:
    def __init__(self, limits: Limits, out: Collected) -> None:
        self.limits = limits
        self.out = out
        self.total = 0
        self.names: set[str] = set()

    def unique(self, name: str) -> str:
        if name not in self.names:
            self.names.add(name)
            return name
        stem, dot, ext = name.rpartition(".")
        if not dot:
            stem, ext = name, ""
        n = 1
        while True:
            candidate = f"{stem}-{n}.{ext}" if dot else f"{stem}-{n}"
            if candidate not in self.names:
                self.names.add(candidate)
                return candidate
            n += 1

    def take(self, relative: str, path: Path, *, rendered: bool) -> None:
        lim, out = self.limits, self.out
        name = _display_name(relative)
        try:
            size = path.lstat().st_size
        except OSError:
            return
        if size > lim.max_artifact_bytes:
            out.warnings.append(f"dropped {name}: {size} bytes, over the {lim.max_artifact_bytes}-byte limit per file")
            out.dropped = True
            return
        if self.total + size > lim.max_artifacts_total_bytes:
            out.warnings.append(f"dropped {name}: the outputs passed {lim.max_artifacts_total_bytes} bytes in all")
            out.dropped = True
            return
        data = _read_capped(path, lim.max_artifact_bytes)
        if data is None:
            return
        suffix = os.path.splitext(relative)[1].lower()
        claimed = _IMAGE_MIME.get(suffix)
        actual = sniff_image(data) if claimed else None
        if claimed and actual:
            if len(out.figures) >= lim.max_figures:
                out.warnings.append(f"dropped {name}: more than {lim.max_figures} figures")
                out.dropped = True
                return
            out.figures.append(Artifact(self.unique(name), actual, data))
        else:
            if claimed and not rendered:
                out.warnings.append(f"{name} is not a valid {suffix[1:].upper()} image; returned as a file")
            if len(out.files) >= lim.max_artifact_files:
                out.warnings.append(f"dropped {name}: more than {lim.max_artifact_files} files")
                out.dropped = True
                return
            mime = mimetypes.guess_type(name)[0] if not claimed else None
            out.files.append(Artifact(self.unique(name), mime or "application/octet-stream", data))
        self.total += len(data)


def collect(work: Path, figures_dir: Path, *, exclude: frozenset[str], limits: Limits) -> Collected:
    """Figures and files from the job's working dir, then the figures the harness rendered."""
    out = Collected()
    budget = _Budget(limits, out)
    for relative, path in _walk(work, exclude, out.warnings):
        budget.take(relative, path, rendered=False)
    # Names the harness chose (figure_001.png, ...): sorted is the order shown.
    for relative, path in _walk(figures_dir, frozenset(), out.warnings):
        budget.take(relative, path, rendered=True)
    return out
