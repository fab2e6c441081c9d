"""mkdocs hook: renders the ``cmd`` command line's reference from the typer app at build time.

A page holding the line ``<!-- cli-reference -->`` gets, in its place, one section per command:
its help text, its usage line and a table of its arguments and options, all read from
``typer.main.get_command(cmdtool.cli.app)``. So the reference cannot drift from ``cmd --help``.
"""

from __future__ import annotations

import html

MARKER = "<!-- cli-reference -->"


def _text(text: str) -> str:
    """Help text as Markdown: code spans kept, ``<`` and ``>`` outside them escaped (``checkpoint-<step>/``
    would otherwise be read as an HTML tag)."""
    parts = str(text).split("`")
    for i in range(0, len(parts), 2):
        parts[i] = html.escape(parts[i], quote=False)
    return "`".join(parts)


def _cell(text: str) -> str:
    """One table cell: one line, and the characters a table or emphasis would take escaped."""
    parts = " ".join(str(text).split()).split("`")
    for i in range(0, len(parts), 2):  # outside code spans
        parts[i] = html.escape(parts[i], quote=False)
        for char in "|*_":
            parts[i] = parts[i].replace(char, "\\" + char)
    return "`".join(parts)


def _code(text: str) -> str:
    """Option names and metavars as inline code inside a table (``M|auto`` must not split the row)."""
    return "<code>" + html.escape(text, quote=False).replace("|", "&#124;") + "</code>"


def _command_section(name: str, command, parent) -> str:
    ctx = command.context_class(command, info_name=name, parent=parent)
    usage = " ".join(command.collect_usage_pieces(ctx))
    lines = [f"## `cmd {name}`", "", _text((command.help or "").strip()), "", "```text",
             f"cmd {name} {usage}".rstrip(), "```", "",
             "| argument or option | meaning |", "| --- | --- |"]
    for param in command.params:
        if getattr(param, "hidden", False):
            continue
        record = param.get_help_record(ctx)
        if record is None:  # an argument without help text
            record = (param.human_readable_name, "")
        names, help_text = record
        lines.append(f"| {_code(names)} | {_cell(help_text)} |")
    lines.append("| `--help` | Show the command's help and exit. |")
    return "\n".join(lines) + "\n"


def render() -> str:
    """The whole reference as Markdown: the program's help, then one section per command."""
    import typer.main

    from cmdtool.cli import app

    group = typer.main.get_command(app)
    root = group.context_class(group, info_name="cmd")
    parts = [_text((group.help or "").strip()), ""]
    for name in group.list_commands(root):
        parts.append(_command_section(name, group.get_command(root, name), root))
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - mkdocs' hook signature
    if MARKER in markdown:
        return markdown.replace(MARKER, render())
    return markdown
