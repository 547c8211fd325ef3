"""Run pretrain_gpt.py's `main` once per command line, one after another in this one process:

    python tests/pretrain_runs.py RUNS_JSON OUT_DIR
    python -m torch.distributed.run --nproc-per-node 2 tests/pretrain_runs.py RUNS_JSON OUT_DIR

RUNS_JSON holds {"name": [pretrain_gpt.py arguments], ...}. Run `name`'s stdout and stderr (at
the file-descriptor level: DeepSpeed's and torch's output too) go to OUT_DIR/name.rankR.out and
.err, its exit code to OUT_DIR/name.rankR.rc.

Why: the tests that compare runs (expert parallelism against one rank, under each ZeRO stage)
would otherwise start python, torch and DeepSpeed once per run and per rank, which on a small CPU
machine costs more than the few iterations they train. Each run is a whole `main` (seeded,
process group reused, a fresh model, engine and data loaders), so a run sees what it would see
alone. A run that fails (exit code not 0, or an exception) ends the process with exit code 1, so
that torchrun stops every rank rather than leaving one waiting in a collective; the runs after it
have no .rc file.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from pathlib import Path


@contextlib.contextmanager
def output_to(out_path: Path, err_path: Path):
    """Point file descriptors 1 and 2 at two files for the block, then back."""
    targets = {1: out_path, 2: err_path}
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in targets}
    files = {fd: open(path, "w") for fd, path in targets.items()}
    try:
        for fd, f in files.items():
            os.dup2(f.fileno(), fd)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd in targets:
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
            files[fd].close()


def run_one(argv: list[str]) -> int:
    """The exit code of pretrain_gpt.main(argv); 1 (traceback printed) if it raised."""
    import pretrain_gpt

    try:
        return pretrain_gpt.main(argv)
    except SystemExit as e:          # argparse: exit code 2 and its one line already printed
        return e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 (reported in the run's .err file)
        traceback.print_exc()
        return 1


def main() -> int:
    runs = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    rank = os.environ.get("RANK", "0")
    for name, argv in runs.items():
        stem = f"{name}.rank{rank}"
        with output_to(out_dir / f"{stem}.out", out_dir / f"{stem}.err"):
            code = run_one(argv)
        (out_dir / f"{stem}.rc").write_text(f"{code}\n")
        if code != 0:
            print(f"pretrain_runs.py: run {name} exited with {code} (see {out_dir / stem}.err); "
                  "the runs after it did not run", file=sys.stderr, flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
