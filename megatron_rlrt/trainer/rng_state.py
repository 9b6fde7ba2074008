"""Per-rank RNG state in a file that cannot run code when it is read.

A checkpoint is shared and downloaded like any other file, so nothing in it may be a pickle:
``torch.load(weights_only=False)`` of a crafted RNG file runs whatever its ``__reduce__``
says. The RNG state is a handful of integer arrays, so it is stored as a safetensors file:
tensors (torch / CUDA / generator states, the Mersenne-Twister keys of Python and numpy)
plus a small JSON header for the scalars. Reading it parses a JSON header and copies bytes;
nothing is imported or called.
"""

from __future__ import annotations

import json
import random

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

RNG_DIR = "rng"
_META_KEY = "megatron_rlrt_rng"


def rng_file(directory: str, rank: int) -> str:
    return f"{directory}/{RNG_DIR}/rank_{rank:05d}.safetensors"


def capture(extra_generators: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, scalars) describing this process's RNG state now."""
    from megatron.core import tensor_parallel

    version, mt, gauss = random.getstate()
    name, np_key, np_pos, has_gauss, cached = np.random.get_state()
    tensors = {"python/key": torch.tensor(mt, dtype=torch.int64),
               "numpy/key": torch.from_numpy(np.asarray(np_key, dtype=np.int64)),
               "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    for key, state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        tensors[f"tracker/{key}"] = state.get_state() if isinstance(state, torch.Generator) else state
    for key, state in (extra_generators or {}).items():
        tensors[f"generator/{key}"] = state
    scalars = {"python": {"version": version, "gauss": gauss},
               "numpy": {"name": name, "pos": int(np_pos), "has_gauss": int(has_gauss), "cached": float(cached)}}
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, scalars


def save(path: str, extra_generators: dict[str, torch.Tensor] | None = None) -> None:
    tensors, scalars = capture(extra_generators)
    save_file(tensors, path, metadata={_META_KEY: json.dumps(scalars)})


class RngState:
    """A loaded RNG file: ``apply()`` sets this process's generators; ``generator(name)`` is a
    saved extra generator state (the rollout sampler's, the peer choice's) or None."""

    def __init__(self, tensors: dict[str, torch.Tensor], scalars: dict):
        self.tensors, self.scalars = tensors, scalars

    def generator(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(f"generator/{name}")

    def apply(self) -> None:
        from megatron.core import tensor_parallel

        t, s = self.tensors, self.scalars
        random.setstate((s["python"]["version"], tuple(int(x) for x in t["python/key"].tolist()), s["python"]["gauss"]))
        np.random.set_state((s["numpy"]["name"], t["numpy/key"].numpy().astype(np.uint32), s["numpy"]["pos"],
                             s["numpy"]["has_gauss"], s["numpy"]["cached"]))
        torch.set_rng_state(t["torch"])
        if "cuda" in t and torch.cuda.is_available():
            torch.cuda.set_rng_state(t["cuda"])
        tracker = tensor_parallel.get_cuda_rng_tracker()
        current = tracker.get_states()
        saved = {k.split("/", 1)[1]: v for k, v in t.items() if k.startswith("tracker/")}
        if saved:
            states = {}
            for key, value in saved.items():
                if isinstance(current.get(key), torch.Generator):  # graph-safe trackers keep Generator objects
                    current[key].set_state(value)
                    states[key] = current[key]
                else:
                    states[key] = value
            tracker.set_states(states)


def load(path: str) -> RngState:
    """Read an RNG file written by :func:`save`. Raises ValueError naming the file if it is damaged."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        scalars = json.loads(meta[_META_KEY])
        for key in ("python/key", "numpy/key", "torch"):
            tensors[key]  # noqa: B018  (presence check)
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: not a readable RNG state file ({type(exc).__name__}: {exc})") from None
    return RngState(tensors, scalars)
