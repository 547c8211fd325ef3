# Shared launch logic of the ds_pretrain_gpt_*.sh scripts in this folder; sourced, not run.
#
# The calling script sets the cluster / path / model / training variables (see any of them) and
# MOE_OPTIONS (a bash array, empty for a dense model), then sources this file, which
#   1. fills ds_config_gpt_TEMPLATE.json with `sed` into ${OUTPUT_DIR}/ds_config_${RUN_NAME}.json
#      (batch sizes, ZeRO stage, precision, clipping and loss scaling from the same variables
#      as the flags, so pretrain_gpt.py's cross-check of the JSON against the flags passes);
#   2. assembles the pretrain_gpt.py command line;
#   3. checks it for NUM_GPUS x NUM_NODES processes, here, without torch or a GPU
#      (tools/check_pretrain_args.py: pretrain_gpt.py's own validation; a bad setting ends here
#      with one line and exit code 2);
#   4. with DRY_RUN=1 prints the shell-quoted command (stdout), what was checked and what was not
#      (stderr) and exits; otherwise launches it with `deepspeed` (default) or `torchrun`
#      (LAUNCHER=torchrun), its output also in ${OUTPUT_DIR}/log/. If the run fails, its first
#      `pretrain_gpt.py: error` line is repeated last (after the launcher's traceback), and the
#      script exits with the launcher's code.

REPO_DIR="$(cd "${SCRIPT_DIR}/../.." && pwd)"

case "${LAUNCHER}" in
    deepspeed|torchrun) ;;
    *) echo "LAUNCHER must be deepspeed or torchrun, got '${LAUNCHER}'" >&2; exit 2 ;;
esac
case "${PRECISION}" in
    bf16) FP16_ENABLED=false; BF16_ENABLED=true; precision_options=(--bf16) ;;
    fp16) FP16_ENABLED=true; BF16_ENABLED=false
          precision_options=(--fp16 --initial-loss-scale "$((2 ** INITIAL_SCALE_POWER))"
                             --loss-scale-window "${LOSS_SCALE_WINDOW}"
                             --hysteresis "${HYSTERESIS}" --min-loss-scale "${MIN_LOSS_SCALE}") ;;
    fp32) FP16_ENABLED=false; BF16_ENABLED=false; precision_options=() ;;
    *) echo "PRECISION must be bf16, fp16 or fp32, got '${PRECISION}'" >&2; exit 2 ;;
