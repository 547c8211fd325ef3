"""Test inputs for the tokenizer: adversarial strings and seeded random Unicode text.

The random generator mixes many character classes (letters of several scripts, digits,
whitespace of every kind, contractions, emoji sequences, combining marks, controls, unassigned
and private-use code points) so that every branch of GPT-2's split regex and many byte-level
BPE paths are hit.
"""

from __future__ import annotations

import random

ADVERSARIAL = [
    "",
    " ",
    "a",
    "Hello world",
    " Hello  world ",
    "don't we'll they're I've I'm he'd it's",
    "DON'T WE'LL THEY'RE I'VE I'M HE'D IT'S 'S 'T",  # uppercase: not contractions in GPT-2
    "'s's's '''s 'sss 'll've 're'd",
    "12345 3.14159 1,000,000 ½ ² ٣٤ १२३ 〇",
    "a  b   c    d\t\te\n\nf \n g \t\n h",
    "trailing spaces   ",
    "   leading spaces",
    "\r\n\r\n line\r\nbreaks \r",
    "\t\t\t",
    "\n",
    " \n ",
    "\u00a0nbsp\u00a0\u00a0x \u2003em\u3000ideographic\u2028ls\u2029ps\x85nel\x0b\x0c",
    "\x1c\x1d\x1e\x1f info separators",
    "\x00NUL\x00\x00 \x00",
    "\x01\x02\x7f\x1b[31mansi\x1b[0m",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم שלום עולם",
    "नमस्ते दुनिया ภาษาไทย ລາວ ᠮᠣᠩᠭᠣᠯ",
    "emoji 🤗🚀 family 👨‍👩‍👧‍👦 flag 🇩🇪 skin 👍🏽 keycap 1️⃣ ❤️",
    "e\u0301 a\u0308\u0304 Z\u0351\u0352\u0353algo\u0489 \u0301leading mark",
    "𝐀𝐁𝐂 𝟘𝟙 𐍈 𓂀 𠀀𪚥 \U0001f9ff",
    "\ufeffBOM \ufffd replacement \uffff\ufffe nonchars \U0010ffff",
    "\ue000\uf8ff private \U000f0000",
    "\u0378\u0379 unassigned \U00010940\U00011db0 new letters",
    "<|endoftext|>",
    "text<|endoftext|>more <|endoftext|> <|endoftext|><|endoftext|>",
    "$$$ !!! ??? ... --- *** @@@ ### %%% ^^^ &&& ||| ~~~ ``` ///",
    "def f(x):\n    return x ** 2  # comment\n",
    "http://example.com/path?q=1&b=2#frag user@example.com",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    " " * 40 + "x",
    "ababababababababab abcabcabcabc bcbcbcbc",
]

_POOLS: list[list[str]] = [
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"),
    list("0123456789"),
    list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"),
    [" ", " ", "  ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x85", "\xa0", "\u2003",
     "\u3000", "\u2028", "\x1c", "\x1f"],
    ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'LL", "'", "''"],
    list("éèêëàâäçñøåæßÿÀÉÖÜ¿¡«»°±µ¶·"),
    list("αβγδεζηθλμπσωΑΒΓΔабвгдежзиклмнопАБВГДשלוםمرحبا"),
    list("日本語中文字漢한국어テキストひらがな、。「」"),
    list("०१२३٠١٢٣½¼²³⁴₅ⅠⅡⅢ〇"),
    ["🤗", "🚀", "👍🏽", "👨\u200d👩\u200d👧", "🇩🇪", "❤️", "1️⃣", "🏳️\u200d🌈"],
    ["\u0301", "\u0308", "\u0304", "\u0489", "\u093f", "\u0e31", "\u200d", "\u200c"],
    ["\x00", "\x01", "\x07", "\x1b", "\x7f", "\x80", "\x9f"],
    ["𝐀", "𝟘", "𐍈", "𓂀", "𠀀", "\U0001f9ff", "\U0010ffff", "\U000e0041"],
    ["\u0378", "\U00010940", "\U00011db0", "\ue000", "\U000f0000", "\ufffe", "\ufeff"],
    ["<|endoftext|>", "<|", "|>", "endoftext"],
]


def random_code_point(rng: random.Random) -> str:
    """Any Unicode scalar value (no surrogates), biased towards the BMP."""
    while True:
        cp = rng.randrange(0x10000) if rng.random() < 0.7 else rng.randrange(0x110000)
        if not 0xD800 <= cp < 0xE000:
            return chr(cp)


def random_text(rng: random.Random, max_parts: int = 30) -> str:
    """A random string of fragments drawn from the class pools and arbitrary code points."""
    parts = []
    for _ in range(rng.randrange(max_parts + 1)):
        if rng.random() < 0.1:
            parts.append(random_code_point(rng))
        else:
            pool = rng.choice(_POOLS)
            parts.append("".join(rng.choice(pool) for _ in range(rng.randrange(1, 5))))
    return "".join(parts)


def random_texts(seed: int, n: int, max_parts: int = 30) -> list[str]:
    """`n` seeded random strings."""
    rng = random.Random(seed)
    return [random_text(rng, max_parts) for _ in range(n)]
