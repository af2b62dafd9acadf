#!/bin/bash
# A phalanx job under PBS with mpiexec: the coordinator on the first node, one worker per rank,
# the ranks beyond the first WORLD waiting as hot spares.
#   qsub examples/pbs.sh   (overrides: qsub -v OVERRIDES="train.max_steps=100" examples/pbs.sh)
# The shipped config runs on 1 to 4 ranks (its 16 sequences per step in 4 micro-batches). Ranks
# beyond WORLD (default: the lines of PBS_NODEFILE - SPARES, SPARES default 0) join as hot
# spares: 4 ranks and a spare are `qsub -l select=5:ncpus=8 -v SPARES=1 examples/pbs.sh`.
#
# Preemption (C-8): `qsig -s TERM JOBID` signals this script only (the job's session leader). It
# asks the workers to stop: they save a checkpoint after the next step, commit it through the
# coordinator (which is therefore left running until they are gone) and exit with code 6, and
# so does the script. At the walltime and on qdel, PBS signals every process of the job, the
# coordinator included, and kills them kill_delay seconds later, so a save may not commit then:
# send the qsig ahead of the walltime.
#
# Exit codes: 0 the run is complete (train.max_steps), 6 preempted with a committed checkpoint
# of its last step ("resume me"), anything else a failure (see the job's output).
#
# A campaign longer than any job (C-6) is a chain of jobs that each resume from the newest
# committed checkpoint in run.dir (the first one, finding none, starts at step 0):
#   jid=$(qsub -v OVERRIDES="run.resume=true" examples/pbs.sh)
#   jid=$(qsub -W depend=afterany:$jid -v OVERRIDES="run.resume=true" examples/pbs.sh)
#   ...
#PBS -N phalanx
#PBS -l select=4:ncpus=8
#PBS -l walltime=24:00:00
set -euo pipefail
cd "$PBS_O_WORKDIR"
CONFIG=${CONFIG:-configs/shakespeare-char.toml}
PHALANX=${PHALANX:-phalanx}
read -r -a overrides <<< "${OVERRIDES:-}"
# Like torchrun: MASTER_PORT is the coordinator's port.
export MASTER_PORT=${MASTER_PORT:-7070}
export PHALANX_JOB_TOKEN=${PHALANX_JOB_TOKEN:-$(head -c16 /dev/urandom | od -An -tx1 | tr -d ' \n')}
NRANKS=$(wc -l < "$PBS_NODEFILE")
SPARES=${SPARES:-0}
WORLD=${WORLD:-$((NRANKS - SPARES))}
head_node=$(head -n1 "$PBS_NODEFILE")
# PBS runs this script on the first node of PBS_NODEFILE: the coordinator runs here, a child
# that the script can stop (and wait for) once the workers are gone.
"$PHALANX" coordinator --bind "0.0.0.0:$MASTER_PORT" --world "$WORLD" --config "$CONFIG" \
  ${overrides[@]+"${overrides[@]}"} &
coordinator=$!
trap 'kill "$coordinator" 2>/dev/null || true; wait "$coordinator" 2>/dev/null || true' EXIT
# mpiexec sets PMI_RANK/PMI_SIZE (workers log them as hints) and PALS_LOCAL_RANKID or
# PMI_LOCAL_RANK (a worker's GPU); workers retry until the coordinator answers; those with
# PMI_RANK >= WORLD join as spares. mpiexec passes a SIGTERM on to the ranks.
mpiexec -n "$NRANKS" --ppn 1 --env PHALANX_JOB_TOKEN "$PHALANX_JOB_TOKEN" \
  --env PHALANX "$PHALANX" --env CONFIG "$CONFIG" --env WORLD "$WORLD" \
  --env COORDINATOR "http://$head_node:$MASTER_PORT" \
  bash -c '
    role=(); ((PMI_RANK < WORLD)) || role=(--spare)
    exec "$PHALANX" worker "${role[@]}" --coordinator "$COORDINATOR" --config "$CONFIG" "$@"' \
  phalanx-worker ${overrides[@]+"${overrides[@]}"} &
workers=$!
asked=0
# Ask once: a launcher may take a second signal as "kill the ranks now".
stop() { ((asked++)) || kill -TERM "$workers" 2>/dev/null || true; }
trap stop TERM INT
status=0
wait "$workers" || status=$?
# A trapped signal ends `wait` early (status 128 + signal) while mpiexec waits for its ranks.
while kill -0 "$workers" 2>/dev/null; do
  status=0
  wait "$workers" || status=$?
done
exit "$status"
