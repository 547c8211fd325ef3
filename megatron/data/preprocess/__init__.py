"""Loose JSON -> tokenized mmap indexed datasets (the engine behind `tools/preprocess_data.py`).

Layout: `config` (typed settings), `inputs` (file discovery, line-aligned byte chunks),
`encode` (per-worker parse/validate/tokenize of one chunk), `sentences` (optional nltk punkt),
`report` (progress and summary), `pipeline` (ordered fan-out to workers, writing, abort).
Torch-free, like the rest of the data tools.
"""

from megatron.data.preprocess.config import PreprocessConfig, PreprocessError

__all__ = ["PreprocessConfig", "PreprocessError"]
