"""Untrusted strings on their way out. Process names and device names are chosen by whoever runs
a process or owns a namespace, and routetrace prints them as root: every text boundary passes
them through `text()` so no terminal control sequence, bidi override or invisible character
reaches a screen raw. JSON needs no help (json.dumps escapes controls and, with the default
ensure_ascii, every non-ASCII character); CSV cells also pass through `csv_cell()`.
"""
from __future__ import annotations

import functools
import unicodedata

# OWASP "CSV injection": a cell starting with one of these is a formula to a spreadsheet.
CSV_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def _escape_char(ch: str) -> str:
    cp = ord(ch)
    if cp < 0x100:
        return f"\\x{cp:02x}"
    if cp < 0x10000:
        return f"\\u{cp:04x}"
    return f"\\U{cp:08x}"


def _unsafe(ch: str) -> bool:
    cp = ord(ch)
    if cp < 0x20 or 0x7F <= cp < 0xA0:          # C0, DEL, C1
        return True
    if cp < 0x7F:
        return False
    # Cc control, Cf format (bidi overrides, zero-width), Cs surrogates, Co private use,
    # Cn unassigned, Zl/Zp line and paragraph separators.
    return unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def text(value) -> str:
    """`value` as printable text: every control, format or invisible character is shown as an
    escape (`\\x1b`, `\\u202e`), never raw."""
    s = value if isinstance(value, str) else str(value)
    if s.isascii() and s.isprintable():
        return s                                   # the common case, without a per-char loop
    out = []
    for ch in s:
        if _unsafe(ch):
            out.append(_escape_char(ch))
        else:
            out.append(ch)
    return "".join(out)


@functools.lru_cache(maxsize=4096)
def kernel_string(raw: bytes) -> str:
    """A NUL-terminated kernel char array (comm, ifname) as text that keeps every byte: valid
    UTF-8 stays readable, any other byte becomes the text \\xNN; `text()` at output does the rest.
    Cached: a storm repeats the same few names hundreds of thousands of times."""
    return raw.partition(b"\0")[0].decode("utf-8", "backslashreplace")


def csv_cell(value):
    """A CSV cell a spreadsheet shows as text: escaped like `text()`, and a leading formula
    character neutralised with a single quote, as OWASP recommends."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    s = text(value)
    if s.startswith(CSV_FORMULA_PREFIXES):
        s = "'" + s
    return s
