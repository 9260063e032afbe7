# shellcheck shell=bash
# AWS Batch multi-node parallel job -> launcher variables. Sourced by deploy/launch.sh when ST_ADAPTER=aws-batch
# (set in deploy/aws/batch-job-definition.json); values already set in the job's environment win.
#
# Batch sets on every node: AWS_BATCH_JOB_NUM_NODES, AWS_BATCH_JOB_NODE_INDEX, AWS_BATCH_JOB_MAIN_NODE_INDEX,
# AWS_BATCH_JOB_ID (<job id>#<node index> on a node of a multi-node job), and on every node except the main
# one AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS. The main node hosts the rendezvous store (node rank 0).

: "${AWS_BATCH_JOB_NUM_NODES:?ST_ADAPTER=aws-batch outside an AWS Batch multi-node job (AWS_BATCH_JOB_NUM_NODES is not set)}"
: "${AWS_BATCH_JOB_NODE_INDEX:?AWS_BATCH_JOB_NODE_INDEX is not set}"
: "${AWS_BATCH_JOB_MAIN_NODE_INDEX:?AWS_BATCH_JOB_MAIN_NODE_INDEX is not set}"

export ST_NNODES="${ST_NNODES:-$AWS_BATCH_JOB_NUM_NODES}"
# Rotate the indices so that the main node is rank 0 whatever its index.
export ST_NODE_RANK="${ST_NODE_RANK:-$(((AWS_BATCH_JOB_NODE_INDEX - AWS_BATCH_JOB_MAIN_NODE_INDEX + AWS_BATCH_JOB_NUM_NODES) % AWS_BATCH_JOB_NUM_NODES))}"
if [[ -z "${ST_RDZV_ENDPOINT:-}" ]]; then
	# The main node is told is_host=1 and serves the store itself; it reaches it on localhost.
	export ST_RDZV_ENDPOINT="${AWS_BATCH_JOB_MAIN_NODE_PRIVATE_IPV4_ADDRESS:-localhost}:${ST_RDZV_PORT:-29400}"
fi
if [[ -n "${AWS_BATCH_JOB_ID:-}" ]]; then
	export ST_RDZV_ID="${ST_RDZV_ID:-${AWS_BATCH_JOB_ID%%#*}}"
fi
