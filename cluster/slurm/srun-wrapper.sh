#!/usr/bin/env bash
# Run by `srun` once per task: maps SLURM's view of the task to the torch.distributed /
# DeepSpeed variables, then execs the command (through MTSCALE_CONTAINER when set).
#
#   srun cluster/slurm/srun-wrapper.sh python -m mtscale.pretrain --config ...
#
#   RANK        = SLURM_PROCID        (global task index)
#   LOCAL_RANK  = SLURM_LOCALID       (task index on this node -> cuda:LOCAL_RANK)
#   WORLD_SIZE  = SLURM_NTASKS        (tasks in this step)
#   LOCAL_WORLD_SIZE = tasks on this node, NODE_RANK = SLURM_NODEID
#   MASTER_ADDR = first host of SLURM_JOB_NODELIST, MASTER_PORT = 15000 + job id mod 20000
# No ssh, no pdsh: srun starts every task itself. Values already exported (e.g. MASTER_PORT
# from the batch script) are kept.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=env.sh
source "$here/env.sh"

[[ -n "${SLURM_PROCID:-}" ]] || mtscale_die "srun-wrapper.sh: SLURM_PROCID is not set, expected to be started by srun inside a job"
[[ $# -gt 0 ]] || mtscale_die "srun-wrapper.sh: no command given, expected e.g. 'srun-wrapper.sh python -m mtscale.pretrain ...'"

ntasks="${SLURM_STEP_NUM_TASKS:-${SLURM_NTASKS:-1}}"
# SLURM_STEP_TASKS_PER_NODE looks like "2(x3),1": the count on *this* node is what we need.
local_ws=""
if [[ -n "${SLURM_STEP_TASKS_PER_NODE:-}" && -n "${SLURM_NODEID:-}" ]]; then
    local_ws=$(awk -v spec="$SLURM_STEP_TASKS_PER_NODE" -v node="$SLURM_NODEID" 'BEGIN {
        n = split(spec, parts, ","); idx = 0
        for (i = 1; i <= n; i++) {
            cnt = parts[i]; rep = 1
            if (match(parts[i], /\(x[0-9]+\)/)) { rep = substr(parts[i], RSTART + 2, RLENGTH - 3); cnt = substr(parts[i], 1, RSTART - 1) }
            for (r = 0; r < rep; r++) { if (idx == node) { print cnt; exit } idx++ }
        }
    }')
fi
export RANK="$SLURM_PROCID"
export LOCAL_RANK="${SLURM_LOCALID:-0}"
export WORLD_SIZE="$ntasks"
export LOCAL_WORLD_SIZE="${local_ws:-$ntasks}"
export NODE_RANK="${SLURM_NODEID:-0}"
export MASTER_ADDR="${MASTER_ADDR:-$(mtscale_first_host)}"
export MASTER_PORT="${MASTER_PORT:-$(mtscale_master_port)}"

if [[ "$RANK" == 0 ]]; then
    mtscale_log "rank 0 of $WORLD_SIZE ($LOCAL_WORLD_SIZE per node), master $MASTER_ADDR:$MASTER_PORT: $*"
fi
# USR1 is the "checkpoint and stop" request (pretrain.sbatch forwards it). Ignored until the
# program installs its own handler (mtscale's StopFlag overrides this disposition): a USR1 that
# lands while Python is still importing must not kill the task. The batch script repeats it.
trap '' USR1
# MTSCALE_CONTAINER: a command prefix such as "apptainer exec --nv /shared/mtscale.sif" (empty: none).
# shellcheck disable=SC2086
exec ${MTSCALE_CONTAINER:-} "$@"
