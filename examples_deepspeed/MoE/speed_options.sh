# COMPILE and DISPATCH -> pretrain_gpt.py flags, for gpt_launch_common.sh and ds_study_small.sh;
# sourced, not run. Reads COMPILE, DISPATCH (empty: the defaults below), EP_PARALLEL_SIZE and
# SPEED_MOE (true when the runs have MoE layers); sets the bash array speed_options. A bad value
# ends the script with one line and exit code 2.
#
# COMPILE: routing (default: each MoE layer's routing and dispatch plan torch.compile'd),
# routing-graphs (the same, replayed as CUDA graphs: fewer host launches; not with
# ACTIVATION_CHECKPOINT=true), model (the whole model compiled, sync-free dispatch: fastest on
# one H200, not with expert parallelism) or none.
# DISPATCH (MoE layers): sync-free (default with EP_PARALLEL_SIZE 1: tokens go to a buffer sized
# by the capacity bound, so no host sync per MoE layer; ~2 GiB more peak memory for XMoE-small
# at micro-batch 16, and ~1.2x the eager tokens/s on one H200) or exact (buffers sized by the
# kept rows, read on the host each layer; the only one expert parallelism can use, so the
# default when EP_PARALLEL_SIZE > 1). COMPILE=model is always sync-free.
COMPILE=${COMPILE:-routing}
case "${COMPILE}" in
    none) speed_options=() ;;
    routing) speed_options=(--moe-compile-routing) ;;
    routing-graphs) speed_options=(--moe-routing-cuda-graphs) ;;
    model) speed_options=(--compile) ;;
    *) echo "COMPILE must be routing, routing-graphs, model or none, got '${COMPILE}'" >&2
       exit 2 ;;
esac
DISPATCH_DEFAULT=sync-free
if [[ "${EP_PARALLEL_SIZE:-1}" -gt 1 ]]; then DISPATCH_DEFAULT=exact; fi
DISPATCH=${DISPATCH:-${DISPATCH_DEFAULT}}
case "${DISPATCH}" in
    sync-free) if [[ "${SPEED_MOE}" == true ]]; then
                   speed_options+=(--moe-sync-free-dispatch)
               fi ;;
    exact) if [[ "${COMPILE}" == model ]]; then
               echo "DISPATCH=exact cannot be combined with COMPILE=model (the compiled model" \
                    "needs the sync-free dispatch)" >&2
               exit 2
           fi ;;
    *) echo "DISPATCH must be sync-free or exact, got '${DISPATCH}'" >&2; exit 2 ;;
esac
