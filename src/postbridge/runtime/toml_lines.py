"""Line numbers for a TOML document: where each table header and each key is, since ``tomllib`` keeps none.

:class:`TomlLines` scans the text once and maps *paths* to the line they start on. A path is the chain of keys
from the root, with the index of an array-of-tables element where the document has one: the 2nd ``[[flow]]``
is ``("flow", 1)``, a ``[flow.sender]`` that follows it is ``("flow", 1, "sender")``, and its ``folder = ...``
is ``("flow", 1, "sender", "folder")``. :meth:`TomlLines.line` falls back to the nearest enclosing path that
has a line, so a missing key points at its table's header.

This module only locates; it must not parse values or judge a document (``tomllib`` does that, and this scanner
expects text that ``tomllib`` accepted: on anything else it returns fewer lines, never raises).
"""

from __future__ import annotations

import tomllib

PathPart = str | int
TomlPath = tuple[PathPart, ...]

_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class TomlLines:
    """Where each table header and key of one TOML text starts (1-based line numbers)."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._lines: dict[TomlPath, int] = {}
        self._arrays: dict[TomlPath, int] = {}  # array-of-tables path -> elements seen so far
        self._scan()

    def line(self, *path: PathPart) -> int | None:
        """The line of ``path``, else of its nearest enclosing table or key that has one; None if none has."""
        for end in range(len(path), 0, -1):
            found = self._lines.get(path[:end])
            if found is not None:
                return found
        return None

    def exact(self, *path: PathPart) -> int | None:
        """The line of ``path`` itself, without falling back to an enclosing table."""
        return self._lines.get(path)

    # -- scanning ------------------------------------------------------------------------------------------------

    def _scan(self) -> None:
        text = self._text
        pos, line, depth = 0, 1, 0
        current: TomlPath = ()
        expect_key = True  # at the start of a logical line: a header or a key comes next
        while pos < len(text):
            char = text[pos]
            if char == "\n":
                line += 1
                pos += 1
                expect_key = expect_key or depth == 0
                continue
            if char in " \t\r":
                pos += 1
                continue
            if char == "#":
                end = text.find("\n", pos)
                pos = len(text) if end < 0 else end
                continue
            if expect_key:
                expect_key = False
                if char == "[":
                    current, pos = self._header(pos, line)
                    continue
                parts, after = self._key(pos)
                if parts:
                    for end in range(1, len(parts) + 1):
                        self._lines.setdefault(current + parts[:end], line)
                    pos = after
                    continue
            if char in "\"'":
                pos, line = self._skip_string(pos, line)
                continue
            if char in "[{":
                depth += 1
            elif char in "]}":
                depth = max(0, depth - 1)
            pos += 1

    def _header(self, pos: int, line: int) -> tuple[TomlPath, int]:
        """``[a.b]`` or ``[[a.b]]`` at ``pos``: record it and return the table's path and the position after it."""
        is_array = self._text.startswith("[[", pos)
        parts, pos = self._key(pos + (2 if is_array else 1))
        pos = self._skip_blanks(pos)
        pos += 2 if is_array else 1  # the closing bracket(s)
        if not parts:
            return (), pos
        path: TomlPath = ()
        for part in parts[:-1]:
            path += (part,)
            if path in self._arrays:  # [flow.sender] belongs to the latest [[flow]]
                path += (self._arrays[path] - 1,)
        path += (parts[-1],)
        if is_array:
            count = self._arrays.get(path, 0)
            self._arrays[path] = count + 1
            path += (count,)
        self._lines.setdefault(path, line)
        return path, pos

    def _key(self, pos: int) -> tuple[TomlPath, int]:
        """A dotted key (bare or quoted parts) at ``pos``; returns its parts and the position after it."""
        text = self._text
        parts: list[str] = []
        while True:
            pos = self._skip_blanks(pos)
            if pos >= len(text):
                break
            if text[pos] in "\"'":
                end, _ = self._skip_string(pos, 0)
                raw = text[pos:end]
                try:
                    parts.append(str(tomllib.loads(f"k = {raw}")["k"]))
                except tomllib.TOMLDecodeError:
                    break
                pos = end
            else:
                start = pos
                while pos < len(text) and text[pos] in _BARE_KEY:
                    pos += 1
                if pos == start:
                    break
                parts.append(text[start:pos])
            pos = self._skip_blanks(pos)
            if pos < len(text) and text[pos] == ".":
                pos += 1
                continue
            break
        return tuple(parts), pos

    def _skip_blanks(self, pos: int) -> int:
        while pos < len(self._text) and self._text[pos] in " \t":
            pos += 1
        return pos

    def _skip_string(self, pos: int, line: int) -> tuple[int, int]:
        """Past the string starting at ``pos`` (basic, literal, or either multi-line form), counting newlines."""
        text = self._text
        quote = text[pos]
        multi = text.startswith(quote * 3, pos)
        pos += 3 if multi else 1
        while pos < len(text):
            char = text[pos]
            if char == "\n":
                if not multi:
                    return pos, line  # unterminated: tomllib would have refused it
                line += 1
            elif char == "\\" and quote == '"':
                if text[pos + 1 : pos + 2] == "\n":
                    line += 1
                pos += 2
                continue
            elif char == quote and (not multi or text.startswith(quote * 3, pos)):
                if not multi:
                    return pos + 1, line
                pos += 3
                while pos < len(text) and text[pos] == quote:  # """a"""" ends with a quote in the content
                    pos += 1
                return pos, line
            pos += 1
        return pos, line
