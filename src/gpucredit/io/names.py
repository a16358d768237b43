"""Names are data: a loan id, borrower, generation, launch or stress name, or a file path is
shown as written, never read as markup, mathtext or a terminal control sequence.

One helper per medium, used wherever a name is printed:
- `terminal`: plain text for a terminal (print, click.echo, error messages);
- `rich_text`: a rich Text for tables and console.print (never parsed as markup);
- `mathtext`: matplotlib labels and titles;
- `html`: text inside report.html.

Each starts from `terminal`, which shows control characters as Python escapes: an ESC
(ANSI colours, OSC hyperlinks and window titles), a carriage return or backspace that would
overwrite what was printed, bidi overrides that reorder it, line separators, and the lone
surrogates Python makes of a file name's undecodable bytes (which cannot be printed at all).
"""

from __future__ import annotations

import html as _html
import unicodedata

from rich.text import Text

__all__ = ["html", "mathtext", "rich_text", "terminal"]

# Cc: C0, DEL and C1 controls; Cf: format characters (bidi overrides, zero-width ones);
# Cs: lone surrogates; Zl, Zp: the line and paragraph separators.
_HIDDEN = frozenset(("Cc", "Cf", "Cs", "Zl", "Zp"))


def _visible(character: str) -> str:
    if unicodedata.category(character) not in _HIDDEN:
        return character
    code = ord(character)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal(text: object, keep_newlines: bool = False) -> str:
    """`text` with every control character shown as an escape (ESC as \\x1b, U+202E as
    \\u202e); `keep_newlines` keeps "\\n" for a message of several lines."""
    text = str(text)
    if keep_newlines:
        return "\n".join(terminal(line) for line in text.split("\n"))
    return "".join(_visible(c) for c in text)


def rich_text(text: object) -> Text:
    """`terminal(text)` as a rich Text: printed as written, never read as markup ("[/]",
    "[us]") or an emoji code (":smile:"). A Text, not escaped markup: rich's escape of a
    trailing backslash depends on what follows it."""
    return Text(terminal(text))


def mathtext(text: object) -> str:
    """`terminal(text)` for a matplotlib label: every "$" escaped, so "$\\cmd$" is not
    parsed as mathtext (with text.usetex off, as the report sets)."""
    return terminal(text).replace("$", r"\$")


def html(text: object) -> str:
    """`terminal(text)` escaped for HTML text and attribute values."""
    return _html.escape(terminal(text), quote=True)
