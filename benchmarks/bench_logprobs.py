"""Benchmark: log-probs of target tokens over a vocab-parallel LM head, on CPU (gloo) or GPU.

Variants (each in its own fresh process per measurement, TP ranks as separate processes):
  naive          logits -> fp32 log_softmax (materialised) -> gather; at TP>1 the shards are first
                 all-gathered to the full vocabulary (megatron's gather_from_tensor_model_parallel_region)
  megatron       megatron-core tensor_parallel.vocab_parallel_cross_entropy (log p = -loss); it
                 overwrites its input, so it gets a copy made before the measurement
  ours           megatron_rlrt.ops.vocab_parallel_logprobs (new [N, V/TP] gradient buffer)
  ours-inplace   the same with inplace_backward=True (gradient written over the logits, like megatron)
  gemm           hidden @ weight_shard.T alone (the LM-head GEMM: the floor for the fused variants)
  naive-linear   GEMM -> naive (as above)
  ours-fused     megatron_rlrt.ops.fused_linear_logprobs (vocab tiles, no [N, V/TP] logits)

Memory: "extra peak" = peak resident memory during the call minus resident memory just before
it (inputs already built), i.e. everything the call allocates including its outputs/gradients.
CPU: glibc malloc is told to mmap every block >= 64 KiB (MALLOC_MMAP_THRESHOLD_=65536), so freed
memory returns to the OS and RSS tracks live allocations; the kernel's peak-RSS counter is reset
right before the call (write "5" to /proc/self/clear_refs) and VmHWM read right after.
GPU: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated().

Times: the minimum over --repeats calls after one warm-up call (the memory-measured call).
Ratios are against `naive` (from-logits variants) or `naive-linear` (fused variants) of the same
run, TP size and mode. Run with --help for the options.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LOGIT_VARIANTS = ["naive", "megatron", "ours", "ours-inplace"]
FUSED_VARIANTS = ["gemm", "naive-linear", "ours-fused"]
MODES = ["fwd", "fwd+bwd"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example (CPU, the recorded run): python benchmarks/bench_logprobs.py "
                                       "--tp 1 2 --fused-tokens 1024")
    p.add_argument("--tokens", type=int, default=4096, help="N, tokens (rows) for the from-logits variants")
    p.add_argument("--fused-tokens", type=int, default=None, help="N for the fused variants (default --tokens)")
    p.add_argument("--hidden", type=int, default=2560, help="H (Qwen3-4B: 2560)")
    p.add_argument("--vocab", type=int, default=151936, help="V, full vocabulary (Qwen3: 151936)")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes to run")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="logits / hidden / weight dtype")
    p.add_argument("--variants", nargs="+", default=LOGIT_VARIANTS + FUSED_VARIANTS,
                   choices=LOGIT_VARIANTS + FUSED_VARIANTS)
    p.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up call")
    p.add_argument("--fused-repeats", type=int, default=1, help="timed calls for the (slow on CPU) fused variants")
    p.add_argument("--chunk-size", type=int, default=4096, help="vocab tile of ours-fused")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank (OMP_NUM_THREADS)")
    p.add_argument("--backend", choices=["auto", "cpp", "cuda", "torch"], default="auto",
                   help="MEGATRON_RLRT_OPS_BACKEND for the ours* variants")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--json", help="also write all results to this file")
    p.add_argument("--markdown", help="also write the result tables to this file")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_variant", help=argparse.SUPPRESS)
    p.add_argument("--_mode", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- worker side


class PeakMemory:
    """Extra peak memory of a block: CPU via VmHWM reset, CUDA via the caching allocator's stats."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import gc

        import torch

        from megatron_rlrt import procmem

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = procmem.reset_peak()
        return self

    def __exit__(self, *exc):
        import torch

        from megatron_rlrt import procmem

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = procmem.peak_bytes() - self.base


