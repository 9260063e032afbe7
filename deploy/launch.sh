#!/usr/bin/env bash
# streamtotal launcher: the one script every scheduler adapter in deploy/ ends in.
#
# It turns a few environment variables into one torchrun command and execs it:
#
#   torchrun --nnodes N --nproc-per-node P --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID
#            [--rdzv-conf is_host=0|1] --max-restarts R -m streamtotal train STORE... --out RUN_DIR --resume
#            [--config FILE] [ARGS...]
#
# A single node without ST_RDZV_ENDPOINT runs `torchrun --standalone` instead of the c10d rendezvous.
# Every (re)start passes --resume: the trainer continues from the newest RUN_DIR/ckpt-*.pt, or starts fresh
# when there is none, so a restarted or requeued job picks up where it stopped. RUN_DIR must therefore be
# on storage that every node and every restart sees.
#
# Environment (required: ST_STORES, ST_RUN_DIR; ST_RDZV_ENDPOINT when ST_NNODES is not 1):
#   ST_STORES          Zarr stores / .h5ad files, separated by whitespace (paths or URLs, no spaces inside)
#   ST_RUN_DIR         run directory: checkpoints, metrics, model.pt (shared storage)
#   ST_CONFIG          TOML run config (optional)
#   ST_NNODES          number of nodes, or MIN:MAX for an elastic job (default 1)
#   ST_NPROC_PER_NODE  processes per node (default: visible GPUs, from CUDA_VISIBLE_DEVICES or nvidia-smi;
#                      1 without GPUs). torchrun's auto/gpu/cpu are accepted too.
#   ST_NODE_RANK       this node's rank; only node 0 hosts the rendezvous store (--rdzv-conf is_host).
#                      Unset: torchrun decides by matching the endpoint's host name against this machine.
#   ST_RDZV_ENDPOINT   HOST:PORT of the c10d rendezvous (node 0's address; port 29400 by convention)
#   ST_RDZV_ID         rendezvous id, the same on every node (default streamtotal; adapters use the job id)
#   ST_MAX_RESTARTS    worker-group restarts torchrun attempts after a failure (default 3)
#   ST_ADAPTER         aws-batch | kubeflow-trainer: first map that scheduler's environment onto ST_*
#                      (sources deploy/aws/batch-env.sh or deploy/kubernetes/trainer-env.sh)
#   ST_TORCHRUN        torchrun executable (default torchrun)
#   ST_DRY_RUN=1       print the command (shell-quoted, one line) instead of running it
# Arguments after the script name are passed to `streamtotal train` (e.g. --epochs 50 --batch-size 512).
#
# Signals: the launcher execs torchrun, so a SIGTERM (Kubernetes, scancel, spot reclaim) reaches torchrun
# itself, which forwards it to every worker; the trainer writes a checkpoint and exits. torchrun forwards
# SIGUSR1 too (SLURM's warning before the time limit) from torch 2.9 on: PET_SIGNALS_TO_HANDLE (torchrun's
# --signals-to-handle) is set below; older torch ignores it and is killed by SIGUSR1, which is why the
# SLURM script turns its SIGUSR1 into a SIGTERM for the job step.
set -euo pipefail

die() {
	echo "streamtotal launch.sh: error: $*" >&2
	exit 2
}

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

case "${ST_ADAPTER:-}" in
"") ;;
aws-batch)
	# shellcheck source=SCRIPTDIR/aws/batch-env.sh
	source "$here/aws/batch-env.sh"
	;;
kubeflow-trainer)
	# shellcheck source=SCRIPTDIR/kubernetes/trainer-env.sh
	source "$here/kubernetes/trainer-env.sh"
	;;
*) die "ST_ADAPTER=$ST_ADAPTER is not one of: aws-batch, kubeflow-trainer" ;;
esac

visible_gpus() {
	if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
		local ids
		IFS=',' read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
		if [[ ${#ids[@]} -eq 0 || "${ids[0]}" == "-1" ]]; then echo 0; else echo "${#ids[@]}"; fi
	elif command -v nvidia-smi >/dev/null 2>&1; then
		nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
	else
		echo 0
	fi
}

[[ -n "${ST_STORES:-}" ]] || die "ST_STORES is not set: give the Zarr stores / .h5ad files to train on, separated by spaces"
[[ -n "${ST_RUN_DIR:-}" ]] || die "ST_RUN_DIR is not set: give the run directory (checkpoints, model.pt) on shared storage"
read -r -a stores <<<"$ST_STORES"
[[ ${#stores[@]} -gt 0 ]] || die "ST_STORES is blank"

nnodes="${ST_NNODES:-1}"
[[ "$nnodes" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || die "ST_NNODES=$nnodes is not a node count (N or MIN:MAX)"
max_restarts="${ST_MAX_RESTARTS:-3}"
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "ST_MAX_RESTARTS=$max_restarts is not a non-negative integer"

nproc="${ST_NPROC_PER_NODE:-}"
if [[ -z "$nproc" ]]; then
	nproc="$(visible_gpus)"
	[[ "$nproc" -ge 1 ]] || nproc=1
fi
[[ "$nproc" =~ ^([1-9][0-9]*|auto|gpu|cpu)$ ]] || die "ST_NPROC_PER_NODE=$nproc is not a process count (or auto, gpu, cpu)"

cmd=("${ST_TORCHRUN:-torchrun}")
if [[ "$nnodes" == 1 && -z "${ST_RDZV_ENDPOINT:-}" ]]; then
	cmd+=(--standalone --nnodes 1 --nproc-per-node "$nproc")
else
	[[ -n "${ST_RDZV_ENDPOINT:-}" ]] ||
		die "ST_RDZV_ENDPOINT is not set: ST_NNODES=$nnodes needs the rendezvous HOST:PORT (node 0's address, e.g. node0:29400)"
	[[ "$ST_RDZV_ENDPOINT" =~ ^[^:[:space:]]+:[0-9]+$ ]] || die "ST_RDZV_ENDPOINT=$ST_RDZV_ENDPOINT is not HOST:PORT"
	cmd+=(--nnodes "$nnodes" --nproc-per-node "$nproc"
		--rdzv-backend c10d --rdzv-endpoint "$ST_RDZV_ENDPOINT" --rdzv-id "${ST_RDZV_ID:-streamtotal}")
	if [[ -n "${ST_NODE_RANK:-}" ]]; then
		[[ "$ST_NODE_RANK" =~ ^[0-9]+$ ]] || die "ST_NODE_RANK=$ST_NODE_RANK is not a non-negative integer"
		if [[ "$ST_NODE_RANK" -eq 0 ]]; then cmd+=(--rdzv-conf is_host=1); else cmd+=(--rdzv-conf is_host=0); fi
	fi
fi
cmd+=(--max-restarts "$max_restarts" -m streamtotal train "${stores[@]}" --out "$ST_RUN_DIR" --resume)
if [[ -n "${ST_CONFIG:-}" ]]; then cmd+=(--config "$ST_CONFIG"); fi
cmd+=("$@")

export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"

if [[ "${ST_DRY_RUN:-0}" == 1 ]]; then
	printf '%q' "${cmd[0]}"
	printf ' %q' "${cmd[@]:1}"
	printf '\n'
	exit 0
fi
exec "${cmd[@]}"
