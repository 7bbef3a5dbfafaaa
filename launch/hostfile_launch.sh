#!/usr/bin/env bash
# Multi-node GOAT training with DeepSpeed's own launcher and an MPI-style hostfile, for clusters
# without Slurm. Run it on the first host; it runs
#   deepspeed --hostfile H --num_nodes N --num_gpus G --master_port P launch/train.py ...
# which starts one launcher per host over pdsh (ssh). Requirements (see docs/CLUSTER.md):
#   * passwordless ssh from this host to every host in the file (and to itself), and pdsh;
#   * the repository and the Python environment at the same path on every host (shared FS);
#   * variables the workers need (OMP_NUM_THREADS, HF_*, DS_ACCELERATOR, ...) listed as
#     KEY=VALUE lines in ./.deepspeed_env or ~/.deepspeed_env: DeepSpeed forwards only NCCL_*,
#     PYTHON*, UCX_*, MV2_* and MLFLOW_* from this shell.
#
#   launch/hostfile_launch.sh --hostfile hosts.txt [options] [section.key=value ...]
#
# Hostfile: one "hostname slots=GPUS" per line, '#' comments allowed, e.g.
#   gpu07 slots=8
#   gpu08 slots=8
#
# Options (each falls back to the environment variable named, then to a default):
#   --hostfile H          HOSTFILE (required)
#   --num-nodes N         NUM_NODES; default: every host in the hostfile (the first N are used)
#   --gpus-per-node G     GPUS_PER_NODE; default: the smallest slots= among the hosts used
#   --config PATH         RUN_CONFIG; default: launch/train.py's embedded demo (configs/demo.yaml)
#   --ds-config PATH      DS_CONFIG; default: ds_configs/zero2.json
#   --output-dir DIR      OUTPUT_DIR; default: the run config's train.output_dir
#   --master-addr HOST    MASTER_ADDR; default: DeepSpeed asks the first host (ssh hostname -I)
#   --master-port PORT    MASTER_PORT; default: 29500
#   --dry-run             print the deepspeed command and run nothing
#   section.key=value     run-config overrides, passed through to launch/train.py
# Environment: DEEPSPEED, the deepspeed executable (default: .venv/bin/deepspeed of the
# repository, else deepspeed on PATH).
# Stopping early with a checkpoint: SIGTERM (or SIGUSR1) to the workers (pkill -TERM -f
# launch/train.py on each host), or SIGTERM to deepspeed.launcher.launch on each host, which
# passes it on and SIGKILLs its workers 30 s later. The ranks finish their step, checkpoint
# and exit 75; rerun this command to continue (docs/CLUSTER.md, "Preemption ...").
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { echo "hostfile_launch.sh: error: $*" >&2; exit 2; }

abspath() {
    # the launcher cds to this folder on every host, but absolute paths leave no doubt
    case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$PWD/$1" ;; esac
}

hostfile="${HOSTFILE:-}"
num_nodes="${NUM_NODES:-}"
gpus="${GPUS_PER_NODE:-}"
config="${RUN_CONFIG:-}"
ds_config="${DS_CONFIG:-$ROOT/ds_configs/zero2.json}"
output_dir="${OUTPUT_DIR:-}"
master_addr="${MASTER_ADDR:-}"
master_port="${MASTER_PORT:-29500}"
dry_run=0
overrides=()

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --hostfile)      need_value "$@"; hostfile="$2"; shift 2 ;;
        --num-nodes)     need_value "$@"; num_nodes="$2"; shift 2 ;;
        --gpus-per-node) need_value "$@"; gpus="$2"; shift 2 ;;
        --config)        need_value "$@"; config="$2"; shift 2 ;;
        --ds-config)     need_value "$@"; ds_config="$2"; shift 2 ;;
        --output-dir)    need_value "$@"; output_dir="$2"; shift 2 ;;
        --master-addr)   need_value "$@"; master_addr="$2"; shift 2 ;;
        --master-port)   need_value "$@"; master_port="$2"; shift 2 ;;
        --dry-run)       dry_run=1; shift ;;
        -h|--help)       sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        --)              shift; overrides+=("$@"); break ;;
        -*)              die "unknown option $1 (see --help)" ;;
        *)               overrides+=("$1"); shift ;;
    esac
done

[[ -n "$hostfile" ]] || die "--hostfile (or HOSTFILE) is required"
[[ -f "$hostfile" ]] || die "hostfile $hostfile not found"
hostfile="$(abspath "$hostfile")"

# "host slots=N" lines, as DeepSpeed parses them; comments and blank lines skipped
mapfile -t slots < <(awk '!/^[[:space:]]*(#|$)/ {
    n = ""; for (i = 2; i <= NF; i++) if ($i ~ /^slots=[0-9]+$/) n = substr($i, 7)
    print n }' "$hostfile")
[[ ${#slots[@]} -gt 0 ]] || die "no hosts in $hostfile"
num_nodes="${num_nodes:-${#slots[@]}}"
[[ "$num_nodes" =~ ^[1-9][0-9]*$ ]] || die "number of nodes must be a positive integer, not '$num_nodes'"
(( num_nodes <= ${#slots[@]} )) || die "$num_nodes nodes requested but $hostfile lists ${#slots[@]}"
if [[ -z "$gpus" ]]; then
    for ((i = 0; i < num_nodes; i++)); do
        [[ -n "${slots[i]}" ]] || die "host $((i + 1)) of $hostfile has no slots=N; pass --gpus-per-node"
        if [[ -z "$gpus" ]] || (( slots[i] < gpus )); then gpus="${slots[i]}"; fi
    done
fi
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "GPUs per node must be a positive integer, not '$gpus'"
[[ "$master_port" =~ ^[1-9][0-9]*$ ]] || die "master port must be a positive integer, not '$master_port'"

deepspeed_bin="${DEEPSPEED:-}"
if [[ -z "$deepspeed_bin" ]]; then
    if [[ -x "$ROOT/.venv/bin/deepspeed" ]]; then deepspeed_bin="$ROOT/.venv/bin/deepspeed"; else deepspeed_bin=deepspeed; fi
fi

cmd=("$deepspeed_bin" --hostfile "$hostfile" --num_nodes "$num_nodes" --num_gpus "$gpus"
     --master_port "$master_port")
[[ -z "$master_addr" ]] || cmd+=(--master_addr "$master_addr")
cmd+=("$ROOT/launch/train.py")
[[ -z "$config" ]] || cmd+=(--config "$(abspath "$config")")
cmd+=(--ds_config "$(abspath "$ds_config")")
[[ -z "$output_dir" ]] || cmd+=(--output_dir "$(abspath "$output_dir")")
cmd+=(${overrides[@]+"${overrides[@]}"})

if (( dry_run )); then
    printf '%q ' "${cmd[@]}" | sed 's/ $//'
    echo
    exit 0
fi
exec "${cmd[@]}"
