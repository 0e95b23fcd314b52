"""Run ``distckpt.merge`` on every rank of an mpirun job (or alone): merge_job.py SRC DST [--shard S] [--format F]
[--fail-rank R].  Prints ``RANK r FILES [...]`` or ``RANK r ERROR message``."""

import argparse
import sys

import distckpt
from distckpt.comm import get_comm

ap = argparse.ArgumentParser()
ap.add_argument("src")
ap.add_argument("dst")
ap.add_argument("--shard")
ap.add_argument("--format")
ap.add_argument("--fail-rank", type=int, default=-1)
ap.add_argument("--model")
ap.add_argument("--hf-config")
args = ap.parse_args()
rank = get_comm().rank
if rank == args.fail_rank:
    import distckpt.writers.parallel as par

    def boom(*a, **kw):
        raise OSError(f"disk trouble on rank {rank}")

    par.merge_file = boom
    par.merge_sharded = boom
try:
    extra = {"model": args.model, "hf_config": args.hf_config} if args.model else {}
    rep = distckpt.merge(args.src, args.dst, max_shard_size=args.shard, format=args.format, **extra)
    print(f"RANK {rank} FILES {rep['files']} RANKS {rep['ranks']}", flush=True)
except distckpt.DistCkptError as exc:
    print(f"RANK {rank} ERROR {exc}", flush=True)
    sys.exit(3)
