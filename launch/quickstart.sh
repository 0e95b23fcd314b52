#!/usr/bin/env bash
# The main job, from a fresh checkout: set up .venv, then on CPU
#   1. train a tensor-parallel MindSpore MLP on 4 ranks under mpirun, save from all ranks at once,
#   2. merge into one MindSpore .ckpt (checked with mindspore.load_checkpoint) and reshard to 2 ranks,
#   3. resume training on 2 ranks from the same weights,
# and print a summary.  Usage: bash launch/quickstart.sh [--out DIR] [--steps N]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
cd "$here"
out="output/quickstart"
steps=5
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --steps) steps="$2"; shift 2 ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) echo "quickstart.sh: unknown option $1" >&2; exit 2 ;;
    esac
done

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import distckpt, mindspore, mpi4py" 2>/dev/null; then
    echo "== setting up .venv (pip install -e '.[all]'; a few minutes the first time)"
    "${PYTHON:-python3}" -m venv .venv
    if ! { .venv/bin/python -m pip install -q --upgrade pip &&
           .venv/bin/python -m pip install -q -e '.[all]'; } > .venv/install.log 2>&1; then
        tail -40 .venv/install.log >&2
        echo "quickstart.sh: installing failed; the whole log is in .venv/install.log" >&2
        exit 1
    fi
fi
export PATH="$here/.venv/bin:$PATH"
rm -rf "$out"
mkdir -p "$out"
logs="$out/logs"

echo "== 1/3 train on 4 ranks (mpirun), save from every rank"
bash launch/mpirun.sh -n 4 --device cpu --log-dir "$logs/train" -- python examples/quickstart.py train --out "$out" --steps "$steps"
echo "== 2/3 merge into one MindSpore checkpoint, reshard to 2 ranks"
python examples/quickstart.py merge --out "$out"
python -m distckpt inspect "$out/ckpt"
echo "== 3/3 resume on 2 ranks (mpirun) from the resharded checkpoint"
bash launch/mpirun.sh -n 2 --device cpu --log-dir "$logs/resume" -- python examples/quickstart.py resume --out "$out" --steps "$steps"
