"""Untrusted names (comm, device names, anything a trace file says) never reach a terminal or
a spreadsheet raw. FUZZ_EXAMPLES sets the number of examples (the long run used 100,000)."""
import os
import unicodedata

from hypothesis import HealthCheck, example, given, settings, strategies as st

from routetrace.sanitize import CSV_FORMULA_PREFIXES, csv_cell, kernel_string, text

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ATTACK = "=1+\x1b]2;pwn\x07\x1b[2J"


def raw_controls(s: str) -> list[str]:
    """Every character a terminal or a bidi-aware viewer would act on."""
    bad = []
    for ch in s:
        cp = ord(ch)
        if cp < 0x20 or 0x7F <= cp < 0xA0:
            bad.append(ch)
        elif cp >= 0xA0 and unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            bad.append(ch)
    return bad


def assert_safe(out: str) -> None:
    assert not raw_controls(out), [hex(ord(c)) for c in raw_controls(out)]
    encoded = out.encode("utf-8")                  # lone surrogates would raise here
    assert not any(b < 0x20 or b == 0x7F for b in encoded)


# comm is 16 bytes (15 + NUL), an interface name 16 bytes (IFNAMSIZ); fuzz a bit past both.
kernel_bytes = st.binary(min_size=0, max_size=40)
# Bytes biased towards the interesting ones: C0, DEL, C1 as UTF-8, bidi overrides, invalid UTF-8.
TRICKY = [b"\x1b", b"\x07", b"\x9b", b"\x7f", b"\r", b"\n", b"\t", b"\x00", b"=", b"+", b"-", b"@",
          "\u202e".encode(), "\u2066".encode(), "\u200b".encode(), "\u0085".encode(), "\u009b".encode(),
          "\u2028".encode(), "\ufeff".encode(), b"\xc2", b"\xe2\x80", b"\xff", b"\xed\xa0\x80"]
tricky_bytes = st.lists(st.one_of(st.sampled_from(TRICKY), st.binary(max_size=3)), max_size=12).map(b"".join)


@FUZZ
@given(raw=st.one_of(kernel_bytes, tricky_bytes))
@example(raw=ATTACK.encode())
@example(raw=b"e\x1bx")
@example(raw="\u202egnp.exe".encode())
def test_kernel_names_come_out_without_a_raw_control_byte(raw):
    name = kernel_string(raw + b"\0garbage after the NUL")
    assert "garbage" not in name or b"garbage" in raw
    for out in (text(name), csv_cell(name)):
        assert_safe(out)
    cell = csv_cell(name)
    assert not cell.startswith(CSV_FORMULA_PREFIXES)


@FUZZ
@given(s=st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=30))
@example(s=ATTACK)
@example(s="\ud800 lone surrogate")
@example(s="\u2067bidi\u2069\u200e\u061c")
def test_any_unicode_string_comes_out_safe(s):
    assert_safe(text(s))
    cell = csv_cell(s)
    assert_safe(cell)
    assert not cell.startswith(CSV_FORMULA_PREFIXES)


@FUZZ
@given(s=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20))
def test_printable_ascii_is_left_alone(s):
    assert text(s) == s
    assert csv_cell(s) == (("'" + s) if s.startswith(CSV_FORMULA_PREFIXES) else s)


def test_the_reported_attack_is_shown_escaped():
    assert text(ATTACK) == "=1+\\x1b]2;pwn\\x07\\x1b[2J"
    assert csv_cell(ATTACK) == "'=1+\\x1b]2;pwn\\x07\\x1b[2J"


def test_every_formula_prefix_is_neutralised_and_numbers_stay_numbers():
    for prefix in CSV_FORMULA_PREFIXES:
        cell = csv_cell(prefix + "SUM(A1:A9)")
        assert not cell.startswith(CSV_FORMULA_PREFIXES) and not raw_controls(cell)
        assert cell.startswith("'") or cell.startswith("\\x")      # quoted, or the control escaped
    assert csv_cell(-5) == -5 and csv_cell(None) is None and csv_cell("lo") == "lo"
    assert csv_cell("=HYPERLINK(\"x\")") == "'=HYPERLINK(\"x\")"


def test_invalid_utf8_keeps_every_byte_visible():
    assert text(kernel_string(b"a\xffb\x1b")) == "a\\xffb\\x1b"
