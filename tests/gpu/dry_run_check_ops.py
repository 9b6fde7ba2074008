"""Run tests/gpu/check_ops.py on the CPU before spending GPU time on it: its CUDA kernels run
under the emulation of tests/cuda_emu/, tensors live on the CPU, and the few torch.cuda calls
the script makes (events, memory counters, device name) are stood in for. Every correctness
check runs at full size; the benchmark runs at a toy size only to exercise its code (its times
and the PASS/FAIL of its targets mean nothing here). ~4 min on 2 cores.

    python tests/gpu/dry_run_check_ops.py [--out DIR]      (exit code: check_ops.py's)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "gpu"))
os.environ["MEGATRON_RLRT_OPS_BACKEND"] = "cuda"

import torch  # noqa: E402


class _Event:
    def __init__(self, enable_timing: bool = True):
        self.t = 0.0

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end: "_Event") -> float:
        return (end.t - self.t) * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/check_ops_dry_run")
    args = p.parse_args()

    import check_ops

    from megatron_rlrt.ops import dispatch
    from tests.helpers.dist_helpers_ops import cuda_emu_backend

    dispatch._INFO = cuda_emu_backend()  # "cuda" = the CUDA kernels, emulated
    check_ops.DEV = torch.device("cpu")
    stand_ins = dict(is_available=lambda: True, Event=_Event, synchronize=lambda: None,
                     reset_peak_memory_stats=lambda: None, memory_allocated=lambda: 0,
                     max_memory_allocated=lambda: 0, empty_cache=lambda: None,
                     get_device_name=lambda: "CPU dry run (tests/cuda_emu)")
    for name, fn in stand_ins.items():
        setattr(torch.cuda, name, fn)
    sys.argv = ["check_ops.py", "--out", args.out, "--tokens", "96", "--hidden", "64", "--vocab", "3000",
                "--chunk-size", "1024", "--repeats", "2"]
    return check_ops.main()


if __name__ == "__main__":
    sys.exit(main())
