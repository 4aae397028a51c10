"""``mctool docs``: the documentation, readable offline. Help texts and messages name its pages as
``docs/NAME.md#section``; this module finds such a page (or one section of it) in the ``docs/`` folder of a
source checkout, or in ``mctool/docs/``, where the wheel installs the same files."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .results import DocsResult, Document
from .calls import library_call

#: A heading outside fenced code (indented by at most 3 spaces): its level and text; a closing run of #s
#: follows a space ("# C#" is the heading "C#").
_HEADING = re.compile(r" {0,3}(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
#: A code fence (indented by at most 3 spaces): its run of backticks or tildes, then its info string.
_FENCE = re.compile(r"( {0,3})(`{3,}|~{3,})(.*)$")
#: An explicit anchor line, ``<a id="bn"></a>``, naming the heading after it.
_ANCHOR = re.compile(r'<a\s+id="([^"]+)"\s*>\s*</a>\s*')
#: A topic as help texts write it: ``method``, ``method.md``, ``docs/method.md#bn``.
_TOPIC = re.compile(r"(?:\./)?(?:docs/)?([a-z0-9][a-z0-9-]*)(?:\.md)?(?:#(.+))?")
_NONE = {"train": None, "eval": None}  # (docs computes no metrics)


def docs_folder() -> Path:
    """The folder of the documentation pages: ``mctool/docs/`` of an installed wheel, else ``docs/`` of the
    source checkout this package runs from."""
    package = Path(__file__).resolve().parent
    for folder in (package / "docs", package.parent / "docs"):
        if (folder / "cli.md").is_file() and (folder / "method.md").is_file():
            return folder
    raise ConfigError("the documentation is not installed with this copy of mctool (no docs/ folder beside the "
                      "package); read the docs/ folder of mctool's source distribution.")


def _title(text: str, name: str) -> str:
    for _, heading in _headings(text):
        return heading[1]
    return name


def _headings(text: str) -> list[tuple[int, tuple[int, str, list[str]]]]:
    """The headings outside fenced code: (line index, (level, text, anchors)); the anchors are the heading's
    slug (as GitHub makes it) and the ``<a id>`` lines just before it."""
    found, fence, pending, seen = [], None, [], {}
    for i, line in enumerate(text.splitlines()):
        stripped = line.strip()
        f = _FENCE.fullmatch(line)
        if fence is not None:  # (closed by a run of the same character, as long or longer, and nothing after it)
            if f and f.group(2)[0] == fence[0] and len(f.group(2)) >= len(fence) and not f.group(3).strip():
                fence = None
            continue
        if f and not (f.group(2)[0] == "`" and "`" in f.group(3)):
            fence, pending = f.group(2), []
            continue
        anchor = _ANCHOR.fullmatch(stripped)
        if anchor:
            pending.append(anchor.group(1))
            continue
        m = _HEADING.fullmatch(line)
        if m:
            # GitHub's anchor; a heading with the same text as an earlier one gets -1, -2, ... appended
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.append((i, (len(m.group(1)), m.group(2), [*pending, f"{base}-{n}" if n else base])))
        if stripped:
            pending = []
    return found


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def section(text: str, anchor: str, name: str) -> str:
    """The part of a page from the heading that ``anchor`` names to the next heading of the same or a higher
    level."""
    heads = _headings(text)
    for k, (start, (level, _, anchors)) in enumerate(heads):
        if anchor in anchors:
            end = next((i for i, (lv, _, _) in heads[k + 1:] if lv <= level), None)
            return "\n".join(text.splitlines()[start:end]).rstrip() + "\n"
    known = [a[0] for _, (_, _, a) in heads[1:]]
    shown = ", ".join(known[:40]) + (", ..." if len(known) > 40 else "")
    raise ConfigError(f"no section '{anchor}' in {name}.md; its sections: {shown}.")


def documents(folder: Path | None = None) -> list[Document]:
    """Every page, sorted by name, with its title (its first heading)."""
    folder = docs_folder() if folder is None else folder
    return [Document(p.stem, _title(p.read_text(encoding="utf-8"), p.stem), str(p))
            for p in sorted(folder.glob("*.md"))]


@library_call
def read_docs(topic: str | None = None) -> DocsResult:
    """The list of pages (``topic`` None), or one page or section: ``topic`` as help texts name them
    (``method``, ``method.md#bn``, ``docs/method.md#bn``); ``text`` is its Markdown."""
    t0 = time.time()
    pages = documents()
    if topic is None:
        return DocsResult(command="docs", documents=pages, metrics=_NONE, seconds=time.time() - t0)
    if not isinstance(topic, str):
        raise ConfigError(f"read_docs() takes a page or section name (a str, e.g. 'method.md#bn') or None, got "
                          f"{topic!r}"[:200] + ".")
    m = _TOPIC.fullmatch(topic.strip().lower())  # (pages and anchors are lower case: Method.md#BN finds them)
    page = next((p for p in pages if m is not None and p.name == m.group(1)), None)
    if page is None:
        names = ", ".join(p.name for p in pages)
        raise ConfigError(f"no page '{topic}' in the documentation; the pages: {names}.")
    text = Path(page.path).read_text(encoding="utf-8")
    anchor = m.group(2)
    if anchor is not None:
        text = section(text, anchor, page.name)
    return DocsResult(command="docs", documents=[page], section=anchor, text=text, metrics=_NONE,
                      seconds=time.time() - t0)


def for_terminal(markdown: str) -> str:
    """The Markdown without the ``<a id>`` anchor lines, which a terminal would show as they are."""
    return "\n".join(line for line in markdown.splitlines() if not _ANCHOR.fullmatch(line.strip())) + "\n"


def terminal_markdown(markdown: str) -> Any:
    """A Rich ``Markdown`` of the page for a terminal (``for_terminal``), whose table cells fold a word too long
    for its column onto the next lines: Rich cut it with an ellipsis, and the docs' tables hold long option
    values, file names and anchors that a reader needs whole."""
    from rich.markdown import Markdown
    from rich.text import Text

    cell = Markdown.elements.get("td_open")  # (Rich >= 13.2; older ones draw no tables)
    if cell is None:
        return Markdown(for_terminal(markdown))

    class FoldingCell(cell):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if isinstance(getattr(self, "content", None), Text):
                self.content.overflow = "fold"

    class FoldingMarkdown(Markdown):
        elements = {**Markdown.elements, "td_open": FoldingCell, "th_open": FoldingCell}

    return FoldingMarkdown(for_terminal(markdown))