esac
SPEED_MOE=false
if [[ ${#MOE_OPTIONS[@]} -gt 0 ]]; then SPEED_MOE=true; fi
source "${SCRIPT_DIR}/speed_options.sh"       # COMPILE, DISPATCH -> speed_options
if [[ "${LAUNCHER}" == deepspeed && "${NUM_NODES}" -gt 1 && -z "${HOSTFILE}" ]]; then
    echo "NUM_NODES=${NUM_NODES} with the deepspeed launcher needs HOSTFILE" \
         "(see hostfile.example), or use LAUNCHER=torchrun on every node" >&2
    exit 2
fi
if [[ "${LAUNCHER}" == deepspeed && -n "${HOSTFILE}" ]]; then
    # `deepspeed` takes the first NUM_NODES hosts of HOSTFILE and NUM_GPUS slots on each.
    if [[ ! -f "${HOSTFILE}" ]]; then
        echo "HOSTFILE ${HOSTFILE} not found" >&2
        exit 2
    fi
    hostfile_problem=$(awk -v nodes="${NUM_NODES}" -v gpus="${NUM_GPUS}" '
        /^[[:space:]]*(#|$)/ { next }
        { hosts++; slots = $0; sub(/.*slots=/, "", slots)
          if (hosts <= nodes && slots + 0 < gpus && !found) {
              print $1 " has slots=" slots + 0; found = 1 } }
        END { if (!found && hosts < nodes) print "lists " hosts + 0 " host(s)" }' "${HOSTFILE}")
    if [[ -n "${hostfile_problem}" ]]; then
        echo "NUM_NODES=${NUM_NODES} but HOSTFILE ${HOSTFILE}: ${hostfile_problem}" \
             "(NUM_GPUS=${NUM_GPUS} slots are needed on each of the first ${NUM_NODES} hosts)" >&2
        exit 2
    fi
fi

# Data loading, the JSON and checkpoints are read by every rank: with several nodes OUTPUT_DIR
# and the data must be on a shared filesystem (or at the same paths on every node).
WORLD_SIZE_TOTAL=$((NUM_GPUS * NUM_NODES))
TRAIN_ITERS=$(( (TRAIN_TOKENS + GLOBAL_BATCH_SIZE * SEQ_LEN - 1) / (GLOBAL_BATCH_SIZE * SEQ_LEN) ))
RUN_TIME="$(date "+%Y.%m.%d-%H.%M.%S")"
HOST="${HOSTNAME:-$(hostname)}"
CHECKPOINT_PATH="${OUTPUT_DIR}/checkpoint/${RUN_NAME}"   # no timestamp: rerunning resumes from it
TENSORBOARD_DIR="${OUTPUT_DIR}/tensorboard/${RUN_NAME}_${HOST}_${RUN_TIME}"
LOG_FILE="${OUTPUT_DIR}/log/${RUN_NAME}_${HOST}_${RUN_TIME}.log"
CONFIG_JSON="${OUTPUT_DIR}/ds_config_${RUN_NAME}.json"

mkdir -p "${OUTPUT_DIR}"
sed -e "s/CONFIG_BATCH_SIZE/${GLOBAL_BATCH_SIZE}/" \
    -e "s/CONFIG_MBSIZE/${MICRO_BATCH_SIZE}/" \
    -e "s/ZERO_STAGE/${ZERO_STAGE}/" \
    -e "s/CONFIG_CLIP_GRAD/${CLIP_GRAD}/" \
    -e "s/PRESCALE_GRAD/${PRESCALE_GRAD}/" \
    -e "s/CONFIG_FP16_ENABLED/${FP16_ENABLED}/" \
    -e "s/CONFIG_BF16_ENABLED/${BF16_ENABLED}/" \
    -e "s/CONFIG_LOSS_SCALE_WINDOW/${LOSS_SCALE_WINDOW}/" \
    -e "s/CONFIG_HYSTERESIS/${HYSTERESIS}/" \
    -e "s/CONFIG_MIN_LOSS_SCALE/${MIN_LOSS_SCALE}/" \
    -e "s/CONFIG_INITIAL_SCALE_POWER/${INITIAL_SCALE_POWER}/" \
    "${SCRIPT_DIR}/ds_config_gpt_TEMPLATE.json" > "${CONFIG_JSON}"

# DATA_PATH stays unquoted below: it may be a blend, "W1 PREFIX1 W2 PREFIX2" (no spaces in paths).
gpt_options=(
    --num-layers "${NUM_LAYERS}"
    --hidden-size "${HIDDEN_SIZE}"
    --ffn-hidden-size "${FFN_HIDDEN_SIZE}"
    --num-attention-heads "${NUM_ATTN_HEADS}"
    --seq-length "${SEQ_LEN}"
    --max-position-embeddings "${SEQ_LEN}"
    --init-method-std "${INIT_STD}"
    --num-experts "${NUM_EXPERTS}"
    "${MOE_OPTIONS[@]}"
    --micro-batch-size "${MICRO_BATCH_SIZE}"
    --global-batch-size "${GLOBAL_BATCH_SIZE}"
    --train-tokens "${TRAIN_TOKENS}"
    --train-iters "${TRAIN_ITERS}"
    --lr "${LR}"
    --min-lr "${MIN_LR}"
    --lr-decay-style cosine
    --lr-warmup-tokens "${WARMUP_TOKENS}"
    --lr-decay-tokens "${LR_DECAY_TOKENS}"
    --adam-beta1 0.9
    --adam-beta2 0.95
    --weight-decay 0.1
    --clip-grad "${CLIP_GRAD}"
    "${precision_options[@]}"
    --seed "${SEED}"
    --data-path ${DATA_PATH}
    --vocab-file "${VOCAB_PATH}"
    --merge-file "${MERGE_PATH}"
    --data-impl mmap
    --split "${SPLIT}"
    --num-workers "${NUM_WORKERS}"
    --log-interval "${LOG_INTERVAL}"
    --eval-interval "${EVAL_INTERVAL}"
    --eval-iters "${EVAL_ITERS}"
    --test-iters "${TEST_ITERS}"
    --save "${CHECKPOINT_PATH}"
    --load "${CHECKPOINT_PATH}"
    --save-interval "${SAVE_INTERVAL}"
    --tensorboard-dir "${TENSORBOARD_DIR}"
    --deepspeed
    --deepspeed_config "${CONFIG_JSON}"
    --zero-stage "${ZERO_STAGE}"
)
gpt_options+=("${speed_options[@]}")
if [[ "${ACTIVATION_CHECKPOINT}" == true ]]; then
    gpt_options+=(--checkpoint-activations)
fi

if [[ "${LAUNCHER}" == deepspeed ]]; then
    # `deepspeed` starts NUM_GPUS processes on each of NUM_NODES hosts (the first NUM_NODES of
    # HOSTFILE, reached with pdsh/ssh) and passes --local_rank to each.
    launcher=(deepspeed --num_gpus "${NUM_GPUS}" --num_nodes "${NUM_NODES}"
              --master_port "${MASTER_PORT}")
    if [[ -n "${HOSTFILE}" ]]; then
        launcher+=(--hostfile "${HOSTFILE}")
    fi
elif [[ "${NUM_NODES}" -eq 1 ]]; then
    launcher=(torchrun --standalone --nnodes 1 --nproc_per_node "${NUM_GPUS}")
else
    # torchrun does not ssh anywhere: run this script on every node with its NODE_RANK.
    launcher=(torchrun --nnodes "${NUM_NODES}" --nproc_per_node "${NUM_GPUS}"
              --node_rank "${NODE_RANK}" --master_addr "${MASTER_ADDR}"
              --master_port "${MASTER_PORT}")
fi
cmd=("${launcher[@]}" "${REPO_DIR}/pretrain_gpt.py" "${gpt_options[@]}")

# pretrain_gpt.py's validation for WORLD_SIZE_TOTAL processes, run here (no torch, no GPU).
check=("${PYTHON}" "${REPO_DIR}/tools/check_pretrain_args.py" --world-size "${WORLD_SIZE_TOTAL}")
if [[ "${DRY_RUN}" != 1 ]]; then
    check+=(--quiet)
fi
set +e
"${check[@]}" -- "${gpt_options[@]}" >&2
check_status=$?
set -e
if [[ "${check_status}" -eq 2 ]]; then
    exit 2                                  # its one line says what is wrong
elif [[ "${check_status}" -ne 0 ]]; then
    echo "could not check the settings: ${PYTHON} tools/check_pretrain_args.py exited with" \
         "code ${check_status}; set PYTHON to the python of the environment that has xmoe" >&2
    exit "${check_status}"
fi

if [[ "${DRY_RUN}" == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    if [[ "${LAUNCHER}" == deepspeed && "${NUM_NODES}" -gt 1 ]]; then
        nodes="ssh (pdsh) to the hosts of ${HOSTFILE} and the same paths on each"
    elif [[ "${NUM_NODES}" -gt 1 ]]; then
        nodes="reaching MASTER_ADDR=${MASTER_ADDR}:${MASTER_PORT} and the same paths on every node"
    else
        nodes="MASTER_PORT=${MASTER_PORT} free"
    fi
    echo "not checked: ${NUM_GPUS} GPU(s) on each of the ${NUM_NODES} node(s) and their memory," \
         "CUDA and NCCL, the ${LAUNCHER} launcher and torch/deepspeed on the nodes, ${nodes}," \
         "the data files' contents" >&2
    exit 0
fi

if ! command -v "${launcher[0]}" > /dev/null; then
    echo "${launcher[0]} not found on PATH (LAUNCHER=${LAUNCHER}): activate the environment" \
         "that has xmoe, torch and deepspeed installed" >&2
    exit 127
fi
mkdir -p "${OUTPUT_DIR}/log" "${TENSORBOARD_DIR}"
echo "${RUN_NAME}: ${WORLD_SIZE_TOTAL} processes (${NUM_NODES} node(s) x ${NUM_GPUS})," \
     "log ${LOG_FILE}"
printf '%q ' "${cmd[@]}" | tee "${LOG_FILE}"
printf '\n' | tee -a "${LOG_FILE}"
cd "${REPO_DIR}"
set +e
"${cmd[@]}" 2>&1 | tee -a "${LOG_FILE}"
launcher_status=${PIPESTATUS[0]}
set -e
if [[ "${launcher_status}" -ne 0 ]]; then
    # The launchers end a failed run with their own traceback (torchrun's ChildFailedError):
    # repeat the run's first error line last, where it is seen. Lines may carry a host prefix.
    first_error=$(grep -m 1 -o 'pretrain_gpt\.py: error.*' "${LOG_FILE}" || true)
    if [[ -n "${first_error}" ]]; then
        echo "${first_error} (log: ${LOG_FILE})" >&2
    else
        exception=$(grep -m 1 -o -E '[A-Za-z_][A-Za-z0-9_.]*(Error|Exception): .*' \
                    "${LOG_FILE}" || true)
        echo "${RUN_NAME}: ${launcher[0]} exited with code ${launcher_status}" \
             "${exception:+(first error: ${exception}) }(log: ${LOG_FILE})" >&2
    fi
    exit "${launcher_status}"
fi
