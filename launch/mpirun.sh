#!/usr/bin/env bash
# Launch a command on N ranks with mpirun, the way distckpt and MindSpore expect.
#
#   launch/mpirun.sh [options] -- command [args...]
#
# Options:
#   -n, --np N            number of ranks (default 1)
#   --hostfile FILE       Open MPI hostfile for multi-node jobs ("host slots=8" per line)
#   --device D            ascend | gpu | cpu (default cpu)
#   --log-dir DIR         per-rank logs DIR/rank_<r>.log (output still shown on the console)
#   --ms-scheduler        cpu only: also start MindSpore's dynamic-cluster scheduler so that
#                         mindspore.communication.init() works in every rank
#   --gpu-isolation on|off  gpu only (default on): each rank sees one GPU
#                         (CUDA_VISIBLE_DEVICES=<its local rank>, DEVICE_ID=0);
#                         off: all GPUs visible, DEVICE_ID=<local rank>
#   --python PY           python used for checks and the scheduler (default: python3 next to
#                         mpirun, else python3 on PATH)
#   -x VAR                export VAR to every rank (repeatable; needed for remote nodes)
#   --mpi-arg ARG         pass ARG to mpirun verbatim (repeatable)
#   --dry-run             print the mpirun command and exit
#   -h, --help
#
# Every rank runs through this same script (internal mode "--rank-wrapper"), which exports
#   RANK_ID, RANK_SIZE, LOCAL_RANK, DEVICE_ID   from OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK
#   CUDA_VISIBLE_DEVICES                        gpu (see --gpu-isolation)
#   RANK_TABLE_FILE                             ascend: passed through from the environment
#   MS_ROLE=MS_WORKER, MS_NODE_ID=<rank>, ...   with --ms-scheduler
# Environment: MPIRUN (mpirun to use), DISTCKPT_SKIP_MPI4PY_CHECK=1, MS_SCHED_HOST,
# MS_SCHED_PORT.  The exit code is mpirun's.  See launch/README.md.

set -u

HINT="pip install 'distckpt[mpi]'   # mpi4py + Open MPI (ships mpirun)"

die() {
    echo "launch/mpirun.sh: error: $*" >&2
    exit 2
}

# ------------------------------------------------------------------------------------------
# Per-rank mode: runs on every rank under mpirun.
if [ "${1:-}" = "--rank-wrapper" ]; then
    shift
    [ "${1:-}" = "--" ] && shift
    rank="${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-${PMI_RANK:-0}}}"
    size="${OMPI_COMM_WORLD_SIZE:-${PMI_SIZE:-1}}"
    local_rank="${OMPI_COMM_WORLD_LOCAL_RANK:-${MPI_LOCALRANKID:-$rank}}"
    export RANK_ID="$rank" RANK_SIZE="$size" LOCAL_RANK="$local_rank"
    device="${DISTCKPT_LAUNCH_DEVICE:-cpu}"
    case "$device" in
        gpu)
            if [ "${DISTCKPT_LAUNCH_GPU_ISOLATION:-on}" = "on" ]; then
                if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
                    # pick this rank's entry of the list the user allowed
                    IFS=',' read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
                    if [ "$local_rank" -ge "${#gpus[@]}" ]; then
                        echo "launch/mpirun.sh: rank $rank: local rank $local_rank but CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES lists ${#gpus[@]} GPU(s)" >&2
                        exit 2
                    fi
                    export CUDA_VISIBLE_DEVICES="${gpus[$local_rank]}"
                else
                    export CUDA_VISIBLE_DEVICES="$local_rank"
                fi
                export DEVICE_ID=0
            else
                export DEVICE_ID="$local_rank"
            fi
            ;;
        ascend)
            export DEVICE_ID="$local_rank"
            [ -n "${RANK_TABLE_FILE:-}" ] && export RANK_TABLE_FILE
            ;;
        *)
            export DEVICE_ID="$local_rank"
            ;;
    esac
    if [ "${DISTCKPT_LAUNCH_MS_SCHEDULER:-0}" = "1" ]; then
        export MS_ROLE=MS_WORKER MS_NODE_ID="$rank" MS_WORKER_NUM="$size"
    fi
    if [ -n "${DISTCKPT_LAUNCH_LOG_DIR:-}" ]; then
        log="$DISTCKPT_LAUNCH_LOG_DIR/rank_${rank}.log"
        mkdir -p "$DISTCKPT_LAUNCH_LOG_DIR"
        : >"$log"
        # stdout -> log + stdout, stderr -> log + stderr; plain pipes (bash >= 3), both tees
        # finish before this wrapper exits, and the exit code is the command's.
        { "$@" 2>&1 1>&5 5>&- | tee -a "$log" >&2 5>&-; exit "${PIPESTATUS[0]}"; } 5>&1 | tee -a "$log"
        exit "${PIPESTATUS[0]}"
    fi
    exec "$@"