def worker(args) -> None:
    os.environ["MEGATRON_RLRT_OPS_BACKEND"] = args.backend
    sys.path.insert(0, ROOT)
    import torch

    from megatron_rlrt import parallel

    tp = int(os.environ.get("WORLD_SIZE", "1"))
    parallel.initialize(parallel.ParallelLayout(tensor_model_parallel_size=tp))
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

    from megatron_rlrt import ops

    group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    meg_group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    variant, bwd = args._variant, args._mode == "fwd+bwd"
    fused = variant in FUSED_VARIANTS
    n = (args.fused_tokens or args.tokens) if fused else args.tokens
    shard = args.vocab // tp
    gen = torch.Generator(device=device).manual_seed(1234)
    targets = torch.randint(0, args.vocab, (n,), generator=gen, device=device)

    def new_logits():  # built in place: no temporary larger than the tensor itself
        x = torch.empty(n, shard, dtype=dtype, device=device)
        x.normal_(0.0, 3.0, generator=gen)
        return x

    if fused:
        hidden = torch.empty(n, args.hidden, dtype=dtype, device=device).normal_(0, 1, generator=gen)
        weight = torch.empty(shard, args.hidden, dtype=dtype, device=device).normal_(0, args.hidden ** -0.5, generator=gen)
        hidden.requires_grad_(bwd)
        weight.requires_grad_(bwd)

    def naive_lp(logits):
        if tp > 1:
            from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

            logits = gather_from_tensor_model_parallel_region(logits)
        return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]

    def megatron_lp(logits):
        return -vocab_parallel_cross_entropy(logits, targets, tp_group=meg_group)

    # prepare() runs outside the measurement (builds fresh inputs); run(inputs) is measured
    if variant in ("naive", "megatron", "ours", "ours-inplace"):
        base = new_logits()

        def prepare():
            if variant == "megatron" or variant == "ours-inplace":
                # megatron overwrites its input; ours-inplace writes the gradient over it: give
                # both a private copy that is a non-leaf (like the LM head's output)
                leaf = base.clone().requires_grad_(bwd)
                return (leaf, leaf.clone() if bwd else leaf)
            return (base.requires_grad_(bwd),)

        def run(inputs):
            x = inputs[-1]
            if variant == "naive":
                lp = naive_lp(x)
            elif variant == "megatron":
                lp = megatron_lp(x)
            else:
                lp = ops.vocab_parallel_logprobs(x, targets, 1.0, group, inplace_backward=(variant == "ours-inplace" and bwd))[0]
            if bwd:
                return torch.autograd.grad(lp.sum(), x)[0]
            return lp
    else:
        def prepare():
            return ()

        def run(inputs):
            if variant == "gemm":
                logits = hidden @ weight.t()
                if bwd:
                    return torch.autograd.grad(logits, (hidden, weight), torch.ones_like(logits))
                return logits
            if variant == "naive-linear":
                logits = hidden @ weight.t()
                lp = naive_lp(logits)
            else:
                lp = ops.fused_linear_logprobs(hidden, weight, targets, 1.0, group, chunk_size=args.chunk_size)[0]
            if bwd:
                return torch.autograd.grad(lp.sum(), (hidden, weight))
            return lp

    # warm-up on a few rows: loads/JIT-builds the extension, megatron imports, first-call costs
    if variant.startswith("ours"):
        small = torch.zeros(2, shard, dtype=dtype, device=device)
        ops.vocab_parallel_logprobs(small, targets[:2], 1.0, group)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    inputs = prepare()
    with PeakMemory(device) as mem:
        out = run(inputs)
        sync()
    del out, inputs
    repeats = args.fused_repeats if fused else args.repeats
    times = []
    for _ in range(repeats):
        inputs = prepare()
        sync()
        t0 = time.perf_counter()
        out = run(inputs)
        sync()
        times.append(time.perf_counter() - t0)
        del out, inputs
    input_bytes = (n * shard * (4 if dtype == torch.float32 else 2)) if not fused else \
        (n + shard) * args.hidden * (4 if dtype == torch.float32 else 2)
    result = dict(variant=variant, mode=args._mode, tp=tp, tokens=n, vocab=args.vocab, hidden=args.hidden,
                  dtype=args.dtype, time_min=min(times), times=times, extra_peak_bytes=mem.peak,
                  input_bytes_per_rank=input_bytes, backend=ops.backend() if variant.startswith("ours") else "-")
    if rank == 0 and args._out:
        with open(args._out, "w") as f:
            json.dump(result, f)
    parallel.destroy()


