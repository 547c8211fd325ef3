#!/bin/bash
# The router study at the XMoE-small shape: the same GPT (12 layers, hidden 768, 12 heads, seq
# 1024, MoE in every 2nd layer) trained on the same tokens with six kinds of FFN layers, then
# compared in OUTPUT_DIR/results.md and PNGs (tools/router_study.py; docs/router_study.md):
#   dense             FFN 3072
#   topk2-16x1536     16 experts of 1536, top-2 (the XMoE paper's top-k baseline)
#   topk8-64x384      64 experts of 384, top-8 (ds_pretrain_gpt_topk_small.sh's routing)
#   switch-8x3072     8 experts of 3072, top-1
#   xmoe-64x384-t0.9  64 experts of 384, threshold 0.9 (ds_pretrain_gpt_xmoe_small.sh's)
#   d2s-64x384-t1.0   64 experts of 384 trained at threshold 1.0 (dropless: every expert on
#                     every token), then evaluated at SWEEP_THRESHOLDS ("dense-to-sparse")
# Expert sizes follow HIDDEN_SIZE (4 x hidden / 2, / 8, x 1). Capacity factors, init, Adam, LR
# and clipping as ds_pretrain_gpt_xmoe_small.sh; the budget is TRAIN_TOKENS for every config.
#
# Rerunning the script resumes the study: finished configurations are skipped, an unfinished
# one resumes from its checkpoint. Every variable below can be overridden from the environment:
#   DATA_PATH=data/en-docs_text_document bash ds_study_small.sh            # one GPU (or CPU)
#   CONFIGS="dense xmoe d2s" TRAIN_TOKENS=52428800 bash ds_study_small.sh
#   NUM_GPUS=8 bash ds_study_small.sh                 # each run under deepspeed --num_gpus 8
#   DRY_RUN=1 bash ds_study_small.sh                  # check, print the commands, run nothing
# Arguments after the script go to tools/router_study.py (e.g. --configs dense xmoe); extra
# pretrain_gpt.py flags for every run go in EXTRA_ARGS.
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "${SCRIPT_DIR}/../.." && pwd)"

### Processes, paths ############################################################################
NUM_GPUS=${NUM_GPUS:-1}                # 1: one plain python process (one GPU, or the CPU)
LAUNCHER=${LAUNCHER:-deepspeed}        # with NUM_GPUS > 1: deepspeed | torchrun (one node)
MASTER_PORT=${MASTER_PORT:-29500}
DRY_RUN=${DRY_RUN:-0}                  # 1: check every configuration, print the commands
PYTHON=${PYTHON:-python3}
DATA_PATH=${DATA_PATH:-${SCRIPT_DIR}/data/my-corpus_text_document}  # PREFIX, or "W1 P1 W2 P2"
VOCAB_PATH=${VOCAB_PATH:-${SCRIPT_DIR}/data/gpt2-vocab.json}  # dataset/download_vocab.sh
MERGE_PATH=${MERGE_PATH:-${SCRIPT_DIR}/data/gpt2-merges.txt}
OUTPUT_DIR=${OUTPUT_DIR:-${SCRIPT_DIR}/output/router_study}  # results.md, PNGs, runs/NAME/
CONFIGS=${CONFIGS:-}                   # empty: all six; names or kinds, e.g. "dense xmoe d2s"

### Model: GPT-3 Small shape, the XMoE fork's seq 1024 ##########################################
NUM_LAYERS=${NUM_LAYERS:-12}
HIDDEN_SIZE=${HIDDEN_SIZE:-768}              # dense FFN 4x; expert sizes follow it
NUM_ATTN_HEADS=${NUM_ATTN_HEADS:-12}
SEQ_LEN=${SEQ_LEN:-1024}
EXPERT_INTERVAL=${EXPERT_INTERVAL:-2}        # layers 2, 4, ..., 12 are MoE

### Routing: the XMoE fork's capacity for every router ##########################################
THRESHOLD=${THRESHOLD:-0.9}                  # the xmoe configuration's
SWEEP_THRESHOLDS=${SWEEP_THRESHOLDS:-0.5 0.6 0.7 0.8 0.9 1.0}   # the d2s sweep
MOE_TRAIN_CAP_FACTOR=${MOE_TRAIN_CAP_FACTOR:-8.0}
MOE_EVAL_CAP_FACTOR=${MOE_EVAL_CAP_FACTOR:-8.0}
MOE_MIN_CAP=${MOE_MIN_CAP:-4}
MLC=${MLC:-0.01}                             # load-balancing loss coefficient

### Budget, batch, learning rate ################################################################
# 400 iterations of 256 x 1024 tokens per configuration (104,857,600 tokens): minutes per
# configuration on one H200 (the d2s run computes every expert, ~8x the dense FFN's FLOPs in its
# MoE layers, so it takes several times longer).
TRAIN_TOKENS=${TRAIN_TOKENS:-$((400 * 256 * 1024))}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-256}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-16}     # per GPU; accumulation fills the global batch
LR=${LR:-4.5e-4}
MIN_LR=${MIN_LR:-4.5e-6}
WARMUP_FRACTION=${WARMUP_FRACTION:-0.1}      # of the budget; cosine decay over all of it
SEED=${SEED:-1234}

