# shellcheck shell=bash
# Kubeflow Trainer (TrainJob with the torch runtime) -> launcher variables. Sourced by deploy/launch.sh when
# ST_ADAPTER=kubeflow-trainer (set in deploy/kubernetes/trainjob.yaml); values already set win.
#
# The Trainer's torch plugin injects into every node's trainer container: PET_NNODES, PET_NPROC_PER_NODE
# (a number or "auto"), PET_NODE_RANK (the Job completion index), PET_MASTER_ADDR (node 0's DNS name,
# <trainjob>-node-0-0.<trainjob>) and PET_MASTER_PORT (29400, exposed by its headless Service).

: "${PET_NNODES:?ST_ADAPTER=kubeflow-trainer outside a Kubeflow TrainJob (PET_NNODES is not set)}"
: "${PET_MASTER_ADDR:?PET_MASTER_ADDR is not set}"

export ST_NNODES="${ST_NNODES:-$PET_NNODES}"
if [[ -n "${PET_NODE_RANK:-}" ]]; then export ST_NODE_RANK="${ST_NODE_RANK:-$PET_NODE_RANK}"; fi
export ST_RDZV_ENDPOINT="${ST_RDZV_ENDPOINT:-$PET_MASTER_ADDR:${PET_MASTER_PORT:-29400}}"
# torchrun's "auto" means one process per CPU core on a machine without GPUs; leave the launcher's default
# (visible GPUs, else 1) in charge then.
if [[ -z "${ST_NPROC_PER_NODE:-}" && -n "${PET_NPROC_PER_NODE:-}" && "$PET_NPROC_PER_NODE" != auto ]]; then
	export ST_NPROC_PER_NODE="$PET_NPROC_PER_NODE"
fi
# The rendezvous id only needs to be the same on all nodes; node 0's DNS name is unique to this TrainJob.
export ST_RDZV_ID="${ST_RDZV_ID:-${PET_MASTER_ADDR%%.*}}"
