# Shared by the sbatch templates in this directory (sourced, not run): node roles, the rollout
# servers, the training step, and the supervisor that ends the job as soon as any step fails.
# Every message starts with "[moe_rl/slurm]" so `grep '\[moe_rl/slurm\]' <job log>` tells the story.

log() { printf '[moe_rl/slurm] %s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit "${2:-1}"; }

# The nodes of the allocation, in Slurm's order (never "localhost": every address below is a
# node name that the other nodes resolve).
job_hosts() {
  scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a Slurm job: submit with sbatch}"
}

# A per-job API key for the rollout servers (they listen beyond loopback) unless one is given.
random_key() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }

# newest complete checkpoint of OUTPUT_DIR (what moe_rl.launch resumes from), or nothing
newest_checkpoint() {
  local d newest=""
  for d in "$1"/checkpoints/step_*; do
    [ -e "$d/COMPLETE" ] && newest="$d"
  done
  printf '%s' "$newest"
}

# what moe_rl.launch is about to do with OUTPUT_DIR, in the job log
log_resume_point() {
  local ckpt
  ckpt="$(newest_checkpoint "$OUTPUT_DIR")"
  if [ -n "$ckpt" ]; then
    log "resuming from $ckpt (the newest complete checkpoint)"
  else
    log "no complete checkpoint in $OUTPUT_DIR/checkpoints: starting at step 0"
  fi
}

# step_pids / step_names: the srun steps the supervisor watches
declare -a step_pids=() step_names=()
add_step() { step_pids+=("$1"); step_names+=("$2"); }

