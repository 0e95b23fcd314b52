"""Record a rank's real exit status: ``mpirun -n N python comm_exitwrap.py OUTDIR -- CMD ...``.

mpirun tears a job down by signalling each launched process's group, so a
wrapper that mpirun launches cannot be relied on to outlive it.  This one
(mpirun's child) starts a *recorder* in a new session, which runs CMD (the rank)
and writes ``status_<rank>.json`` = ``{"rc": <returncode>, "t": <time>}`` when it
ends (a negative rc is the signal that killed it).  When mpirun signals the
wrapper, it forwards SIGTERM to the rank, so a rank that is stuck still ends
the way it would without the wrapper.  The rank's pid is in ``pid_<rank>``.
"""

import json
import os
import signal
import subprocess
import sys
import time

out, cmd = sys.argv[1], sys.argv[3:]
rank = os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "x"))
pid_file = os.path.join(out, f"pid_{rank}")

if os.environ.get("_COMM_EXITWRAP_RECORDER") != "1":
    recorder = subprocess.Popen([sys.executable, *sys.argv], env=dict(os.environ, _COMM_EXITWRAP_RECORDER="1"),
                                start_new_session=True)

    def forward(signum, frame):
        try:
            with open(pid_file) as f:
                os.kill(int(f.read()), signal.SIGTERM)
        except (OSError, ValueError):
            pass

    signal.signal(signal.SIGTERM, forward)
    while True:
        try:
            rc = recorder.wait()
            break
        except InterruptedError:
            continue
    sys.exit(rc if rc >= 0 else 128 - rc)
else:
    signal.signal(signal.SIGTERM, lambda *a: None)  # only the rank itself may be ended by mpirun's signal
    child = subprocess.Popen(cmd)
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(child.pid))
    os.replace(pid_file + ".tmp", pid_file)
    rc = child.wait()
    with open(os.path.join(out, f"status_{rank}.json"), "w") as f:
        json.dump({"rc": rc, "t": time.time()}, f)
