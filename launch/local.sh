#!/usr/bin/env bash
# N CPU processes on this machine as N hosts of one JAX runtime (a multi-host rehearsal on a laptop/CI).
#
#   launch/local.sh --num_processes=2 [--devices_per_process=1] [--port=PORT] [--log_dir=DIR] -- ALPHALLM_ARGS...
#
# Process i gets ALPHALLM_COORDINATOR=localhost:PORT, ALPHALLM_NUM_PROCESSES=N, ALPHALLM_PROCESS_ID=i,
# JAX_PLATFORMS=cpu and JAX_NUM_CPU_DEVICES; `alphallm` joins the runtime at start-up
# (alphallm_jax/utils/distributed.py). Process 0 prints to this terminal, the others to
# LOG_DIR/process_<i>.log (default: a new temporary directory, printed). The exit status is that of the
# first process to fail (the one named), which stops the others at once; Ctrl-C stops them all.
# The command run is $ALPHALLM_CMD if set, else the checkout's .venv/bin/alphallm, else `alphallm` on
# PATH, else `python -m alphallm_jax.cli` ($PYTHON, default python3).
set -euo pipefail

num_processes=""
devices_per_process=1
port=""
log_dir=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num_processes=*) num_processes="${1#*=}" ;;
    --num_processes) num_processes="$2"; shift ;;
    --devices_per_process=*) devices_per_process="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --log_dir=*) log_dir="${1#*=}" ;;
    --) shift; break ;;
    *) echo "launch/local.sh: unknown option $1 (ALPHALLM arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done
if ! [[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || [[ $# -eq 0 ]]; then
  echo "usage: launch/local.sh --num_processes=N [--devices_per_process=K] [--port=P] [--log_dir=DIR] -- ALPHALLM_ARGS..." >&2
  exit 2
fi

# The checkout's own virtual environment (the quickstart's .venv) comes before PATH: it is what a
# fresh clone has installed, while `alphallm` is on PATH only in an activated environment.
venv="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin"
if [[ -n "${ALPHALLM_CMD:-}" ]]; then
  read -r -a cmd <<< "$ALPHALLM_CMD"
elif [[ -x "$venv/alphallm" ]]; then
  cmd=("$venv/alphallm")
elif command -v alphallm > /dev/null 2>&1; then
  cmd=(alphallm)
else
  cmd=("${PYTHON:-python3}" -m alphallm_jax.cli)
fi
py="${PYTHON:-python3}"
[[ -z "${PYTHON:-}" && -x "$venv/python" ]] && py="$venv/python"
if [[ -z "$port" ]]; then  # a free port, chosen by the OS
  port="$("$py" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')"
fi
log_dir="${log_dir:-$(mktemp -d -t alphallm-local-XXXXXX)}"
mkdir -p "$log_dir"
echo "launch/local.sh: $num_processes processes x $devices_per_process CPU device(s), coordinator localhost:$port, logs in $log_dir" >&2

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2> /dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  env_vars=(ALPHALLM_COORDINATOR="localhost:$port" ALPHALLM_NUM_PROCESSES="$num_processes" ALPHALLM_PROCESS_ID="$i"
            JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES="$devices_per_process")
  if [[ $i -eq 0 ]]; then
    env "${env_vars[@]}" "${cmd[@]}" "$@" &
  else
    env "${env_vars[@]}" "${cmd[@]}" "$@" > "$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

# Wait for the first process to end (polled: `wait -n -p` needs bash 5.1, macOS ships 3.2): a process that
# fails is the one reported, and the others are stopped at once rather than left waiting on it.
status=0
finished=()
remaining=${#pids[@]}
while [[ $remaining -gt 0 ]]; do
  for i in "${!pids[@]}"; do
    [[ -n "${finished[$i]:-}" ]] && continue
    kill -0 "${pids[$i]}" 2> /dev/null && continue
    code=0
    wait "${pids[$i]}" || code=$?
    finished[$i]=1
    remaining=$((remaining - 1))
    if [[ $code -ne 0 && $status -eq 0 ]]; then
      status=$code
      where="log: $log_dir/process_$i.log"
      [[ $i -eq 0 ]] && where="its output is above"
      echo "launch/local.sh: process $i exited with status $code ($where); stopping the others" >&2
      stop_all
    fi
  done
  [[ $remaining -gt 0 ]] && sleep 0.2
done
exit "$status"