### Data split, evaluation, logging, checkpoints ################################################
# Validation and test read EVAL_ITERS / TEST_ITERS global batches (x 256 x 1024 tokens): give
# them a SPLIT share of the corpus at least that large, or they repeat documents.
SPLIT=${SPLIT:-97,2,1}
EVAL_ITERS=${EVAL_ITERS:-10}
TEST_ITERS=${TEST_ITERS:-10}
EVAL_INTERVAL=${EVAL_INTERVAL:-}             # empty: budget / 10 iterations
LOG_INTERVAL=${LOG_INTERVAL:-}               # empty: budget / 100 iterations
SAVE_INTERVAL=${SAVE_INTERVAL:-}             # empty: budget / 5 (only the newest is kept)
NUM_WORKERS=${NUM_WORKERS:-2}

### Precision and speed (pretrain_gpt.py flags of every run) ####################################
PRECISION=${PRECISION:-bf16}                 # bf16 | fp32
# COMPILE (routing | routing-graphs | model | none) and DISPATCH (sync-free | exact): see
# speed_options.sh and the README's speed flags.
COMPILE=${COMPILE:-routing}
DISPATCH=${DISPATCH:-sync-free}
EXTRA_ARGS=${EXTRA_ARGS:-}                   # more pretrain_gpt.py flags, space-separated

case "${PRECISION}" in
    bf16) extra=(--bf16) ;;
    fp32) extra=() ;;
    *) echo "PRECISION must be bf16 or fp32, got '${PRECISION}'" >&2; exit 2 ;;
esac
SPEED_MOE=true
source "${SCRIPT_DIR}/speed_options.sh"       # COMPILE, DISPATCH -> speed_options
extra+=("${speed_options[@]}")
# shellcheck disable=SC2206  # EXTRA_ARGS is split into words on purpose
extra+=(${EXTRA_ARGS})

study=(--out-dir "${OUTPUT_DIR}" --data-path ${DATA_PATH} --vocab-file "${VOCAB_PATH}"
       --merge-file "${MERGE_PATH}" --split "${SPLIT}"
       --num-layers "${NUM_LAYERS}" --hidden-size "${HIDDEN_SIZE}"
       --num-attention-heads "${NUM_ATTN_HEADS}" --seq-length "${SEQ_LEN}"
       --expert-interval "${EXPERT_INTERVAL}"
       --threshold "${THRESHOLD}" --sweep-thresholds ${SWEEP_THRESHOLDS}
       --capacity-factor "${MOE_TRAIN_CAP_FACTOR}" --eval-capacity-factor "${MOE_EVAL_CAP_FACTOR}"
       --moe-min-capacity "${MOE_MIN_CAP}" --moe-loss-coeff "${MLC}"
       --train-tokens "${TRAIN_TOKENS}" --global-batch-size "${GLOBAL_BATCH_SIZE}"
       --micro-batch-size "${MICRO_BATCH_SIZE}" --lr "${LR}" --min-lr "${MIN_LR}"
       --lr-warmup-fraction "${WARMUP_FRACTION}" --seed "${SEED}"
       --eval-iters "${EVAL_ITERS}" --test-iters "${TEST_ITERS}" --num-workers "${NUM_WORKERS}")
if [[ -n "${CONFIGS}" ]]; then study+=(--configs ${CONFIGS}); fi
if [[ -n "${EVAL_INTERVAL}" ]]; then study+=(--eval-interval "${EVAL_INTERVAL}"); fi
if [[ -n "${LOG_INTERVAL}" ]]; then study+=(--log-interval "${LOG_INTERVAL}"); fi
if [[ -n "${SAVE_INTERVAL}" ]]; then study+=(--save-interval "${SAVE_INTERVAL}"); fi
if [[ "${DRY_RUN}" == 1 ]]; then study+=(--dry-run); fi
if [[ "${NUM_GPUS}" -gt 1 ]]; then
    # Each configuration's pretrain_gpt.py runs under the launcher; the evaluations are one
    # process each.
    case "${LAUNCHER}" in
        deepspeed) launcher="deepspeed --num_gpus ${NUM_GPUS} --master_port ${MASTER_PORT}" ;;
        torchrun) launcher="torchrun --standalone --nnodes 1 --nproc_per_node ${NUM_GPUS}" ;;
        *) echo "LAUNCHER must be deepspeed or torchrun, got '${LAUNCHER}'" >&2; exit 2 ;;
    esac
    study+=(--launcher "${launcher}")
fi

# Paths are resolved by the driver against this directory (the caller's).
exec "${PYTHON}" "${REPO_DIR}/tools/router_study.py" "${study[@]}" "$@" -- "${extra[@]}"
