# shellcheck shell=bash
# Helpers shared by the mtscale SLURM templates (sourced, never run). See cluster/README.md.
#
#   mtscale_setup           run the site's environment line, pick the device mode, set thread counts
#   mtscale_first_host      first host of the job's node list (the rendezvous / Ray head)
#   mtscale_master_port     the torch.distributed port derived from the job id
#   mtscale_node_ip         this node's address for Ray (MTSCALE_IFNAME picks the interface)
#   mtscale_die MSG         one-line error on stderr, exit 2
#
# Everything here reads only variables documented in cluster/README.md and SLURM's own.

mtscale_log() { printf '[mtscale-slurm %s %s] %s\n' "$(date +%H:%M:%S)" "$(hostname -s)" "$*" >&2; }
mtscale_die() { printf 'mtscale-slurm: error: %s\n' "$*" >&2; exit 2; }

# MTSCALE_ENV_SETUP: one shell line that makes `python` / `mtscale` / `ray` the right ones, e.g.
#   "source $HOME/mtscale/.venv/bin/activate"   or   "module load cuda/12.4 && conda activate mt"
# MTSCALE_DEVICE: cuda (default) | cpu | auto.  cpu: gloo, fp32, DeepSpeed's CPU accelerator.
mtscale_setup() {
    if [[ -n "${MTSCALE_ENV_SETUP:-}" ]]; then
        # shellcheck disable=SC1090
        eval "$MTSCALE_ENV_SETUP" || mtscale_die "MTSCALE_ENV_SETUP: '$MTSCALE_ENV_SETUP' failed (exit $?)"
    fi
    command -v python >/dev/null || mtscale_die "python: not found on PATH after MTSCALE_ENV_SETUP='${MTSCALE_ENV_SETUP:-}', expected the mtscale environment"
    python -c 'import mtscale' 2>/dev/null \
        || mtscale_die "python ($(command -v python)): cannot import mtscale, expected MTSCALE_ENV_SETUP to activate its environment"
    export MTSCALE_DEVICE="${MTSCALE_DEVICE:-cuda}"
    case "$MTSCALE_DEVICE" in
        cpu) export DS_ACCELERATOR=cpu CUDA_VISIBLE_DEVICES="" ;;
        cuda | auto) ;;
        *) mtscale_die "MTSCALE_DEVICE: found '$MTSCALE_DEVICE', expected cuda, cpu or auto" ;;
    esac
    # srun (SLURM >= 22.05) no longer inherits the job's --cpus-per-task: without this every task
    # (and its loader workers) could be bound to one core. sbatch exports SLURM_CPUS_PER_TASK.
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        export SRUN_CPUS_PER_TASK="${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}"
    fi
    # One OpenMP/MKL thread pool per task, sized to the task's CPUs (not the whole node).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    export MKL_NUM_THREADS="${MKL_NUM_THREADS:-$OMP_NUM_THREADS}"
    if [[ -n "${MTSCALE_IFNAME:-}" ]]; then  # the fabric interface for NCCL and gloo
        export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$MTSCALE_IFNAME}"
        export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$MTSCALE_IFNAME}"
    fi
    export PYTHONUNBUFFERED=1
    mtscale_log "job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-$(hostname -s)}:" \
        "device=$MTSCALE_DEVICE python=$(command -v python) OMP_NUM_THREADS=$OMP_NUM_THREADS" \
        "SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-unset}"
}

mtscale_first_host() {
    local list="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
    [[ -n "$list" ]] || { hostname -s; return; }
    scontrol show hostnames "$list" | head -n 1
}

# Same formula as mtscale.dist.port_from_job_id: 15000 + job id mod 20000. Every task of a
# job agrees without talking; two jobs on one node get different ports.
mtscale_master_port() {
    local id="${SLURM_JOB_ID:-0}"
    echo $(( 15000 + ${id//[^0-9]/} % 20000 ))
}

mtscale_node_ip() {
    local ip=""
    if [[ -n "${MTSCALE_IFNAME:-}" ]]; then
        ip=$(ip -4 -o addr show dev "$MTSCALE_IFNAME" 2>/dev/null | awk '{split($4, a, "/"); print a[1]; exit}')
        [[ -n "$ip" ]] || mtscale_die "MTSCALE_IFNAME: interface '$MTSCALE_IFNAME' has no IPv4 address on $(hostname -s), expected one of: $(ls /sys/class/net | tr '\n' ' ')"
    else
        ip=$(hostname -I 2>/dev/null | awk '{print $1}')
        [[ -n "$ip" ]] || ip=$(python -c 'import socket; print(socket.gethostbyname(socket.gethostname()))')
    fi
    echo "$ip"
}
