"""The text of a trailing value and of a long message, within a cap: runs in the cage (stdlib only).

:func:`value_repr` is what a notebook shows for a cell's last expression,
never longer than the cap and, for builtin containers and text, never made
whole first; :func:`cut` keeps a long text's head and tail. The harness
imports this file beside it as ``runnerd_value_repr``.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any


def marker(count: int, unit: str) -> str:
    """The line that stands for the middle of a cut text: *count* *unit* (characters, bytes, items) cut."""
    return f"\n... [{count} {unit if count != 1 else unit[:-1]} cut] ...\n"


def cut(text, limit):
    """*text* in at most *limit* characters: its head, a line saying how much was cut, its tail."""
    if len(text) <= limit:
        return text
    # The marker's longest form: the host caps at *limit* again, so all of it must fit.
    room = max(0, limit - len(marker(len(text), "characters")))
    head = room // 4
    tail = room - head
    return f"{text[:head]}{marker(len(text) - head - tail, 'characters')}{text[len(text) - tail :]}"


def type_name(exc_type):
    module = getattr(exc_type, "__module__", "builtins")
    name = getattr(exc_type, "__qualname__", exc_type.__name__)
    return name if module in ("builtins", "__main__") else f"{module}.{name}"


def value_repr(value: object, cap: int) -> str:
    """repr(*value*) cut to *cap* characters as :func:`cut` cuts; a builtin container's or text's not made whole.

    ``x = list(range(10**7)); x`` or ``"a" * 10**9`` would cost the cage
    seconds and hundreds of MiB for a repr of which 8 KiB is kept. Those
    types' reprs are walked only as far as the cap needs (:class:`_Bounded`):
    what fits is repr() exactly; what does not keeps repr()'s head and tail,
    and the line between them counts what it does not show in the value's
    own terms (items, characters of a str, bytes), as the whole repr is not
    there to count. Other objects' reprs are their own, built whole and cut.
    """
    if _bounded_kind(value) is not None:
        try:
            return _Bounded().repr(value, cap)
        except Exception:
            pass  # a repr inside raised, the value changed while walked, nesting too deep: repr() itself decides
    try:
        text = repr(value)
    except Exception as exc:  # a user object whose __repr__ raises
        text = f"<{type_name(type(value))} object; repr() raised {type_name(type(exc))}>"
    return cut(text, cap)


_BOUNDED: tuple[Any, ...] = (str, bytes, list, tuple, dict, set, frozenset, deque)
# Those whose repr lists what iterating them gives (PySequence_List): a subclass with its own __iter__ is its own.
_ITERATED: tuple[Any, ...] = (set, frozenset, deque)
_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made by a class statement, whose repr name is its __name__
# Room for the longest marker line: a cut container's count is of whatever it holds (its own items, or a
# str inside it), known only once cut, so the room is kept for the largest.
_MARKER_ROOM = len(marker(sys.maxsize, "characters"))


def _bounded_kind(value: object) -> Any:
    """The builtin type of :data:`_BOUNDED` whose own repr *value* has (a subclass that keeps it too); else None."""
    cls: Any = type(value)
    for base in _BOUNDED:
        if issubclass(cls, base) and cls.__repr__ is base.__repr__:
            if base in _ITERATED and (
                cls.__iter__ is not base.__iter__ or (cls is not base and not cls.__flags__ & _HEAPTYPE)
            ):
                return None
            return base
    return None


def _side(text: str, n: int, forward: bool) -> str:
    """The first (*forward*) or last *n* characters of *text*."""
    return text[:n] if forward else text[max(0, len(text) - n) :]


def _quote(value: Any, kind: Any) -> str:
    """The quote repr() puts around a str or bytes: ' unless the text has ' and no "."""
    single, double = ("'", '"') if kind is str else (b"'", b'"')
    return '"' if kind.__contains__(value, single) and not kind.__contains__(value, double) else "'"


def _body(piece: Any, kind: Any, quote: str) -> str:
    """repr() of the str or bytes *piece* between its quotes, escaped as in a text quoted with *quote*."""
    lead = 1 if kind is str else 2
    # repr() quotes a text holding both quotes with ' (escaping it), one holding only ' with ".
    if quote == "'":
        return kind.__repr__(piece + ("'\"" if kind is str else b"'\""))[lead:-4]
    return kind.__repr__(piece + ("'" if kind is str else b"'"))[lead:-2]