fi

# ------------------------------------------------------------------------------------------
# Launcher mode.
usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; }

np=1
hostfile=""
device="cpu"
log_dir=""
ms_scheduler=0
gpu_isolation="on"
python_bin=""
dry_run=0
exports=()
mpi_args=()

while [ $# -gt 0 ]; do
    case "$1" in
        -n | --np | -np) [ $# -ge 2 ] || die "$1 needs a value"; np="$2"; shift 2 ;;
        --np=*) np="${1#*=}"; shift ;;
        --hostfile | --machinefile) [ $# -ge 2 ] || die "$1 needs a value"; hostfile="$2"; shift 2 ;;
        --hostfile=*) hostfile="${1#*=}"; shift ;;
        --device) [ $# -ge 2 ] || die "$1 needs a value"; device="$2"; shift 2 ;;
        --device=*) device="${1#*=}"; shift ;;
        --log-dir) [ $# -ge 2 ] || die "$1 needs a value"; log_dir="$2"; shift 2 ;;
        --log-dir=*) log_dir="${1#*=}"; shift ;;
        --ms-scheduler) ms_scheduler=1; shift ;;
        --gpu-isolation) [ $# -ge 2 ] || die "$1 needs a value"; gpu_isolation="$2"; shift 2 ;;
        --gpu-isolation=*) gpu_isolation="${1#*=}"; shift ;;
        --python) [ $# -ge 2 ] || die "$1 needs a value"; python_bin="$2"; shift 2 ;;
        --python=*) python_bin="${1#*=}"; shift ;;
        -x) [ $# -ge 2 ] || die "$1 needs a value"; exports+=("$2"); shift 2 ;;
        --mpi-arg) [ $# -ge 2 ] || die "$1 needs a value"; mpi_args+=("$2"); shift 2 ;;
        --mpi-arg=*) mpi_args+=("${1#*=}"); shift ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (the command goes after '--'; see --help)" ;;
    esac
done

[ $# -gt 0 ] || die "no command given: launch/mpirun.sh [options] -- command [args...]"
case "$np" in '' | *[!0-9]*) die "--np must be a positive integer, got '$np'" ;; esac
[ "$np" -ge 1 ] || die "--np must be at least 1, got '$np'"
case "$device" in ascend | gpu | cpu) ;; *) die "--device must be ascend, gpu or cpu, got '$device'" ;; esac
case "$gpu_isolation" in on | off) ;; *) die "--gpu-isolation must be on or off, got '$gpu_isolation'" ;; esac
[ -z "$hostfile" ] || [ -r "$hostfile" ] || die "hostfile '$hostfile' not found or not readable"
if [ "$ms_scheduler" = 1 ] && [ "$device" != cpu ]; then
    die "--ms-scheduler is for --device cpu (on Ascend/GPU, MindSpore's collectives use HCCL/NCCL through mpirun)"
fi

# -- python: --python, else the command itself when it is python ---------------------------
if [ -z "$python_bin" ]; then
    case "$(basename "$1")" in
        python | python3 | python3.*) python_bin="$(command -v "$1" 2>/dev/null || true)" ;;
    esac
fi

# -- find mpirun: $MPIRUN, PATH, next to that python, the active venv ----------------------
mpirun_bin="${MPIRUN:-}"
[ -n "$mpirun_bin" ] || mpirun_bin="$(command -v mpirun 2>/dev/null || true)"
if [ -z "$mpirun_bin" ]; then
    for dir in ${python_bin:+"$(dirname "$python_bin")"} ${VIRTUAL_ENV:+"$VIRTUAL_ENV/bin"}; do
        if [ -x "$dir/mpirun" ]; then mpirun_bin="$dir/mpirun"; break; fi
    done
fi
if [ -z "$mpirun_bin" ] || [ ! -x "$mpirun_bin" ]; then
    cat >&2 <<EOF
launch/mpirun.sh: error: mpirun not found (looked at \$MPIRUN, PATH, next to ${python_bin:-python} and in \$VIRTUAL_ENV).
  Install Open MPI and mpi4py into the job's Python environment:
      $HINT
  or your system's Open MPI (e.g. apt-get install openmpi-bin), or set MPIRUN=/path/to/mpirun.
EOF
    exit 127
fi
mpirun_dir="$(cd "$(dirname "$mpirun_bin")" && pwd)"
if [ -z "$python_bin" ]; then
    if [ -x "$mpirun_dir/python3" ]; then python_bin="$mpirun_dir/python3"; else python_bin="$(command -v python3 2>/dev/null || true)"; fi
