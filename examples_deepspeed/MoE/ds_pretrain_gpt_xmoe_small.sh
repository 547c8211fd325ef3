#!/bin/bash
# XMoE-small: GPT-3 Small (12 layers, hidden 768, 12 heads, seq 1024) whose every 2nd FFN is an
# MoE layer of 64 small experts (FFN 384 each, 1/8 of the dense 3072) with XMoE's threshold
# router (Yang et al. 2024, "XMoE: Sparse Models with Fine-grained and Adaptive Expert
# Selection"): a token takes experts in probability order until their cumulative probability
# reaches 0.9, so confident tokens use one expert and harder ones several.
#
# Sources of the values: the XMoE fork's launch line (examples/MoE of the original research fork;
# transcribed in tests/test_arguments.py) for the model, router, capacity, batch, LR, init and
# duration; Megatron-DeepSpeed's examples_deepspeed/MoE/ds_pretrain_gpt_125M_MoE64.sh (which the
# fork's LR 4.5e-4 / min LR 4.5e-6, MoE loss 0.01, init std 0.014, Adam betas 0.9/0.95,
# weight decay 0.1 and clipping 1.0 match) for the token-based LR schedule.
#
# Every variable below can be overridden from the environment, e.g.
#   DATA_PATH=/data/pile_text_document NUM_GPUS=8 bash ds_pretrain_gpt_xmoe_small.sh
#   NUM_NODES=2 HOSTFILE=hostfile bash ds_pretrain_gpt_xmoe_small.sh          # multi-node
#   LAUNCHER=torchrun NUM_GPUS=8 bash ds_pretrain_gpt_xmoe_small.sh
#   DRY_RUN=1 bash ds_pretrain_gpt_xmoe_small.sh       # check, print the command, run nothing
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
FFN_HIDDEN_SIZE=${FFN_HIDDEN_SIZE:-3072}     # the dense layers (1, 3, 5, ...)
NUM_ATTN_HEADS=${NUM_ATTN_HEADS:-12}
SEQ_LEN=${SEQ_LEN:-1024}
INIT_STD=${INIT_STD:-0.014}

### MoE: 64 experts of 384 every 2nd layer, threshold 0.9 (the XMoE fork) #######################
NUM_EXPERTS=${NUM_EXPERTS:-64}
EXPERT_INTERVAL=${EXPERT_INTERVAL:-2}        # layers 2, 4, ..., 12 are MoE
MOE_FFN_HIDDEN_SIZE=${MOE_FFN_HIDDEN_SIZE:-384}
THRESHOLD=${THRESHOLD:-0.9}
# Capacity factor 8 with 64 experts: an expert may take up to 8x its even share of the tokens,
# so threshold routing (several experts for hard tokens) rarely drops anything.
MOE_TRAIN_CAP_FACTOR=${MOE_TRAIN_CAP_FACTOR:-8.0}
MOE_EVAL_CAP_FACTOR=${MOE_EVAL_CAP_FACTOR:-8.0}
MOE_MIN_CAP=${MOE_MIN_CAP:-4}
MLC=${MLC:-0.01}                             # load-balancing loss coefficient
# Expert parallelism: each rank holds 64 / EP_PARALLEL_SIZE experts of every MoE layer and
# exchanges tokens with its EP group (all_to_all); EP_PARALLEL_SIZE must divide 64 and the number
# of processes (NUM_GPUS x NUM_NODES). 1 (plain data parallelism) is fastest while the experts
# fit on one GPU (XMoE-small's do: 226M expert parameters); the XMoE fork passed min(64, GPUs)
# but ignored it.
EP_PARALLEL_SIZE=${EP_PARALLEL_SIZE:-1}

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
LR=${LR:-4.5e-4}
MIN_LR=${MIN_LR:-4.5e-6}
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
MODEL_NAME+="-e${NUM_EXPERTS}-f${MOE_FFN_HIDDEN_SIZE}-i${EXPERT_INTERVAL}"
DEFAULT_RUN_NAME="gpt-xmoe-small-${MODEL_NAME}-th${THRESHOLD}-cap${MOE_TRAIN_CAP_FACTOR}"
DEFAULT_RUN_NAME+="-lr${LR}-gbs${GLOBAL_BATCH_SIZE}-${PRECISION}"
RUN_NAME=${RUN_NAME:-${DEFAULT_RUN_NAME}}

MOE_OPTIONS=(
    --expert-interval "${EXPERT_INTERVAL}"
    --moe-ffn-hidden-size "${MOE_FFN_HIDDEN_SIZE}"
    --use-threshold
    --threshold "${THRESHOLD}"
    --moe-train-capacity-factor "${MOE_TRAIN_CAP_FACTOR}"
    --moe-eval-capacity-factor "${MOE_EVAL_CAP_FACTOR}"
    --moe-min-capacity "${MOE_MIN_CAP}"
    --moe-loss-coeff "${MLC}"
    --moe-expert-parallel-size "${EP_PARALLEL_SIZE}"
    --create-moe-param-group
)

source "${SCRIPT_DIR}/gpt_launch_common.sh"
