#!/usr/bin/env bash
# Run one `alphallm` command on every worker of a TPU-VM pod slice (the same command everywhere; JAX's
# own cluster detection wires the processes together through jax.distributed.initialize()).
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [--repo=DIR] [--setup] -- ALPHALLM_ARGS...
#
# e.g. launch/tpu_pod.sh --tpu=alphallm-v5p-64 --zone=us-east5-a -- \
#        train-policy --config=configs/llama2_70b_gsm8k.py:v5p-64 --config.model.checkpoint=/mnt/B/llama2-70b \
#        --config.policy_train.trees_dir=/mnt/B/runs/70b/iter_1/search/trees --workdir=/mnt/B/runs/70b_sft \
#        --train.method=sft
#
# Every stage spans the pod's hosts on the config's mesh (a multi-host preset's, e.g. `:v5p-64`): training
# is one SPMD program, and sampling runs on every host together, each making the same calls, process 0
# writing the results (README, "Multi-host"). Without a mesh, sampling splits the problems between the
# hosts, each on its first chip.
#
# --repo: the checkout on every worker (default ~/alphallm_jax); --setup first creates its virtual
# environment and installs the project there (`pip install -e .`); the checkout itself must already be
# on every worker (e.g. `gcloud compute tpus tpu-vm scp --recurse --worker=all`). Every worker sets
# ALPHALLM_DISTRIBUTED=auto, so `alphallm` calls jax.distributed.initialize() with no arguments (TPU
# pods are detected). The workdir must be shared by all workers, at the same path on each: a bucket
# mounted with gcsfuse (`gcsfuse --implicit-dirs B /mnt/B` on every worker; checkpoints and workdirs are
# filesystem paths, as orbax, safetensors and SentencePiece write them, and `alphallm` refuses a gs:// URL
# there; data files may be URLs). Process 0 merges what the others write there.
# gcloud streams every worker's output back to this terminal.
set -euo pipefail

tpu="" zone="" project="" repo='~/alphallm_jax' setup=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --repo=*) repo="${1#*=}" ;;
    --setup) setup=1 ;;
    --) shift; break ;;
    *) echo "launch/tpu_pod.sh: unknown option $1 (ALPHALLM arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$tpu" || -z "$zone" || $# -eq 0 ]]; then
  echo "usage: launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [--repo=DIR] [--setup] -- ALPHALLM_ARGS..." >&2
  exit 2
fi
if ! command -v gcloud > /dev/null 2>&1; then
  echo "launch/tpu_pod.sh: gcloud is not installed (https://cloud.google.com/sdk)" >&2
  exit 2
fi

args=""
for a in "$@"; do args+=" $(printf '%q' "$a")"; done
# The checkout's path is quoted for the remote shell, except a leading ~/ (the remote home).
if [[ "$repo" == "~/"* ]]; then
  remote="cd ~/$(printf '%q' "${repo#\~/}")"
else
  remote="cd $(printf '%q' "$repo")"
fi
if [[ $setup -eq 1 ]]; then
  remote+=" && python3 -m venv .venv && .venv/bin/pip install --quiet --upgrade pip && .venv/bin/pip install --quiet -e . 'jax[tpu]'"
fi
remote+=" && ALPHALLM_DISTRIBUTED=auto .venv/bin/alphallm$args"

gcloud_args=(compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$remote")
[[ -n "$project" ]] && gcloud_args+=(--project="$project")
echo "launch/tpu_pod.sh: on every worker of $tpu: $remote" >&2
exec gcloud "${gcloud_args[@]}"
