"""Run a module or script under ``torchrun`` on this machine, as the tests that go through the
real launcher do: its own port, one OpenMP thread per rank, the repo on PYTHONPATH, and its own
process session so that a timeout kills torchrun AND its ranks (not only the launcher)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def torchrun(target: list[str], nproc: int = 2, timeout: float = 900) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node NPROC TARGET...`` (TARGET: ``["-m", module, args...]`` or
    ``[script, args...]``), run from the repo root; returns the finished process (text output)."""
    from megatron_rlrt.parallel import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(free_port()), *target]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def torchrun_ok(target: list[str], nproc: int = 2, timeout: float = 900) -> subprocess.CompletedProcess:
    """:func:`torchrun` that asserts success, showing the tail of both streams when it did not."""
    r = torchrun(target, nproc, timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r
