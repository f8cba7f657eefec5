"""Text from the user's data (file names, class names, ids) made safe for where cdmix writes it.

Three readers interpret text instead of showing it:

- a terminal runs control sequences (``ESC]0;...`` retitles the window, ``ESC[31m`` recolours):
  ``printable`` shows control characters as escapes (``\\x1b``) instead;
- a spreadsheet runs a cell beginning with ``=``, ``+``, ``-``, ``@``, tab or carriage return as a
  formula (CSV injection): ``neutralise_cell`` prefixes such a cell with a single quote, as the OWASP
  guidance says, and ``restore_cell`` gives the original back to cdmix's own readers;
  ``neutralise_path`` writes a relative path that begins with one of them as ``./path``, the same
  file for every reader, so no reader needs to undo it;
- an HTML page ends a ``<script>`` block at ``</script`` and changes how it parses at ``<!--``:
  ``json_for_html`` escapes ``<``, ``>`` and ``&`` inside embedded JSON as ``\\u003c`` ... (the same
  value for ``JSON.parse``).
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["FORMULA_START", "json_for_html", "neutralise_cell", "neutralise_path", "printable", "restore_cell"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# OWASP "CSV Injection": cells beginning with these are formulas in Excel, LibreOffice and Sheets.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_QUOTE = "'"
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")  # "-1", "+0.5": a number, not a formula


def printable(text: Any, keep: str = "") -> str:
    """``str(text)`` with every control character (C0, DEL, C1) but those in ``keep`` written as its
    Python escape (``\\x1b``, ``\\n``, ``\\t``): safe to print on a terminal, and one line."""
    return _CONTROL.sub(lambda m: m.group() if m.group() in keep else repr(m.group())[1:-1], str(text))


def neutralise_cell(text: str) -> str:
    """A CSV cell a spreadsheet shows as text: ``'`` + text when text begins with a formula character
    (``FORMULA_START``) or with ``'`` itself (so ``restore_cell`` can always undo it); a plain number
    such as ``-1`` is left as it is."""
    text = str(text)
    if text.startswith(FORMULA_START + (_QUOTE,)) and not _NUMBER.fullmatch(text):
        return _QUOTE + text
    return text


def restore_cell(text: str) -> str:
    """The value ``neutralise_cell`` was given: its leading ``'`` removed where it added one; any
    other text (a hand-written ``'tis``) is returned as it is."""
    text = str(text)
    if text.startswith(_QUOTE) and neutralise_cell(text[1:]) == text:
        return text[1:]
    return text


def neutralise_path(path: str) -> str:
    """A relative path a spreadsheet shows as text and every reader opens as the same file: ``./path``
    when it begins with a formula character, else unchanged (absolute paths never do)."""
    path = str(path)
    return "./" + path if path.startswith(FORMULA_START) else path


def json_for_html(value: Any) -> str:
    """``json.dumps(value)`` safe inside ``<script type="application/json">``: ``<``, ``>`` and ``&`` as
    ``\\u003c`` escapes (non-ASCII ones too, as json's default), so no text of the data can close the
    block or open an HTML comment; ``JSON.parse`` gives the same value back."""
    text = json.dumps(value)
    for char in "<>&":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text