def _shown(elements: Any, kind: Any, quote: str, room: int) -> int:
    """How many of *elements* (a str or bytes, in the order they are shown) fit whole, escaped, in *room* characters."""
    if len(_body(elements, kind, quote)) == len(elements):  # nothing escaped: one character each
        return min(len(elements), room)
    used = 0
    for i in range(len(elements)):
        used += len(_body(elements[i : i + 1], kind, quote))
        if used > room:
            return i
    return len(elements)


class _Bounded:
    """repr() of a builtin container, str or bytes, made only as far as a cap needs: its head and its tail.

    It says what CPython 3.11's repr() says of list, tuple, dict, set,
    frozenset, deque, str and bytes (and of their subclasses that keep
    that repr), "[...]" for a container met inside itself included, reading
    each as repr() does (a list subclass's own __iter__ is not called, a
    set's is); every other object inside is its own repr, made once.
    """

    def __init__(self) -> None:
        self.path: set[int] = set()  # the containers being walked: one met again inside itself is "[...]"
        self.leaves: dict[int, tuple[object, str]] = {}  # with the object: its id is not reused meanwhile

    def repr(self, value: Any, cap: int) -> str:
        text, whole, _, _ = self.walk(value, cap, True)
        if whole:
            return text
        kind = _bounded_kind(value)
        if kind is str or kind is bytes:
            # The room _cut keeps, so that a text with nothing escaped is cut exactly as _cut cuts it.
            n = kind.__len__(value)
            reserve = len(marker(n + 2, "characters") if kind is str else marker(n + 3, "bytes"))
        else:
            reserve = _MARKER_ROOM
        room = max(0, cap - reserve)
        head, tail, count, unit = self.cut(value, room // 4, room - room // 4)
        return head + marker(count, unit) + tail

    def leaf(self, value: Any) -> str:
        held = self.leaves.get(id(value))
        if held is None:
            held = self.leaves[id(value)] = (value, repr(value))
        return held[1]

    def text(self, value: Any, kind: Any, budget: int, forward: bool) -> tuple[str, bool]:
        """The first or last *budget* characters of a str's or bytes' repr, and whether they are all of it."""
        n = kind.__len__(value)
        if n <= budget:  # a repr of at most 10 characters an element: small enough to make whole
            whole = kind.__repr__(value)
            return _side(whole, budget, forward), len(whole) <= budget
        quote = _quote(value, kind)
        if forward:
            prefix = quote if kind is str else "b" + quote
            return (prefix + _body(kind.__getitem__(value, slice(0, budget)), kind, quote))[:budget], False
        text = _body(kind.__getitem__(value, slice(n - budget, n)), kind, quote) + quote
        return text[len(text) - budget :], False

    def shape(self, value: Any, kind: Any) -> str | tuple[str, str, int, Callable[[bool, int], Iterator[tuple]]]:
        """A container's repr as repr() makes it: a text of its own, or (open, close, length, items).

        ``items(forward, budget)`` gives its items from the first or from
        the last, each a tuple of what is shown of it (the item; a dict's key
        and value, shown with ": " between). From the last, a set is read
        whole (only the last few kept, enough for *budget* characters): it
        has no other way to its end.
        """
        cls = type(value)
        if kind is set or kind is frozenset:
            if id(value) in self.path:
                return f"{cls.__name__}(...)"
            n = kind.__len__(value)
            if not n:
                return f"{cls.__name__}()"
            open_, close = ("{", "}") if cls is set else (f"{cls.__name__}({{", "})")
        elif id(value) in self.path:
            return "{...}" if kind is dict else "(...)" if kind is tuple else "[...]"
        elif kind is deque:
            n = deque.__len__(value)
            maxlen = deque.maxlen.__get__(value, deque)
            open_, close = f"{cls.__name__}([", "])" if maxlen is None else f"], maxlen={maxlen})"
        else:
            n = kind.__len__(value)
            open_, close = {list: ("[", "]"), tuple: ("(", ",)" if n == 1 else ")"), dict: ("{", "}")}[kind]

        def items(forward: bool, budget: int) -> Iterator[tuple]:
            if kind is dict:
                view = dict.items(value)
                yield from view if forward else reversed(view)
                return
            if forward:
                members = kind.__iter__(value)
            elif kind is tuple:
                members = (tuple.__getitem__(value, i) for i in range(n - 1, -1, -1))
            elif kind is list or kind is deque:
                members = kind.__reversed__(value)
            else:
                members = reversed(deque(kind.__iter__(value), maxlen=budget // 3 + 2))
            for member in members:
                yield (member,)

        return open_, close, n, items

    def walk(self, value: Any, budget: int, forward: bool) -> tuple[str, bool, int, tuple | None]:
        """The first (*forward*) or last *budget* characters of repr(*value*): (text, whole, items, stop).

        *whole*: the text is all of the repr. For a container, *items* is
        how many of its items the text shows whole, and *stop*, when the
        text ends inside one of them, (its index, the part of it, that
        part, the characters before that part's in the text).
        """
        kind = _bounded_kind(value)
        if kind is None:
            text = self.leaf(value)
            return _side(text, budget, forward), len(text) <= budget, 0, None
        if kind is str or kind is bytes:
            return *self.text(value, kind, budget, forward), 0, None
        shape = self.shape(value, kind)
        if isinstance(shape, str):
            return _side(shape, budget, forward), len(shape) <= budget, 0, None
        open_, close, n, items = shape
        pieces: list[str] = []
        room = budget
        whole_items = 0

        def put(literal: str) -> bool:
            nonlocal room
            piece = _side(literal, room, forward)
            pieces.append(piece)
            room -= len(piece)
            return len(piece) == len(literal)

        def done(whole: bool, stop: tuple | None = None) -> tuple[str, bool, int, tuple | None]:
            return "".join(pieces if forward else reversed(pieces)), whole, whole_items, stop

        self.path.add(id(value))
        try:
            if not put(open_ if forward else close):
                return done(False)
            for k, parts in enumerate(items(forward, budget)):
                if k and not put(", "):
                    return done(False)
                index = k if forward else n - 1 - k
                for p in range(len(parts)) if forward else range(len(parts) - 1, -1, -1):
                    if p != (0 if forward else len(parts) - 1) and not put(": "):
                        return done(False)
                    before = budget - room
                    text, whole, _, _ = self.walk(parts[p], room, forward)
                    pieces.append(text)
                    room -= len(text)
                    if not whole:
                        return done(False, (index, p, parts[p], before))
                whole_items += 1
            return done(put(close if forward else open_))
        finally:
            self.path.discard(id(value))

    def cut(self, value: Any, head: int, tail: int) -> tuple[str, str, int, str]:
        """The first *head* and last *tail* characters of a repr longer than both, and what is between: (count, unit).

        What is between is counted in the value's own terms: characters of a
        str (or of any other repr, made whole), bytes of a bytes, items of a
        container; in the innermost value that holds all of it.
        """
        kind = _bounded_kind(value)
        shape = self.shape(value, kind) if kind is not None and kind not in (str, bytes) else None
        if kind is None or isinstance(shape, str):
            text = self.leaf(value) if kind is None else str(shape)
            return text[:head], text[len(text) - tail :], len(text) - head - tail, "characters"
        if kind is str or kind is bytes:
            n = kind.__len__(value)
            quote = _quote(value, kind)
            first = max(0, head - (1 if kind is str else 2))  # after the opening quote (and b)
            last = max(0, tail - 1)  # before the closing quote
            shown = _shown(kind.__getitem__(value, slice(0, first)), kind, quote, first)
            shown += _shown(kind.__getitem__(value, slice(max(0, n - last), n))[::-1], kind, quote, last)
            unit = "characters" if kind is str else "bytes"
            return self.text(value, kind, head, True)[0], self.text(value, kind, tail, False)[0], n - shown, unit
        head_text, _, head_items, head_stop = self.walk(value, head, True)
        tail_text, _, tail_items, tail_stop = self.walk(value, tail, False)
        if head_stop is not None and tail_stop is not None and head_stop[:2] == tail_stop[:2]:
            # Both ends fall inside the same item: what is cut is inside it, and counted there.
            self.path.add(id(value))
            try:
                _, _, count, unit = self.cut(head_stop[2], head - head_stop[3], tail - tail_stop[3])
            finally:
                self.path.discard(id(value))
            return head_text, tail_text, count, unit
        assert shape is not None and not isinstance(shape, str)
        return head_text, tail_text, shape[2] - head_items - tail_items, "items"
