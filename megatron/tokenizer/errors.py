"""The one exception type of the tokenizer package.

A `ValueError` subclass so callers that validate configuration with `except ValueError` also
catch bad tokenizer files and flags; messages name the offending file, line or flag.
"""


class TokenizerError(ValueError):
    """A tokenizer file or flag is missing, unreadable or malformed."""
