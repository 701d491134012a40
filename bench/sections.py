"""Replacing one generated section of ``docs/performance.md`` between its two HTML comment markers.

Every benchmark owns one section; a run replaces only the text between its markers and leaves the rest of the page
(other benchmarks' sections, hand-written notes) as it is.
"""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, section: str, *, begin: str, end: str, new_page: str, appended: str) -> None:
    """Put ``section`` between ``begin`` and ``end`` in ``path``. A missing file starts as ``new_page``; a page
    without the markers gets ``appended`` (which holds them) at its end first. Raises OSError."""
    text = path.read_text() if path.exists() else new_page
    if begin not in text or end not in text:
        text = text.rstrip() + appended
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}{begin}\n{section}{end}{tail}")
