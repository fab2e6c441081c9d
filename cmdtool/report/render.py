"""The report as a list of blocks, rendered to GitHub-flavoured Markdown or to one self-contained
HTML page (styles inline, images embedded as data URIs: no external reference)."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import NamedTuple, Sequence, Union


class Heading(NamedTuple):
    level: int
    text: str


class Paragraph(NamedTuple):
    text: str  # may hold `code` and **bold**


class Table(NamedTuple):
    headers: Sequence[str]
    rows: Sequence[Sequence[str]]
    numeric: Sequence[bool] = ()  # right-align these columns


class Image(NamedTuple):
    file: str  # relative to the report folder
    alt: str


Block = Union[Heading, Paragraph, Table, Image]


# Markdown's active punctuation: emphasis, code, links and images, HTML, strikethrough, entities (``|``
# matters in tables only, where ``_md_cell`` escapes it; ``_`` inside a word emphasises nothing)
_MARKDOWN_ACTIVE = re.compile(r"([\\`*\[\]<>!~&]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z]))")


def text(stored: object) -> str:
    """A stored string (a checkpoint or tensor name, a path, a mode file's settings) as literal text
    of a block: control characters escaped (``console.shown``) and Markdown's active characters
    backslash-escaped, so that neither ``<script>`` nor ``![x](http://…)`` becomes markup in
    report.md; ``to_html`` renders the escapes as the characters."""
    from ..console import shown
    return _MARKDOWN_ACTIVE.sub(r"\\\1", shown(stored))


def code(stored: object) -> str:
    """A stored string as a code span (nothing in it is markup, in Markdown and in ``to_html``):
    control characters escaped, a backtick, which would end the span, written as ``'``."""
    from ..console import shown
    return "`" + shown(stored).replace("`", "'") + "`"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block]) -> str:
    out = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            out.append(block.text)
        elif isinstance(block, Table):
            numeric = list(block.numeric) + [False] * (len(block.headers) - len(block.numeric))
            out.append("\n".join([
                "| " + " | ".join(_md_cell(h) for h in block.headers) + " |",
                "| " + " | ".join("---:" if n else "---" for n in numeric) + " |",
                *("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows)]))
        elif isinstance(block, Image):
            out.append(f"![{block.alt}]({block.file})")
    return "\n\n".join(out) + "\n"


_INLINE = re.compile(r"\\([!-/:-@\[-`{-~])|`([^`]+)`|\*\*((?:\\.|[^*\\])+)\*\*")


def _inline_html(markdown: str) -> str:
    """The inline Markdown of the blocks as HTML: backslash escapes (``text``), `code` and **bold**;
    everything else is text, HTML-escaped."""
    out, last = [], 0
    for match in _INLINE.finditer(markdown):
        out.append(html.escape(markdown[last:match.start()], quote=False))
        escaped, code_span, bold = match.groups()
        if escaped is not None:
            out.append(html.escape(escaped, quote=False))
        elif code_span is not None:
            out.append(f"<code>{html.escape(code_span, quote=False)}</code>")
        else:
            out.append(f"<strong>{_inline_html(bold)}</strong>")
        last = match.end()
    out.append(html.escape(markdown[last:], quote=False))
    return "".join(out)


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 70rem; margin: 2rem auto;
       padding: 0 1rem; color: #1f2328; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.9rem; }
th, td { border: 1px solid #d0d7de; padding: 0.25rem 0.6rem; }
th { background: #f6f8fa; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f6f8fa; padding: 0 0.2rem; border-radius: 3px; }
img { max-width: 100%; border: 1px solid #d0d7de; margin: 0.5rem 0; }
figure { margin: 0; }
figcaption { color: #59636e; font-size: 0.85rem; }
"""


def to_html(blocks: Sequence[Block], folder: Path, title: str) -> str:
    """One page; each ``Image`` is read from ``folder`` and embedded."""
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{_inline_html(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{_inline_html(block.text)}</p>")
        elif isinstance(block, Table):
            numeric = list(block.numeric) + [False] * (len(block.headers) - len(block.numeric))
            cls = [' class="n"' if n else "" for n in numeric]
            head = "".join(f"<th{c}>{_inline_html(str(h))}</th>" for h, c in zip(block.headers, cls))
            rows = "".join("<tr>" + "".join(f"<td{c}>{_inline_html(str(v))}</td>" for v, c in zip(row, cls)) + "</tr>"
                           for row in block.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(block, Image):
            data = base64.b64encode((folder / block.file).read_bytes()).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{_inline_html(block.alt)}</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
