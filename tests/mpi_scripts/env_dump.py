"""Run by tests/test_comm.py through launch/mpirun.sh: print the rank environment, exit with $RC on rank 1."""

import json
import os
import sys

keys = ["RANK_ID", "RANK_SIZE", "LOCAL_RANK", "DEVICE_ID", "CUDA_VISIBLE_DEVICES", "RANK_TABLE_FILE", "MS_ROLE", "MS_NODE_ID", "MS_WORKER_NUM"]
print("ENV " + json.dumps({k: os.environ.get(k) for k in keys}, sort_keys=True), flush=True)
print(f"stderr line from rank {os.environ.get('RANK_ID')}", file=sys.stderr, flush=True)
sys.exit(int(os.environ.get("RC", "0")) if os.environ.get("RANK_ID") == "1" else 0)
