"""Reading pretrain_gpt.py's log (the formats of megatron/training_log.py), failing loudly.

    log = parse_training_log(text, path, moe=True)

The lines read (rank 0's stdout, as the study saves it in runs/NAME/train.log):

    number of parameters: 101,088 (experts 68,608); training for 20 iterations of 4 samples
     iteration        5/      20 | consumed samples: 20 | elapsed time per iteration (ms): 38.8 |
         ... | lm loss: 5.86E+00 | ... | tokens per second: 3297 | TFLOPs: 0.00 |
       moe layer 2: experts/token wanted 3.90 used 3.50 | dropped 10.3% | top1 p50 0.16 |
         expert FLOPs vs top-k 0.49, vs dense 0.49
     validation loss at iteration 10 | lm loss value: 5.07E+00 | lm loss PPL: 1.59E+02 |
     test loss at iteration 20 | lm loss value: ... | lm loss PPL: ... |
    == router_study: attempt 2 ...          (the study's own line before each attempt)

A resumed run appends to the same log and repeats the iterations after its checkpoint: a later
line for the same iteration replaces the earlier one. A line that looks like one of these but
does not parse, or a kind of line missing altogether, raises LogFormatError naming the log and
the line: a changed log format must not turn into an empty table.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

NUM = r"[-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|nan|inf)"
PARAMS_RE = re.compile(r"number of parameters: ([\d,]+) \(experts ([\d,]+)\)")
ITERATION_RE = re.compile(
    rf"^ iteration +(\d+)/ *(\d+) \| consumed samples: +(\d+) \| elapsed time per iteration "
    rf"\(ms\): ({NUM}) \|.* \| lm loss: ({NUM}) \|.* \| tokens per second: ({NUM}) \|")
MOE_RE = re.compile(
    rf"^ +moe layer (\d+): experts/token wanted ({NUM}) used ({NUM}) \| dropped ({NUM})% \| "
    rf"top1 p50 ({NUM}) \| expert FLOPs vs top-k ({NUM}), vs dense ({NUM})")
EVAL_RE = re.compile(rf"^ (validation|test) loss at iteration (\d+) \| lm loss value: ({NUM}) "
                     rf"\| lm loss PPL: ({NUM}) \|")
ATTEMPT_MARK = "== router_study: attempt"
# What a line of each kind starts with: such a line must parse.
LOOKS_LIKE = ((ITERATION_RE, " iteration "), (MOE_RE, "   moe layer "),
              (EVAL_RE, " validation loss at"), (EVAL_RE, " test loss at"))
FORMATS = "pretrain_gpt.py's log lines (megatron/training_log.py)"


class LogFormatError(ValueError):
    """The log lacks a line the study needs, or holds one it cannot read."""


@dataclass(frozen=True)
class Interval:
    """One log interval ending at `iteration`."""

    iteration: int
    lm_loss: float
    ms_per_iteration: float
    tokens_per_second: float
    first_of_attempt: bool          # includes the attempt's warm-up (compilation, caches)


@dataclass(frozen=True)
class LayerRouting:
    """One MoE layer over one interval (means): experts/token wanted and used, dropped fraction,
    median top-1 probability, expert FLOPs vs top-k and vs the dense FFN."""

    wanted: float
    used: float
    dropped: float
    top1_p50: float
    flops_vs_topk: float
    flops_vs_dense: float


@dataclass
class TrainingLog:
    """What the study reads from a run's log (see the module docstring)."""

    path: str
    total_params: int = 0
    expert_params: int = 0
    total_iters: int = 0
    intervals: Dict[int, Interval] = field(default_factory=dict)
    routing: Dict[int, Dict[int, LayerRouting]] = field(default_factory=dict)  # it -> layer ->
    validation: Dict[int, Tuple[float, float]] = field(default_factory=dict)  # it -> loss, ppl
    test: Optional[Tuple[int, float, float]] = None                       # it, loss, ppl
    attempts: int = 0

    @property
    def last_iteration(self) -> int:
        return max(self.intervals)

    def final_routing(self) -> Dict[int, LayerRouting]:
        """Per MoE layer, the last logged interval's routing."""
        return self.routing[max(self.routing)] if self.routing else {}

    def train_seconds(self) -> float:
        """Training time of the iterations kept (evaluation and saves excluded, as logged)."""
        total, previous = 0.0, 0
        for it in sorted(self.intervals):
            total += self.intervals[it].ms_per_iteration * (it - previous) / 1000.0
            previous = it
        return total

    def steady_tokens_per_second(self) -> float:
        """Median over the intervals of tokens/s, leaving out each attempt's first interval
        (its warm-up) when others exist."""
        values = [i.tokens_per_second for i in self.intervals.values() if not i.first_of_attempt]
        if not values:
            values = [i.tokens_per_second for i in self.intervals.values()]
        return statistics.median(values)


