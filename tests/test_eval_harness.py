"""lm-evaluation-harness on an exported model, offline, scored against our own model.

The documented path is lm-eval's stock Hugging Face model on the exported directory:

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --tasks ...

Always run: the log-likelihoods lm-eval's `hf` model (HFLM) computes for a multiple-choice task,
reproduced here through transformers on the exported directory (its tokenizer and model, HFLM's
request encoding), equal the ones our GPTModel gives on our tokenizer's ids: what lm-eval
needs from the export is checked without installing lm-eval.

With lm-eval installed (`pip install -e ".[eval]"`; otherwise skipped): the `lm_eval` command
itself on a local JSONL task written here (no download: HF_HUB_OFFLINE, HF_DATASETS_OFFLINE)
gives the same per-choice log-likelihoods and the accuracy they imply.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F

from tests.test_hf_export import (AutoModelForCausalLM, AutoTokenizer, export, moe_model,  # noqa
                                  save, vocab)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning",
                                        "ignore::FutureWarning", "ignore::UserWarning")

# Multiple-choice questions on the synthetic grammar of tests/test_pretrain_gpt.py; the last
# context ends in a space, which lm-eval moves into the continuation.
DOCS = [{"context": "The sparse router routes 3", "choices": ["tokens.", "experts.", "layer"],
         "label": 0},
        {"context": "The dense model picks 5", "choices": ["layers.", "gate", "batch."],
         "label": 0},
        {"context": "The noisy gate sorts", "choices": ["7 logits.", "router", "the"],
         "label": 0},
        {"context": "The stable kernel mixes 2 ", "choices": ["samples.", "dense.", "picks"],
         "label": 0}]
TASK_YAML = """task: xmoe_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def requests() -> List[Tuple[str, str]]:
    """(context, continuation) pairs as lm-eval forms them (target delimiter " ")."""
    return [(d["context"], " " + choice) for d in DOCS for choice in d["choices"]]


def encode_pair(encode, context: str, continuation: str) -> Tuple[List[int], List[int]]:
    """HFLM's encoding: trailing context spaces move to the continuation; the whole text is
    encoded and split at the context's length."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx):]


def loglikelihoods(model_logits, encode) -> List[Tuple[float, bool]]:
    """(sum of the continuation's log-probabilities, whether every token is the argmax) per
    request, as HFLM computes them (one request per call: no padding)."""
    out = []
    for context, continuation in requests():
        ctx, cont = encode_pair(encode, context, continuation)
        ids = torch.tensor([(ctx + cont)[:-1]])
        with torch.no_grad():
            logprobs = F.log_softmax(model_logits(ids)[0, -len(cont):].float(), dim=-1)
        target = torch.tensor(cont)
        out.append((float(logprobs.gather(1, target[:, None]).sum()),
                    bool((logprobs.argmax(-1) == target).all())))
    return out


@pytest.fixture(scope="module")
def exported(moe_model, vocab, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_export")
    assert export(save(moe_model, vocab, root / "ckpt"), root / "hf") == 0
    return root / "hf"


@pytest.fixture(scope="module")
def ours(moe_model, vocab) -> List[Tuple[float, bool]]:
    """Our model (dropless, as exported) on our tokenizer's ids."""
    moe_model.set_routing(drop_tokens=False)
    return loglikelihoods(lambda ids: moe_model(ids).logits, vocab["tokenizer"].tokenize)


def test_hf_loglikelihoods_equal_ours(exported, ours):
    model = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(exported, trust_remote_code=True)
    theirs = loglikelihoods(lambda ids: model(ids).logits, tokenizer.encode)
    assert [g for _, g in theirs] == [g for _, g in ours]
    torch.testing.assert_close([ll for ll, _ in theirs], [ll for ll, _ in ours], rtol=0,
                               atol=1e-4)
    assert len({round(ll, 3) for ll, _ in ours}) == len(ours)    # the choices differ


@pytest.mark.slow
def test_lm_eval_cli_scores_equal_ours(exported, ours, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval is the 'eval' extra: pip install -e .[eval]")
    data = tmp_path / "xmoe_tiny_mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "xmoe_tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "datasets_cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={exported},trust_remote_code=True", "--tasks", "xmoe_tiny_mc",
         "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "1",
         "--output_path", str(tmp_path / "out"), "--log_samples"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    samples = [json.loads(line) for path in (tmp_path / "out").rglob("samples_*.jsonl")
               for line in path.read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    got = [(float(ll), greedy == "True") for s in samples for ll, greedy in s["filtered_resps"]]
    assert [g for _, g in got] == [g for _, g in ours]
    torch.testing.assert_close([ll for ll, _ in got], [ll for ll, _ in ours], rtol=0, atol=1e-4)
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    n = len(DOCS[0]["choices"])
    accuracy = sum(max(range(n), key=lambda c: ours[i * n + c][0]) == d["label"]
                   for i, d in enumerate(DOCS)) / len(DOCS)
    assert results["results"]["xmoe_tiny_mc"]["acc,none"] == pytest.approx(accuracy)
