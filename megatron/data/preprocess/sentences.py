"""Optional sentence splitting (`--split-sentences`) with nltk's English punkt model.

Only offline data is used: nltk is never asked to download anything. Without nltk or its
punkt data the tool stops at startup with instructions, before any output is opened.
"""

from __future__ import annotations

from typing import Callable, List

from megatron.data.preprocess.config import PreprocessError

INSTALL_HINT = ("--split-sentences needs nltk and its English punkt data available offline: "
                "pip install nltk && python -m nltk.downloader punkt_tab punkt "
                "(or set NLTK_DATA to a directory that has them)")


def load_sentence_splitter(keep_newlines: bool) -> Callable[[str], List[str]]:
    """Return `text -> sentences` from nltk punkt; raise PreprocessError when unavailable.

    keep_newlines: newlines (and other whitespace) after a sentence end stay attached to that
    sentence instead of being dropped, as Megatron's --keep-newlines does.
    """
    try:
        from nltk.tokenize import punkt
    except ImportError:
        raise PreprocessError(f"nltk is not installed; {INSTALL_HINT}") from None
    base = _load_english_punkt(punkt)
    if not keep_newlines:
        return base.tokenize
    splitter = punkt.PunktSentenceTokenizer(train_text=base._params,
                                            lang_vars=_keep_newlines_lang_vars(punkt))
    return splitter.tokenize


def _load_english_punkt(punkt):
    errors = []
    if hasattr(punkt, "PunktTokenizer"):            # nltk >= 3.8.2 reads the punkt_tab data
        try:
            return punkt.PunktTokenizer("english")
        except (LookupError, OSError, ValueError) as e:
            errors.append(type(e).__name__)
    try:                                             # older nltk: the pickled model
        import nltk.data
        return nltk.data.load("tokenizers/punkt/english.pickle")
    except (LookupError, OSError, ValueError) as e:
        errors.append(type(e).__name__)
    raise PreprocessError(f"nltk punkt data not found ({', '.join(errors)}); {INSTALL_HINT}")


def _keep_newlines_lang_vars(punkt):
    """Punkt language variables whose sentence end swallows the whitespace that follows it."""

    class KeepNewlinesLanguageVars(punkt.PunktLanguageVars):
        # Stock punkt requires whitespace *inside* the look-ahead, which leaves it out of the
        # sentence; consuming `\s*` before the look-ahead keeps it with the sentence instead.
        _period_context_fmt = r"""
            \S*                          # some word material
            %(SentEndChars)s             # a potential sentence ending
            \s*                          # trailing whitespace, newlines included, kept
            (?=(?P<after_tok>
                %(NonWord)s              # either other punctuation
                |
                (?P<next_tok>\S+)        # or the next token
            ))"""

    return KeepNewlinesLanguageVars()