# ----------------------------------------------------------------------------- driver side


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(args, tp: int, variant: str, mode: str) -> dict:
    out = os.path.join("/tmp", f"bench_logprobs_{os.getpid()}_{tp}_{variant}_{mode.replace('+', '')}.json")
    if os.path.exists(out):
        os.remove(out)
    base = [sys.executable, os.path.abspath(__file__), "--_worker", "--_variant", variant, "--_mode", mode, "--_out", out,
            "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
            "--dtype", args.dtype, "--repeats", str(args.repeats), "--fused-repeats", str(args.fused_repeats),
            "--chunk-size", str(args.chunk_size), "--backend", args.backend, "--device", args.device]
    if args.fused_tokens:
        base += ["--fused-tokens", str(args.fused_tokens)]
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               MALLOC_MMAP_THRESHOLD_="65536", WORLD_SIZE=str(tp), LOCAL_WORLD_SIZE=str(tp),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONWARNINGS="ignore")
    procs = [subprocess.Popen(base, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(tp)]
    logs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs) or not os.path.exists(out):
        tail = "\n".join(line for log in logs for line in log.splitlines()[-15:])
        return dict(variant=variant, mode=mode, tp=tp, error=tail[-2000:])
    with open(out) as f:
        result = json.load(f)
    os.remove(out)
    return result


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB" if abs(b) < 2**30 else f"{b / 2**30:,.2f} GiB"


def tables(results: list[dict]) -> str:
    lines = []
    for tp in sorted({r["tp"] for r in results}):
        for mode in MODES:
            rows = [r for r in results if r["tp"] == tp and r["mode"] == mode]
            if not rows:
                continue
            lines += [f"\nTP={tp}, {mode}:", "",
                      "| variant | tokens | backend | time (s) | x vs naive (-linear) | extra peak mem / rank | % of naive (-linear) |",
                      "|---|---|---|---|---|---|---|"]
            by = {r["variant"]: r for r in rows}
            for r in rows:
                if "error" in r:
                    lines.append(f"| {r['variant']} | - | - | FAILED | | | |")
                    continue
                ref = by.get("naive-linear" if r["variant"] in FUSED_VARIANTS else "naive")
                ok = ref is not None and "error" not in ref
                speed = f"{ref['time_min'] / r['time_min']:.2f}x" if ok else "-"
                mem = f"{100 * r['extra_peak_bytes'] / ref['extra_peak_bytes']:.1f}%" if ok and ref["extra_peak_bytes"] > 0 else "-"
                lines.append(f"| {r['variant']} | {r['tokens']} | {r['backend']} | {r['time_min']:.3f} | {speed} | "
                             f"{_fmt_bytes(r['extra_peak_bytes'])} | {mem} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._worker:
        worker(args)
        return 0
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    results = []
    for tp in args.tp:
        if args.vocab % tp:
            raise SystemExit(f"--vocab {args.vocab} is not divisible by TP={tp}")
        for variant in args.variants:
            for mode in args.modes:
                t0 = time.perf_counter()
                r = run_one(args, tp, variant, mode)
                status = r.get("error", "").splitlines()[-1:] if "error" in r else \
                    [f"{r['time_min']:.3f} s, extra peak {_fmt_bytes(r['extra_peak_bytes'])}"]
                print(f"[bench] TP={tp} {variant:13s} {mode:8s} {status[0] if status else 'FAILED'} "
                      f"({time.perf_counter() - t0:.0f} s wall)", flush=True)
                results.append(r)
    machine = f"{platform.node()} | {platform.processor() or platform.machine()} | {os.cpu_count()} CPUs"
    header = (f"bench_logprobs {started}; {machine}; N={args.tokens} (fused {args.fused_tokens or args.tokens}), "
              f"H={args.hidden}, V={args.vocab}, {args.dtype}, {args.threads} thread(s)/rank, device {args.device}")
    text = header + "\n" + tables(results)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header, args=vars(args), results=results), f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
