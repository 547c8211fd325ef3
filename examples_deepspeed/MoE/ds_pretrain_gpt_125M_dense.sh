#!/bin/bash
# Dense 125M baseline: GPT-3 Small (12 layers, hidden 768, 12 heads, FFN 3072) at the XMoE-small
# sequence length, batch and token budget, with no MoE layer (--num-experts 1). Its FFN compute
# per token equals top-8 of 64 experts of 384 (ds_pretrain_gpt_topk_small.sh).
#
# Sources: GPT-3 Small's LR 6.0e-4 / min LR 6.0e-5 (GPT-3 paper table, as listed in
# Megatron-DeepSpeed's examples_deepspeed/MoE/ds_pretrain_gpt_125M_dense_cl.sh and
# ds_pretrain_gpt_*_MoE*.sh; those scripts note MoE models train better with the lower LR the
# MoE scripts here use); everything else as ds_pretrain_gpt_xmoe_small.sh.
#
# Every variable below can be overridden from the environment, e.g.
#   DATA_PATH=/data/pile_text_document NUM_GPUS=8 bash ds_pretrain_gpt_125M_dense.sh
#   NUM_NODES=2 HOSTFILE=hostfile bash ds_pretrain_gpt_125M_dense.sh          # multi-node
#   LAUNCHER=torchrun NUM_GPUS=8 bash ds_pretrain_gpt_125M_dense.sh
#   DRY_RUN=1 bash ds_pretrain_gpt_125M_dense.sh       # check, print the command, run nothing
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

### Cluster, launcher, paths ####################################################################
NUM_GPUS=${NUM_GPUS:-8}                # GPUs (processes) per node
NUM_NODES=${NUM_NODES:-1}
HOSTFILE=${HOSTFILE:-}                 # deepspeed launcher, several nodes: "host slots=N" lines
LAUNCHER=${LAUNCHER:-deepspeed}        # deepspeed | torchrun
NODE_RANK=${NODE_RANK:-0}              # torchrun with NUM_NODES > 1: this node's rank
MASTER_ADDR=${MASTER_ADDR:-localhost}  # torchrun with NUM_NODES > 1: node 0's address
MASTER_PORT=${MASTER_PORT:-29500}
DRY_RUN=${DRY_RUN:-0}                  # 1: check the settings, print the command, run nothing
PYTHON=${PYTHON:-python3}              # checks the settings here before launching (no torch)
DATA_PATH=${DATA_PATH:-${SCRIPT_DIR}/data/my-corpus_text_document}  # PREFIX, or "W1 P1 W2 P2"
VOCAB_PATH=${VOCAB_PATH:-${SCRIPT_DIR}/data/gpt2-vocab.json}  # dataset/download_vocab.sh
MERGE_PATH=${MERGE_PATH:-${SCRIPT_DIR}/data/gpt2-merges.txt}
OUTPUT_DIR=${OUTPUT_DIR:-${SCRIPT_DIR}/output}  # ds_config JSON, checkpoint/, log/, tensorboard/

### Model: GPT-3 Small shape, the XMoE fork's seq 1024 ##########################################
NUM_LAYERS=${NUM_LAYERS:-12}
HIDDEN_SIZE=${HIDDEN_SIZE:-768}
FFN_HIDDEN_SIZE=${FFN_HIDDEN_SIZE:-3072}
NUM_ATTN_HEADS=${NUM_ATTN_HEADS:-12}
SEQ_LEN=${SEQ_LEN:-1024}
INIT_STD=${INIT_STD:-0.014}

### No MoE layer ##############################################################################
NUM_EXPERTS=1

### Batch, duration, learning rate ##############################################################
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-256}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-16}     # per GPU; accumulation fills the global batch
# The fork trained 60,000 iterations of 256 x 1024 tokens (15.7B tokens) with a warmup of 10% and
# cosine decay over the whole run; expressed in tokens as Megatron-DeepSpeed's MoE scripts do
# (those train GPT-3's 300B tokens: TRAIN_TOKENS=LR_DECAY_TOKENS=300000000000,
# WARMUP_TOKENS=375000000).
TRAIN_TOKENS=${TRAIN_TOKENS:-$((60000 * 256 * 1024))}
LR_DECAY_TOKENS=${LR_DECAY_TOKENS:-${TRAIN_TOKENS}}
WARMUP_TOKENS=${WARMUP_TOKENS:-$((TRAIN_TOKENS / 10))}
LR=${LR:-6.0e-4}
MIN_LR=${MIN_LR:-6.0e-5}
CLIP_GRAD=${CLIP_GRAD:-1.0}
SEED=${SEED:-1234}

### Precision, ZeRO, memory #####################################################################
PRECISION=${PRECISION:-bf16}                 # bf16 | fp16 (the fork's) | fp32
INITIAL_SCALE_POWER=${INITIAL_SCALE_POWER:-11}  # fp16 dynamic loss scaling: the fork's template
LOSS_SCALE_WINDOW=${LOSS_SCALE_WINDOW:-500}
HYSTERESIS=${HYSTERESIS:-2}
MIN_LOSS_SCALE=${MIN_LOSS_SCALE:-1}
# fp16 needs ZeRO >= 1 here: with DeepSpeed 0.19.8 at stage 0 the fp16 loss is never scaled
# while gradients are unscaled (deepspeedai/DeepSpeed#8393), so pretrain_gpt.py refuses it.
if [[ "${PRECISION}" == fp16 ]]; then ZERO_DEFAULT=1; else ZERO_DEFAULT=0; fi
ZERO_STAGE=${ZERO_STAGE:-${ZERO_DEFAULT}}     # 0, 1 or 2
if [[ "${ZERO_STAGE}" -gt 0 ]]; then PRESCALE_DEFAULT=false; else PRESCALE_DEFAULT=true; fi
PRESCALE_GRAD=${PRESCALE_GRAD:-${PRESCALE_DEFAULT}}
ACTIVATION_CHECKPOINT=${ACTIVATION_CHECKPOINT:-false}  # true: recompute layers in backward

### Data split, logging, evaluation, checkpoints (the fork's) ###################################
SPLIT=${SPLIT:-97,2,1}
NUM_WORKERS=${NUM_WORKERS:-2}
LOG_INTERVAL=${LOG_INTERVAL:-10}
EVAL_INTERVAL=${EVAL_INTERVAL:-100}
EVAL_ITERS=${EVAL_ITERS:-10}
TEST_ITERS=${TEST_ITERS:-100}
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}

# Names the checkpoint, log, TensorBoard and JSON paths (no timestamp: reruns resume), so it
# holds everything that shapes the parameters: a changed shape starts a new checkpoint.
MODEL_NAME="l${NUM_LAYERS}-h${HIDDEN_SIZE}-a${NUM_ATTN_HEADS}-ffn${FFN_HIDDEN_SIZE}-s${SEQ_LEN}"
RUN_NAME=${RUN_NAME:-gpt-dense-${MODEL_NAME}-lr${LR}-gbs${GLOBAL_BATCH_SIZE}-${PRECISION}}

MOE_OPTIONS=()

source "${SCRIPT_DIR}/gpt_launch_common.sh"
