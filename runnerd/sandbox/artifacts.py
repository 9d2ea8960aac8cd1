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
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Limits
from ..result import Artifact

MAX_DEPTH = 16
MAX_ENTRIES = 20_000
# Warning lines that name something; past them, one count line per category.
MAX_WARNINGS = 20
# The kinds of oddity a job can leave, as a count line names them.
LINK = "symbolic link(s)"
SPECIAL = "special file(s)"
NOT_AN_IMAGE = "file(s) named as images that are not"

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


SNIFF_BYTES = 2048  # what sniff_image looks at


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
    head = data[:SNIFF_BYTES].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<?xml", b"<svg", b"<!--", b"<!doctype svg")) and b"<svg" in head:
        return "image/svg+xml"
    return None


def _display_name(relative: str) -> str:
    # File names are bytes; the wire wants valid UTF-8 text.
    return relative.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class Warnings:
    """What the collection could not return: lost output first, in a bounded number of lines.

    Lost output (a file or figure dropped, a directory not searched) is what
    the job's author must hear of; oddities (links, FIFOs, images that are
    not) are a job's own leftovers, and it can make thousands. So the lost
    are named first, oddities in the room left, and what is past the room
    is one count line per category.
    """

    def __init__(self) -> None:
        self._lost: list[str] = []
        self._lost_more = 0
        self._odd: list[tuple[str, str]] = []  # (message, kind)
        self._odd_more: Counter[str] = Counter()

    def lost(self, message: str) -> None:
        """Output the job made that does not come back."""
        if len(self._lost) < MAX_WARNINGS:
            self._lost.append(message)
        else:
            self._lost_more += 1

    def odd(self, message: str, kind: str) -> None:
        """Something skipped or returned otherwise than named; *kind* counts it past the room."""
        if len(self._odd) < MAX_WARNINGS:
            self._odd.append((message, kind))
        else:
            self._odd_more[kind] += 1

    def final(self, lost_first: Iterable[str] = ()) -> tuple[list[str], list[str]]:
        """(lost lines, oddity lines), at most MAX_WARNINGS named and a count line each.

        *lost_first* is output lost before the collection (figures never rendered).
        """
        lost = [*lost_first, *self._lost]
        lost_more = self._lost_more + max(0, len(lost) - MAX_WARNINGS)
        lost = lost[:MAX_WARNINGS]
        if lost_more:
            lost.append(f"... and {lost_more} more output(s) dropped for the reasons above")
        room = max(0, MAX_WARNINGS - len(lost))
        odd = [message for message, _ in self._odd[:room]]
        rest = Counter(kind for _, kind in self._odd[room:]) + self._odd_more
        if rest:
            counts = ", ".join(f"{n} {kind}" for kind, n in rest.most_common())
            odd.append(f"... and {rest.total()} more not returned or returned as plain files: {counts}")
        return lost, odd


@dataclass
class Collected:
    figures: list[Artifact] = field(default_factory=list)
    files: list[Artifact] = field(default_factory=list)
    warnings: Warnings = field(default_factory=Warnings)
    dropped: bool = False


def _walk(
    root: Path, exclude: frozenset[str], warnings: Warnings, skip: frozenset[str] = frozenset()
) -> list[tuple[str, Path]]:
    """(relative name, path) of the regular files under *root*, sorted, links and specials skipped.

    *exclude*: top-level names not looked at (the inputs); *skip*: relative
    paths of files left out (a session's files this run did not change).
    """
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
                warnings.lost(
                    f"stopped looking for outputs after {MAX_ENTRIES} directory entries: any past them are lost"
                )
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
                    warnings.lost(
                        f"skipped {_display_name(relative)}/ and all in it: nested deeper than {MAX_DEPTH} levels"
                    )
                else:
                    stack.append((Path(entry.path), relative + "/", depth + 1))
            elif stat.S_ISREG(st.st_mode):
                if relative not in skip:
                    found.append((relative, Path(entry.path)))
            elif relative in skip:
                continue
            elif stat.S_ISLNK(st.st_mode):
                warnings.odd(f"skipped {_display_name(relative)}: a symbolic link (links are never followed)", LINK)
            else:
                warnings.odd(f"skipped {_display_name(relative)}: not a regular file", SPECIAL)
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


def _head(path: Path, size: int = SNIFF_BYTES) -> bytes:
    """The first bytes of a regular file (what :func:`sniff_image` looks at); empty if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.read(fd, size) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
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
            out.warnings.lost(f"dropped {name}: {size} bytes, over the {lim.max_artifact_bytes}-byte limit per file")
            out.dropped = True
            return
        if self.total + size > lim.max_artifacts_total_bytes:
            out.warnings.lost(f"dropped {name}: the outputs passed {lim.max_artifacts_total_bytes} bytes in all")
            out.dropped = True
            return
        suffix = os.path.splitext(relative)[1].lower()
        claimed = _IMAGE_MIME.get(suffix)
        # The count caps before the read: past them a file costs a warning, not its bytes.
        files_full = len(out.files) >= lim.max_artifact_files
        if files_full and (not claimed or len(out.figures) >= lim.max_figures or not sniff_image(_head(path))):
            kind = "figures" if claimed and len(out.figures) >= lim.max_figures else "files"
            cap = lim.max_figures if kind == "figures" else lim.max_artifact_files
            out.warnings.lost(f"dropped {name}: more than {cap} {kind}")
            out.dropped = True
            return
        data = _read_capped(path, lim.max_artifact_bytes)
        if data is None:
            return
        actual = sniff_image(data) if claimed else None
        if claimed and actual:
            if len(out.figures) >= lim.max_figures:
                out.warnings.lost(f"dropped {name}: more than {lim.max_figures} figures")
                out.dropped = True
                return
            out.figures.append(Artifact(self.unique(name), actual, data))
        else:
            if claimed and not rendered:
                out.warnings.odd(f"{name} is not a valid {suffix[1:].upper()} image; returned as a file", NOT_AN_IMAGE)
            if len(out.files) >= lim.max_artifact_files:
                out.warnings.lost(f"dropped {name}: more than {lim.max_artifact_files} files")
                out.dropped = True
                return
            mime = mimetypes.guess_type(name)[0] if not claimed else None
            out.files.append(Artifact(self.unique(name), mime or "application/octet-stream", data))
        self.total += len(data)


def collect(
    work: Path, figures_dir: Path, *, exclude: frozenset[str], limits: Limits, skip: frozenset[str] = frozenset()
) -> Collected:
    """Figures and files from the job's working dir, then the figures the harness rendered.

    *skip*: files under *work* to leave out (a session's, unchanged by this run).
    """
    out = Collected()
    budget = _Budget(limits, out)
    for relative, path in _walk(work, exclude, out.warnings, skip):
        budget.take(relative, path, rendered=False)
    # Names the harness chose (figure_001.png, ...): sorted is the order shown.
    for relative, path in _walk(figures_dir, frozenset(), out.warnings):
        budget.take(relative, path, rendered=True)
    return out
