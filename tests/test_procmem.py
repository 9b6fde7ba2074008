"""megatron_rlrt.procmem: the peak RSS of one block, and not the parent's (the reason it exists)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from megatron_rlrt import procmem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_peak_of_a_block_sees_a_freed_allocation():
    base = procmem.reset_peak()
    block = bytearray(300 * 2**20)  # touched (zero-filled) pages count in RSS
    for i in range(0, len(block), 4096):
        block[i] = 1
    del block
    extra = procmem.peak_bytes() - base
    assert 250 * 2**20 <= extra <= 450 * 2**20, extra
    assert procmem.rss_bytes() < base + 200 * 2**20  # freed: the peak remembers it, the RSS does not
    assert procmem.reset_peak() <= procmem.peak_bytes()


def test_child_peak_is_its_own_unlike_ru_maxrss():
    """A child exec'd from a process that once held 400 MB: ru_maxrss reports the parent's mark,
    VmHWM the child's own (a few tens of MB for a bare interpreter)."""
    code = ("import json, resource, sys; sys.path.insert(0, %r); from megatron_rlrt import procmem; "
            "print(json.dumps({'vmhwm': procmem.peak_bytes(), 'ru': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))"
            % REPO)
    parent = ("import subprocess, sys; b = bytearray(400 * 2**20); [b.__setitem__(i, 1) for i in range(0, len(b), 4096)]; "
              "sys.stdout.write(subprocess.run([sys.executable, '-c', %r], capture_output=True, text=True, check=True).stdout)"
              % code)
    out = json.loads(subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout)
    assert out["vmhwm"] < 200 * 2**20, out
    assert out["ru"] > 400 * 2**20, out  # the inherited mark this module avoids
