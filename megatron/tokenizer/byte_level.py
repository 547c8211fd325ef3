"""GPT-2's byte-level layer: the byte <-> symbol table and the pre-tokenisation regex.

GPT-2 runs BPE over UTF-8 bytes, each shown as one printable unicode "symbol" (so the vocab
json is text), after splitting the input with one regex. Both are defined here once; the
compiled engine and the exact Python paths share them.
"""

from __future__ import annotations

import regex

# The pattern of OpenAI's encoder.py, evaluated with the `regex` module as GPT-2 does.
GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
_SPLIT_RE = regex.compile(GPT2_SPLIT_PATTERN)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> symbol table.

    Printable Latin-1 bytes are their own symbol; the remaining 68 (controls, space, NBSP,
    soft hyphen) become chr(256), chr(257), ... in byte order, so no symbol is whitespace.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    table: dict[int, str] = {}
    next_free = 256
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(next_free)
            next_free += 1
    return table


BYTE_TO_SYMBOL = bytes_to_unicode()
SYMBOL_TO_BYTE = {symbol: byte for byte, symbol in BYTE_TO_SYMBOL.items()}
# Maps a bytes object viewed as Latin-1 text to GPT-2 symbols in one C-level pass.
_LATIN1_TO_SYMBOL = str.maketrans({chr(b): s for b, s in BYTE_TO_SYMBOL.items()})


def to_symbols(piece: str) -> str:
    """The GPT-2 symbol string of `piece` (its UTF-8 bytes, one symbol each)."""
    return piece.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_SYMBOL)


def symbols_to_bytes(symbols: str) -> bytes:
    """Inverse of `to_symbols` for one vocab entry; KeyError on a non-symbol character."""
    return bytes(SYMBOL_TO_BYTE[c] for c in symbols)


def split_pieces(text: str) -> list[str]:
    """GPT-2 pre-tokenisation of `text` with the `regex` module (pieces of the raw text)."""
    return _SPLIT_RE.findall(text)


def split_words(text: str) -> list[str]:
    """GPT-2 pre-tokenisation of `text` as symbol strings, the words BPE merges."""
    return [to_symbols(piece) for piece in _SPLIT_RE.findall(text)]