def parse_training_log(text: str, path: str, moe: bool) -> TrainingLog:
    """Parse a run's log; LogFormatError (naming `path`) when a needed kind of line is missing
    (MoE lines only when `moe`) or a line of a known kind does not parse."""
    log = TrainingLog(path=path)
    iteration: Optional[int] = None
    new_attempt = True
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith(ATTEMPT_MARK):
            log.attempts += 1
            new_attempt, iteration = True, None
        elif m := PARAMS_RE.search(line):
            log.total_params = int(m.group(1).replace(",", ""))
            log.expert_params = int(m.group(2).replace(",", ""))
        elif m := ITERATION_RE.match(line):
            iteration, log.total_iters = int(m.group(1)), int(m.group(2))
            log.intervals[iteration] = Interval(iteration, float(m.group(5)), float(m.group(4)),
                                                float(m.group(6)), new_attempt)
            log.routing.pop(iteration, None)    # a resumed run's lines replace the earlier ones
            new_attempt = False
        elif m := MOE_RE.match(line):
            if iteration is None:
                raise LogFormatError(f"{path}:{number}: an MoE line before any iteration line: "
                                     f"{line.strip()!r}")
            log.routing.setdefault(iteration, {})[int(m.group(1))] = LayerRouting(
                *(float(g) for g in m.groups()[1:3]), float(m.group(4)) / 100.0,
                *(float(g) for g in m.groups()[4:]))
        elif m := EVAL_RE.match(line):
            it, loss, ppl = int(m.group(2)), float(m.group(3)), float(m.group(4))
            if m.group(1) == "validation":
                log.validation[it] = (loss, ppl)
            else:
                log.test = (it, loss, ppl)
        else:
            _refuse_unreadable(line, path, number)
    _require(log, moe)
    return log


def _refuse_unreadable(line: str, path: str, number: int) -> None:
    for pattern, start in LOOKS_LIKE:
        if line.startswith(start):
            raise LogFormatError(f"{path}:{number}: cannot read this line (expected "
                                 f"{pattern.pattern!r}; has {FORMATS} changed?): "
                                 f"{line.strip()[:160]!r}")


def _require(log: TrainingLog, moe: bool) -> None:
    missing = []
    if not log.total_params:
        missing.append("'number of parameters: N (experts M)'")
    if not log.intervals:
        missing.append("' iteration N/ M | ... | lm loss: X | ... | tokens per second: X |'")
    if moe and not log.routing:
        missing.append("'   moe layer L: experts/token wanted W used U | dropped D% | ...'")
    if not log.validation:
        missing.append("' validation loss at iteration N | lm loss value: X | lm loss PPL: Y |'")
    if log.test is None:
        missing.append("' test loss at iteration N | lm loss value: X | lm loss PPL: Y |'")
    if missing:
        raise LogFormatError(f"{log.path}: no {' and no '.join(missing)} line (a run that "
                             f"stopped early, or {FORMATS} changed)")


def parse_eval_log(text: str, path: str) -> Tuple[float, float]:
    """(validation loss, ppl) of a `pretrain_gpt.py --eval-only` log; LogFormatError without."""
    found = [m for m in map(EVAL_RE.match, text.splitlines()) if m and m.group(1) == "validation"]
    if not found:
        raise LogFormatError(f"{path}: no ' validation loss at iteration N | lm loss value: X | "
                             f"lm loss PPL: Y |' line ({FORMATS} changed?)")
    return float(found[-1].group(3)), float(found[-1].group(4))


def first_error_line(text: str, prog: str) -> Optional[str]:
    """The first `PROG: error...` line of a tool's output (our tools end a failure with one),
    else the last exception line of a traceback, else None."""
    mark = f"{prog}: error"
    for line in text.splitlines():
        if mark in line:
            return line[line.index(mark):].strip()
    found = re.findall(r"^[A-Za-z_][\w.]*(?:Error|Exception): .*$", text, re.MULTILINE)
    return found[-1].strip() if found else None


def routing_curves(log: TrainingLog) -> Dict[int, List[Tuple[int, float, float]]]:
    """Per MoE layer: (iteration, wanted, used) over the run, in iteration order."""
    curves: Dict[int, List[Tuple[int, float, float]]] = {}
    for it in sorted(log.routing):
        for layer, r in sorted(log.routing[it].items()):
            curves.setdefault(layer, []).append((it, r.wanted, r.used))
    return curves