fi
if [ "${DISTCKPT_SKIP_MPI4PY_CHECK:-0}" != 1 ] && [ -n "$python_bin" ]; then
    if ! "$python_bin" -c "import mpi4py" >/dev/null 2>&1; then
        cat >&2 <<EOF
launch/mpirun.sh: error: mpi4py is not installed for $python_bin,
  so distckpt's ranks could not talk to each other. Install it into that environment:
      $HINT
  (DISTCKPT_SKIP_MPI4PY_CHECK=1 skips this check for commands that do not need mpi4py.)
EOF
        exit 127
    fi
fi

# -- build the mpirun command ---------------------------------------------------------------
cmd=("$mpirun_bin" -n "$np")
if [ "$(id -u)" = 0 ]; then
    # Open MPI refuses root unless told; containers commonly run as root.
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    cmd+=(--allow-run-as-root)
fi
if [ -n "$hostfile" ]; then
    cmd+=(--hostfile "$hostfile")
elif [ "$device" = cpu ]; then
    cores="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
    if [ "$np" -gt "$cores" ]; then
        cmd+=(--oversubscribe)
    fi
fi

export DISTCKPT_LAUNCH_DEVICE="$device"
export DISTCKPT_LAUNCH_GPU_ISOLATION="$gpu_isolation"
export DISTCKPT_LAUNCH_MS_SCHEDULER="$ms_scheduler"
if [ -n "$log_dir" ]; then
    mkdir -p "$log_dir" || die "cannot create log directory '$log_dir'"
    log_dir="$(cd "$log_dir" && pwd)"
    export DISTCKPT_LAUNCH_LOG_DIR="$log_dir"
    export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"
fi

# Variables every rank needs, also on remote nodes (mpirun -x forwards them).
forward=(DISTCKPT_LAUNCH_DEVICE DISTCKPT_LAUNCH_GPU_ISOLATION DISTCKPT_LAUNCH_MS_SCHEDULER PATH)
for v in DISTCKPT_LAUNCH_LOG_DIR PYTHONUNBUFFERED LD_LIBRARY_PATH PYTHONPATH VIRTUAL_ENV RANK_TABLE_FILE \
    CUDA_VISIBLE_DEVICES DISTCKPT_COMM_TIMEOUT DISTCKPT_COMM GLOG_v; do
    [ -n "${!v:-}" ] && forward+=("$v")
done
if [ "$device" = ascend ] && [ "$np" -gt 1 ] && [ -z "${RANK_TABLE_FILE:-}" ]; then
    echo "launch/mpirun.sh: note: RANK_TABLE_FILE is not set; MindSpore will build the HCCL group without a rank table" >&2
fi

sched_pid=""
if [ "$ms_scheduler" = 1 ]; then
    [ -n "$python_bin" ] || die "--ms-scheduler needs python (use --python)"
    export MS_SCHED_HOST="${MS_SCHED_HOST:-127.0.0.1}"
    if [ -z "${MS_SCHED_PORT:-}" ]; then
        MS_SCHED_PORT="$("$python_bin" -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')" ||
            die "could not pick a free port for the MindSpore scheduler; set MS_SCHED_PORT"
    fi
    export MS_SCHED_PORT MS_WORKER_NUM="$np"
    forward+=(MS_SCHED_HOST MS_SCHED_PORT MS_WORKER_NUM)
fi
for v in "${forward[@]}" "${exports[@]}"; do cmd+=(-x "$v"); done
cmd+=("${mpi_args[@]}")
cmd+=(bash "$(cd "$(dirname "$0")" && pwd)/$(basename "$0")" --rank-wrapper -- "$@")

if [ "$dry_run" = 1 ]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi

if [ "$ms_scheduler" = 1 ]; then
    sched_log="${log_dir:-${TMPDIR:-/tmp}}/scheduler.log"
    [ -n "$log_dir" ] || sched_log="$(mktemp "${TMPDIR:-/tmp}/distckpt-scheduler.XXXXXX.log")"
    MS_ROLE=MS_SCHED MS_NODE_ID=sched "$python_bin" -c \
        "import mindspore as ms; ms.set_context(device_target='CPU'); from mindspore.communication import init; init()" \
        >"$sched_log" 2>&1 &
    sched_pid=$!
    echo "launch/mpirun.sh: MindSpore scheduler pid $sched_pid on $MS_SCHED_HOST:$MS_SCHED_PORT (log $sched_log)" >&2
fi

cleanup() {
    if [ -n "$sched_pid" ] && kill -0 "$sched_pid" 2>/dev/null; then
        kill "$sched_pid" 2>/dev/null
        wait "$sched_pid" 2>/dev/null
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"${cmd[@]}"
rc=$?
if [ -n "$sched_pid" ]; then
    # the scheduler exits by itself once every worker has finished; give it a moment
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$sched_pid" 2>/dev/null || break; sleep 0.5; done
fi
exit "$rc"
