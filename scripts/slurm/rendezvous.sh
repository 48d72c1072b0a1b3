# Sourced by scripts/launch.sh inside a slurm allocation: where the ranks of this job
# meet. MASTER_ADDR is the job's first host; MASTER_PORT comes from the job id, so two
# jobs sharing a node do not collide, and a requeued job (same id) gets the same one.
# A host that cannot be resolved stops the launch: localhost would let each node's
# ranks wait for the others apart until the timeout.
if ! _hosts=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}"); then
  echo "error: 'scontrol show hostnames \"${SLURM_JOB_NODELIST:-}\"' failed:" \
    "cannot find the rendezvous host (MASTER_ADDR) of job ${SLURM_JOB_ID}" >&2
  exit 1
fi
MASTER_ADDR=${_hosts%%$'\n'*}
if [ -z "$MASTER_ADDR" ]; then
  echo "error: 'scontrol show hostnames \"${SLURM_JOB_NODELIST:-}\"' printed no host:" \
    "cannot find the rendezvous host (MASTER_ADDR) of job ${SLURM_JOB_ID}" >&2
  exit 1
fi
MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT
unset _hosts