# start_servers NODE...: the rollout servers (python -m moe_rl.rollout.sglang_backend serve: the
# run's rollout.sglang section decides each server's flags, port offset and GPU range).
# SERVER_NODES=1: one srun step per node, SERVERS_PER_NODE tasks, each task one server.
# SERVER_NODES=k>1: every k consecutive nodes run one server together (SGLang --nnodes k; the
# first node of the group serves HTTP and is the --dist-init-addr).
# Sets server_urls (the trainer's rollout.client.server_urls).
server_urls=()
start_servers() {
  local nodes=("$@") i g group first
  if ((SERVER_NODES > 1)); then
    ((SERVERS_PER_NODE == 1)) || die "SERVER_NODES=$SERVER_NODES needs SERVERS_PER_NODE=1 (one server spans several nodes)"
    ((${#nodes[@]} % SERVER_NODES == 0)) || die "${#nodes[@]} rollout node(s) (${nodes[*]}) do not split into servers of SERVER_NODES=$SERVER_NODES nodes"
  fi
  for ((g = 0; g < ${#nodes[@]}; g += SERVER_NODES)); do
    group=("${nodes[@]:g:SERVER_NODES}")
    first="${group[0]}"
    local multi=()
    if ((SERVER_NODES > 1)); then
      multi=("rollout.sglang.nnodes=$SERVER_NODES" "rollout.sglang.dist_init_addr=$first:$((SERVER_PORT + 9))")
    fi
    srun --nodes="$SERVER_NODES" --nodelist="$(IFS=,; echo "${group[*]}")" \
      --ntasks="$((SERVERS_PER_NODE * SERVER_NODES))" --ntasks-per-node="$SERVERS_PER_NODE" \
      --kill-on-bad-exit=1 ${STEP_OVERLAP:+--overlap} --open-mode=append \
      --output="$LOG_DIR/rollout-%N-%t.log" \
      "$PYTHON" -m moe_rl.rollout.sglang_backend serve "$CONFIG" \
        "rollout.sglang.model_path=$MODEL_PATH" "rollout.sglang.host=$SERVER_BIND" \
        "rollout.sglang.base_port=$SERVER_PORT" "rollout.sglang.num_servers=$SERVERS_PER_NODE" \
        "rollout.sglang.api_key=$API_KEY" "rollout.sglang.python=$PYTHON" "${multi[@]}" "${RUN_OVERRIDES[@]}" &
    add_step $! "rollout server(s) on ${group[*]} (log $LOG_DIR/rollout-$first-*.log)"
    for ((i = 0; i < SERVERS_PER_NODE; i++)); do
      server_urls+=("http://$first:$((SERVER_PORT + i))")
    done
  done
  log "waiting up to ${HEALTH_DEADLINE_S}s for ${#server_urls[@]} rollout server(s): ${server_urls[*]}"
  local wait_pids=() p
  for p in "${step_pids[@]}"; do wait_pids+=(--pid "$p"); done
  if ! "$PYTHON" -m moe_rl.parallel.watchdog wait --deadline-s "$HEALTH_DEADLINE_S" "${wait_pids[@]}" \
      "${server_urls[@]}"; then
    stop_steps
    die "rollout servers did not come up (see the lines above and $LOG_DIR/rollout-*.log)" 4
  fi
}

# urls_yaml: ["http://a:1","http://b:2"] for a dotted override
urls_yaml() {
  local out="" u
  for u in "$@"; do out+="${out:+,}\"$u\""; done
  printf '[%s]' "$out"
}

# start_training NODES RANKS_PER_NODE ARGS...: one srun step, one task per rank (moe_rl.launch
# reads SLURM_PROCID/SLURM_LOCALID; rendezvous at the first training node, where rank 0 runs;
# the servers join the weight-update group there too, by node name).
start_training() {
  local nodes="$1" per_node="$2"
  shift 2
  export MASTER_ADDR="$TRAIN_MASTER" MASTER_PORT
  srun --nodes="$(wc -w <<<"${nodes//,/ }")" --nodelist="$nodes" --ntasks-per-node="$per_node" \
    --ntasks="$(($(wc -w <<<"${nodes//,/ }") * per_node))" --kill-on-bad-exit=1 ${STEP_OVERLAP:+--overlap} \
    --label "$PYTHON" -m moe_rl.launch "$CONFIG" "output_dir=$OUTPUT_DIR" "weights.group_address=$TRAIN_MASTER" \
    "$@" "${RUN_OVERRIDES[@]}" &
  add_step $! "training on $nodes ($per_node ranks per node, rendezvous $MASTER_ADDR:$MASTER_PORT)"
  train_pid=$!
}

# stop_steps: SIGTERM every step still running (srun passes it to its tasks), SIGKILL after
# STOP_GRACE_S; whatever is left dies with the job.
stop_steps() {
  local p end
  for p in "${step_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  end=$((SECONDS + STOP_GRACE_S))
  for p in "${step_pids[@]}"; do
    while kill -0 "$p" 2>/dev/null && ((SECONDS < end)); do sleep 0.2; done
    kill -KILL "$p" 2>/dev/null || true
  done
}

# Exit codes of the templates: 0 done, 2 bad input (too few nodes, no MODEL_PATH; before any step
# starts), 4 a rollout server failed (startup deadline, or died), 5 the ranks saved a checkpoint
# on SIGUSR1 and stopped (the time-limit warning of `#SBATCH --signal=B:USR1@300`, or
# `scancel --signal=USR1 --batch JOBID`), 143 SIGTERM (scancel, time limit), otherwise the
# training step's own code.
# supervise: wait for the first step to end. Training ending with 0 is success (the servers are
# then stopped); anything else ends the job at once with a non-zero exit code:
#   the training step's own code when a rank failed (srun names the node and task above),
#   4 when a rollout server step ended while training ran.
supervise() {
  local rc i done_i
  trap 'log "SIGTERM (scancel, preemption or time limit): stopping; resubmitting the same command (or --requeue) resumes from the newest complete checkpoint"; stop_steps; exit 143' TERM
  # SIGUSR1: srun passes it on to the training ranks, which save a checkpoint after the step
  # they are in and exit 5 (checkpoint.save_on_signal); `wait -n` returns for the trap, no step ended
  trap 'log "SIGUSR1 (time limit or preemption ahead): the training ranks save a checkpoint after this step and stop"; kill -USR1 "$train_pid" 2>/dev/null || true' USR1
  while :; do
    set +e
    wait -n
    rc=$?
    set -e
    done_i=""
    for i in "${!step_pids[@]}"; do
      kill -0 "${step_pids[$i]}" 2>/dev/null || { done_i="$i"; break; }
    done
    [ -n "$done_i" ] || continue
    if [ "${step_pids[$done_i]}" = "$train_pid" ]; then
      unset 'step_pids[done_i]' 'step_names[done_i]'
      if [ "$rc" = 0 ]; then
        log "training finished; stopping the rollout servers"
        stop_steps
        log "done: metrics in $OUTPUT_DIR/metrics.jsonl, checkpoints in $OUTPUT_DIR/checkpoints"
        exit 0
      fi
      if [ "$rc" = 5 ]; then
        log "training saved a checkpoint on SIGUSR1 and stopped (see its last lines above); resubmitting the same command (or --requeue) resumes from it"
        stop_steps
        exit 5
      fi
      log "FAILED: training step ended with exit code $rc (the srun error above names the node and task that died); ending the job"
      stop_steps
      exit "$rc"
    fi
    log "FAILED: ${step_names[$done_i]} ended with exit code $rc while training was running; ending the job"
    unset 'step_pids[done_i]' 'step_names[done_i]'
    stop_steps
    exit 4
  done
}
