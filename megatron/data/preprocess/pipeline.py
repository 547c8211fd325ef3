"""The preprocessing run: inputs -> ordered (parallel) encoding -> one builder per key.

Chunks of whole lines go to a process pool with a bounded window of tasks in flight (ordered,
like `Pool.imap`, but without reading the whole input ahead into memory); results come back in
input order, so the output never depends on --workers. Every builder writes under temporary
names and is aborted on any failure, so a failed run leaves no file under the final names.
Each builder also locks its output prefix for the whole run (`megatron.data.prefix_lock`): a
second run writing the same --output-prefix stops at once, naming the first one's PID.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import time
from collections import deque
from typing import Dict, Iterator, List, TextIO

import numpy as np

from megatron.data.preprocess.config import PreprocessConfig, PreprocessError
from megatron.data.preprocess.encode import (
    ChunkEncoder,
    ChunkResult,
    EncoderSettings,
    KeyOutput,
    encode_in_worker,
    init_worker,
    share_with_forked_workers,
)
from megatron.data.preprocess.inputs import expand_inputs, iter_chunks
from megatron.data.preprocess.report import ProgressLog, RunStats, summary_lines

TASKS_IN_FLIGHT_PER_WORKER = 3


def run(cfg: PreprocessConfig, log: TextIO = sys.stderr) -> RunStats:
    """Tokenize every input line of `cfg.input` into `<prefix>_<key>_<level>.bin/.idx` per key."""
    from megatron.data.indexed_dataset import (IndexedDatasetError, MMapIndexedDatasetBuilder,
                                               data_file_path, index_file_path)

    start = time.perf_counter()
    files = expand_inputs(cfg.input)
    for flag, path in (("--vocab-file", cfg.vocab_file), ("--merge-file", cfg.merge_file)):
        if not os.path.isfile(path):
            raise PreprocessError(f"{flag} {path!r} not found")
    settings = EncoderSettings.from_config(cfg)
    encoder = ChunkEncoder(settings)   # fails here, before any output, on tokenizer/nltk trouble
    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    os.makedirs(out_dir, exist_ok=True)

    stats = RunStats.for_keys(cfg.json_keys, files=len(files), start=start)
    progress = ProgressLog(cfg.log_interval, log)
    builders: Dict[str, MMapIndexedDatasetBuilder] = {}
    try:
        for key in cfg.json_keys:
            builders[key] = MMapIndexedDatasetBuilder(cfg.output_prefix_for(key),
                                                      dtype=encoder.dtype)
        with contextlib.closing(_encoded_chunks(cfg, settings, encoder, files)) as results:
            for result in results:
                _check_bad_lines(result, files, cfg.skip_bad_lines)
                for key, out in result.keys.items():
                    write_documents(builders[key], out)
                stats.add(result)
                progress.update(stats)
        for builder in builders.values():
            builder.finalize()
    except BaseException as e:
        for builder in builders.values():
            builder.abort()   # also releases every output prefix's lock
        if isinstance(e, IndexedDatasetError):   # another writer of an output prefix
            raise PreprocessError(str(e)) from None
        raise
    for key in cfg.json_keys:
        prefix = cfg.output_prefix_for(key)
        stats.keys[key].bytes_out = (os.path.getsize(data_file_path(prefix))
                                     + os.path.getsize(index_file_path(prefix)))
    for line in summary_lines(stats):
        print(line, file=log, flush=True)
    return stats


def _encoded_chunks(cfg: PreprocessConfig, settings: EncoderSettings, encoder: ChunkEncoder,
                    files: List[str]) -> Iterator[ChunkResult]:
    """ChunkResults in input order: in this process for --workers 1, else from a pool."""
    if cfg.workers == 1:
        for chunk in iter_chunks(files, cfg.chunk_bytes):
            yield encoder.encode(chunk)
        return
    window = TASKS_IN_FLIGHT_PER_WORKER * cfg.workers
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    if context.get_start_method() == "fork":
        share_with_forked_workers(encoder)
    with context.Pool(cfg.workers, initializer=init_worker, initargs=(settings,)) as pool:
        pending = deque()
        for chunk in iter_chunks(files, cfg.chunk_bytes):
            pending.append(pool.apply_async(encode_in_worker, (chunk,)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _check_bad_lines(result: ChunkResult, files: List[str], skip: bool) -> None:
    if result.bad_lines and not skip:
        bad = result.bad_lines[0]
        raise PreprocessError(f"{files[result.file_index]}:{bad.line}: {bad.message} "
                              "(nothing written; --skip-bad-lines skips such lines)")


def write_documents(builder, out: KeyOutput) -> None:
    """Append a chunk's documents: each one's sequences in one add_items, then end_document."""
    tok_ends = np.cumsum(out.seq_lengths).tolist()
    seq_ends = np.cumsum(out.doc_seq_counts).tolist()
    tok_start = seq_start = 0
    for seq_end in seq_ends:
        tok_end = tok_ends[seq_end - 1]
        builder.add_items(out.tokens[tok_start:tok_end], out.seq_lengths[seq_start:seq_end])
        builder.end_document()
        tok_start, seq_start = tok_end, seq_end
