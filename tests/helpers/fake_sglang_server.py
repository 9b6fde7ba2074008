"""A fake SGLang HTTP server for the engine tests (run as its own process on 127.0.0.1).

It serves the SGLang 0.5.23 routes the engine uses and validates every body against the
field lists recorded from SGLang's source (tests/data/sglang_0.5.23_api.json): unknown or
missing fields get HTTP 400, as SGLang's own validation gives. Weight-update semantics follow
SGLang's scheduler: update_weights_from_tensor / _from_distributed only inside a
begin/end_weight_update session; the distributed path really joins the trainer's process group
(gloo) the way SGLang does and receives the flattened bucket by broadcast.

It also ENFORCES what a real server needs from a colocated trainer (a refusal is HTTP 400 and
is recorded in ``violations``, so a test can assert that none happened even where the engine
tolerates one failing server):
- memory by tag (``weights``, ``kv_cache``; SGLang's memory saver): no /generate unless both are
  resident; no weight update into released weights; the KV cache is resumed after the weights
  (slime's order); only what was released can be resumed, nothing released twice;
- weight updates from tensors / a broadcast only inside begin/end_weight_update; with
  ``--model-path`` every update must deliver every parameter of that HF checkpoint exactly once
  with its name, shape and dtype; the fake rebuilds the state dict (``/_fake/dump`` writes it
  as safetensors for the test to compare with the trainer);
- ``update_weights_from_tensor`` payloads are unpickled with SGLang's SafeUnpickler allow-list
  and must hold tensors that live on ``--expect-device`` and were shared (IPC / shared memory),
  not copied into the request; one payload per TP rank, and TP rank ``i`` (on GPU
  ``--base-gpu-id + i``) must get memory of that GPU: on CUDA the tensor's device index, on a
  CPU (``--device-pid-dir``: ``device{g}.pid`` holds the pid of the training process standing
  for GPU ``g``) the pid in the shared-memory name; every rank's payload holds the same weights;
- after a session's update, /generate is refused until /flush_cache (the radix cache holds
  prefixes computed with the old weights).

Fault switches: --fail-first N (N x HTTP 503 on /generate), --abort-first N (N answers with
finish_reason abort), --die-after N (the process exits after N /generate answers),
--reject-generate (HTTP 400), --fail-update (weight updates answer success=false),
--stale (always reports weight version "stale").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import os
import sys

from aiohttp import web

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository root
TAGS = ("weights", "kv_cache")
API = json.load(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                                "sglang_0.5.23_api.json")))


def check_fields(body: dict, struct: str, source: str = "io_struct") -> str | None:
    fields = API[source][struct]["fields"]
    unknown = sorted(set(body) - set(fields))
    missing = sorted(k for k, f in fields.items() if f["required"] and k not in body)
    if unknown:
        return f"unknown field(s) {unknown} for {struct}"
    if missing:
        return f"missing field(s) {missing} for {struct}"
    return None


class SafeUnpickler(__import__("pickle").Unpickler):
    """SGLang's ``SafeUnpickler``: only the globals of its allow-list may be loaded."""

    ALLOWED = {tuple(x) for x in API["safe_unpickler_allowed_globals"]}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise __import__("pickle").UnpicklingError(f"SGLang would block {module}.{name}")
        if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
            return rebuild_cuda_tensor_by_uuid
        if (module, name) == ("torch.multiprocessing.reductions", "rebuild_storage_filename"):
            return rebuild_storage_filename_noting_sender
        return super().find_class(module, name)


SHM_SENDERS: set = set()  # pids of the processes whose shared memory updates were read from
OPENED: list = []  # pids whose shared memory the payload being unpickled now refers to


def rebuild_storage_filename_noting_sender(cls, manager, handle, size, dtype=None):
    """torch's own rebuild; the shared-memory name (``/torch_<pid>_...``) tells whose memory it is."""
    from torch.multiprocessing import reductions

    name = handle.decode() if isinstance(handle, bytes) else str(handle)
    parts = name.strip("/").split("_")
    if len(parts) > 1 and parts[0] == "torch" and parts[1].isdigit():
        SHM_SENDERS.add(int(parts[1]))
        OPENED.append(int(parts[1]))
    return reductions.rebuild_storage_filename(cls, manager, handle, size, dtype)


def rebuild_cuda_tensor_by_uuid(*args):
    """SGLang's monkey_patch_torch_reductions: the device travels as its UUID."""
    import torch
    from torch.multiprocessing import reductions

    args = list(args)
    if isinstance(args[6], str):
        args[6] = next(i for i in range(torch.cuda.device_count())
                       if str(torch.cuda.get_device_properties(i).uuid) == args[6])
    return reductions.rebuild_cuda_tensor(*args)


def expected_parameters(model_path: str) -> dict:
    """name -> (shape, dtype) of the HF checkpoint's tensors."""
    from safetensors import safe_open

    out = {}
    for fname in sorted(os.listdir(model_path)):
        if fname.endswith(".safetensors"):
            with safe_open(os.path.join(model_path, fname), "pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    out[name] = (list(t.shape), str(t.dtype).replace("torch.", ""))
    return out


def checksum(tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()).hexdigest()


class Fake:
    def __init__(self, args):
        self.args = args
        self.version = args.weight_version
        self.session_open = False
        self.generate_count = 0
        self.released: set[str] = set()  # memory-saver tags currently released
        self.weights: dict = {}  # the state dict rebuilt from what updates delivered
        self.session_names: set[str] = set()
        self.needs_flush = False
        self.expected = expected_parameters(args.model_path) if args.model_path else None
        self.groups: dict = {}
        self.calls: list[str] = []
        self.violations: list[str] = []
        self.senders_by_tp_rank: dict[int, set] = {}

    def bad(self, msg: str, status: int = 400):
        self.violations.append(msg)
        return web.json_response({"success": False, "message": msg}, status=status)

    def weights_resident(self, what: str):
        if "weights" in self.released:
            return self.bad(f"{what} into released weights: resume_memory_occupation(tags=['weights']) first")
        return None

    def receive(self, name: str, tensor) -> str | None:
        """Keep one delivered parameter; an error message if it is not what the model expects."""
        if name in self.session_names:
            return f"{name} delivered twice in one update"
        if self.expected is not None:
            if name not in self.expected:
                return f"{name} is not a parameter of {self.args.model_path}"
            shape, dtype = self.expected[name]
            got = (list(tensor.shape), str(tensor.dtype).replace("torch.", ""))
            if got != (shape, dtype):
                return f"{name}: got shape/dtype {got}, the model has {(shape, dtype)}"
        self.session_names.add(name)
        self.weights[name] = tensor.detach().clone()
        return None

    def complete(self) -> str | None:
        """Every parameter delivered in this update (with --model-path)?"""
        names, self.session_names = self.session_names, set()
        if self.expected is None:
            return None
        missing = sorted(set(self.expected) - names)
        if missing:
            return f"the update delivered {len(names)} of {len(self.expected)} parameters; missing {missing[:5]}"
        return None

    async def health(self, request):
        return web.Response(status=200)

    async def model_info(self, request):
        return web.json_response({"weight_version": "stale" if self.args.stale else self.version,
                                  "model_path": "fake"})

    async def server_info(self, request):
        return web.json_response({"tp_size": self.args.tp, "version": API["sglang_version"]})

    async def generate(self, request):
        body = await request.json()
        self.calls.append("generate")
        if self.released:
            return self.bad(f"generate while {sorted(self.released)} released: resume_memory_occupation first")
        if self.session_open:
            return self.bad("generate during an open weight-update session")
        if self.needs_flush:
            return self.bad("generate after a weight update without flush_cache: the radix cache holds "
                            "prefixes computed with the old weights")
        err = check_fields(body, "GenerateRequest", "api_types") or check_fields(body, "GenerateReqInput")
        sps = body.get("sampling_params")
        for one in sps if isinstance(sps, list) else [sps]:
            err = err or check_fields(one or {}, "SamplingParams", "api_types")
        if err or self.args.reject_generate:
            return self.bad(err or "rejected")
        self.generate_count += 1
        if self.generate_count <= self.args.fail_first:
            return web.Response(status=503, text="overloaded")
        if self.args.delay:
            await asyncio.sleep(self.args.delay)
        if self.args.die_after and self.generate_count > self.args.die_after:
            os._exit(17)
        ids = body["input_ids"]
        batch = ids if isinstance(ids[0], list) else None
        if batch is None:
            n = sps.get("n", 1)
            inputs, params = [ids] * n, [sps] * n
        else:
            inputs, params = batch, sps if isinstance(sps, list) else [sps] * len(batch)
        abort = self.generate_count <= self.args.fail_first + self.args.abort_first
        outs = []
        for k, (prompt, p) in enumerate(zip(inputs, params)):
            seed = p.get("sampling_seed", 0) or 0
            toks, stop = [], None
            for j in range(p["max_new_tokens"]):
                t = (sum(prompt) + 7 * k + 3 * j + seed) % 997
                toks.append(t)
                if t in (p.get("stop_token_ids") or []):
                    stop = t
                    break
            finish = {"type": "abort", "message": "aborted"} if abort else (
                {"type": "stop", "matched": stop} if stop is not None else {"type": "length", "length": len(toks)})
            outs.append({"output_ids": toks, "meta_info": {
                "id": f"r{k}", "prompt_tokens": len(prompt), "completion_tokens": len(toks),
                "finish_reason": finish, "weight_version": "stale" if self.args.stale else self.version,
                "output_token_logprobs": [[-0.01 * (j + 1) - 0.001 * k, t, None] for j, t in enumerate(toks)]}})
        return web.json_response(outs if len(outs) > 1 or batch is not None else outs[0])

    async def flush_cache(self, request):
        self.calls.append("flush_cache")
        self.needs_flush = False
        return web.Response(text="Cache flushed.\n")

    async def _struct(self, request, struct):
        body = await request.json() if request.can_read_body else {}
        name = request.path.strip("/")
        self.calls.append(name)
        return body, check_fields(body, struct)

    async def begin(self, request):
        body, err = await self._struct(request, "BeginWeightUpdateReqInput")
        if err or self.session_open:
            return self.bad(err or "a weight-update session is already open")
        refused = self.weights_resident("begin_weight_update")
        if refused:
            return refused
        self.session_open = True
        self.session_names = set()
        return web.json_response({"success": True, "message": "Success"})

    async def end(self, request):
        body, err = await self._struct(request, "EndWeightUpdateReqInput")
        if err or not self.session_open:
            return self.bad(err or "no weight-update session is open")
        self.session_open = False
        self.needs_flush = True
        incomplete = self.complete()
        if incomplete:
            return self.bad(incomplete)
        return web.json_response({"success": True, "message": "Success"})

    async def from_tensor(self, request):
        body, err = await self._struct(request, "UpdateWeightsFromTensorReqInput")
        if err:
            return self.bad(err)
        if not self.session_open:
            return self.bad("update_weights_from_tensor must run between begin_weight_update() and end_weight_update()")
        refused = self.weights_resident("update_weights_from_tensor")
        if refused:
            return refused
        if len(body["serialized_named_tensors"]) != self.args.tp:
            return self.bad("one serialized payload per TP rank expected")
        if self.args.fail_update:
            return self.bad("injected failure")
        first = None
        for tp_rank, entry in enumerate(body["serialized_named_tensors"]):
            # what engine TP rank tp_rank does with its entry (weight_updater, load_format flattened_bucket)
            OPENED.clear()
            try:
                data = SafeUnpickler(io.BytesIO(base64.b64decode(entry, validate=True))).load()
            except Exception as exc:  # noqa: BLE001
                return self.bad(f"cannot open the serialized bucket of TP rank {tp_rank}: {type(exc).__name__}: {exc}")
            flat = data["flattened_tensor"]
            if flat.device.type != self.args.expect_device:
                return self.bad(f"update_weights_from_tensor: tensors on {flat.device}, the engine's device is "
                                f"{self.args.expect_device}")
            if not (flat.is_cuda or flat.is_shared()):
                return self.bad("update_weights_from_tensor: the bucket was copied into the request instead of "
                                "shared (IPC / shared memory handles expected)")
            wrong = self.wrong_device(tp_rank, flat, list(OPENED))
            if wrong:
                return self.bad(wrong)
            self.senders_by_tp_rank.setdefault(tp_rank, set()).update(OPENED)
            if first is None:
                first = data
                for m in data["metadata"]:
                    err = self.receive(m.name, flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape))
                    if err:
                        return self.bad(err)
            elif [(m.name, m.start_idx, m.end_idx) for m in data["metadata"]] != \
                    [(m.name, m.start_idx, m.end_idx) for m in first["metadata"]] or \
                    not __import__("torch").equal(flat.cpu(), first["flattened_tensor"].cpu()):
                return self.bad(f"TP rank {tp_rank} got other weights than TP rank 0 in one update_weights_from_tensor")
        self.version = body.get("weight_version") or self.version
        return web.json_response({"success": True, "message": "Success"})

    def wrong_device(self, tp_rank: int, flat, opened: list) -> str | None:
        """TP rank ``tp_rank`` runs on GPU base_gpu_id + tp_rank and must map that GPU's memory."""
        gpu = self.args.base_gpu_id + tp_rank
        if flat.is_cuda:
            if flat.device.index != gpu:
                return (f"update_weights_from_tensor: TP rank {tp_rank} (GPU {gpu}) got a handle of memory on "
                        f"{flat.device}: each rank's entry must come from the trainer rank on its own GPU")
            return None
        if not self.args.device_pid_dir:
            return None
        path = os.path.join(self.args.device_pid_dir, f"device{gpu}.pid")
        if not os.path.exists(path):
            return f"update_weights_from_tensor: no training process stands for GPU {gpu} ({path} missing)"
        owner = int(open(path).read())
        if set(opened) != {owner}:
            return (f"update_weights_from_tensor: TP rank {tp_rank} (GPU {gpu}) got shared memory of pid(s) "
                    f"{sorted(set(opened))}, but the training process on GPU {gpu} is pid {owner}: each rank's entry "
                    f"must come from the trainer rank on its own GPU")
        return None

    async def init_group(self, request):
        body, err = await self._struct(request, "InitWeightsUpdateGroupReqInput")
        if err:
            return self.bad(err)
        from megatron_rlrt.rollout.sglang_engine import init_weights_update_group

        def join():
            return init_weights_update_group(body["master_address"], body["master_port"], body["rank_offset"],
                                             body["world_size"], body["group_name"], body["backend"], timeout_s=60)

        self.groups[body["group_name"]] = await asyncio.get_running_loop().run_in_executor(None, join)
        return web.json_response({"success": True, "message": "Succeeded to initialize custom process group."})

    async def destroy_group(self, request):
        body, err = await self._struct(request, "DestroyWeightsUpdateGroupReqInput")
        self.groups.pop(body.get("group_name"), None)
        return web.json_response({"success": True, "message": "ok"})

    async def from_distributed(self, request):
        import torch
        import torch.distributed as dist

        body, err = await self._struct(request, "UpdateWeightsFromDistributedReqInput")
        if err:
            return self.bad(err)
        refused = self.weights_resident("update_weights_from_distributed")
        if refused:
            return refused
        if not self.session_open:
            return self.bad("update_weights_from_distributed must run between begin_weight_update() and "
                            "end_weight_update()")
        group = self.groups.get(body["group_name"])
        if group is None:
            return self.bad(f"Group {body['group_name']} not in {list(self.groups)}")
        # FlattenedTensorBucket.empty: cumulative byte offsets, alignment checked per dtype
        metas, offset = [], 0
        for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
            dt = getattr(torch, dtype)
            if offset % dt.itemsize:
                return self.bad(f"Unaligned received tensor {name}")
            size = int(torch.Size(shape).numel()) * dt.itemsize
            metas.append((name, dt, shape, offset, offset + size))
            offset += size
        flat = torch.empty(offset, dtype=torch.uint8)
        await asyncio.get_running_loop().run_in_executor(None, lambda: dist.broadcast(flat, src=0, group=group))
        for name, dt, shape, start, end in metas:
            err = self.receive(name, flat[start:end].view(dt).reshape(shape))
            if err:
                return self.bad(err)
        if self.args.fail_update:
            return self.bad("injected failure")
        self.version = body.get("weight_version") or self.version
        return web.json_response({"success": True, "message": "Succeeded to update parameter online."})

    async def from_disk(self, request):
        from safetensors.torch import load_file

        body, err = await self._struct(request, "UpdateWeightFromDiskReqInput")
        if err:
            return self.bad(err)
        refused = self.weights_resident("update_weights_from_disk")
        if refused:
            return refused
        if self.args.fail_update:
            return self.bad("injected failure")
        path = body["model_path"]
        self.session_names = set()
        for fname in sorted(os.listdir(path)):
            if fname.endswith(".safetensors"):
                for name, t in load_file(os.path.join(path, fname)).items():
                    err = self.receive(name, t)
                    if err:
                        return self.bad(err)
        incomplete = self.complete()
        if incomplete:
            return self.bad(incomplete)
        self.needs_flush = not body.get("flush_cache", True)
        self.version = body.get("weight_version") or self.version
        return web.json_response({"success": True, "message": "Succeeded", "num_paused_requests": 0})

    async def set_version(self, request):
        body, err = await self._struct(request, "UpdateWeightVersionReqInput")
        if err:
            return self.bad(err)
        self.version = body["new_version"]
        return web.json_response({"success": True, "message": "ok", "new_version": self.version})

    async def release(self, request):
        body, err = await self._struct(request, "ReleaseMemoryOccupationReqInput")
        if err:
            return self.bad(err)
        tags = set(body.get("tags") or TAGS)
        if tags - set(TAGS):
            return self.bad(f"unknown memory tags {sorted(tags - set(TAGS))}")
        if not self.args.memory_saver:
            return self.bad("release_memory_occupation needs a server launched with --enable-memory-saver")
        if self.session_open:
            return self.bad("release_memory_occupation during an open weight-update session")
        if tags & self.released:
            return self.bad(f"release {sorted(tags & self.released)}: already released")
        self.released |= tags
        return web.Response(status=200)

    async def resume(self, request):
        body, err = await self._struct(request, "ResumeMemoryOccupationReqInput")
        if err:
            return self.bad(err)
        tags = set(body.get("tags") or TAGS)
        if tags - self.released:
            return self.bad(f"resume {sorted(tags - self.released)}: not released")
        if "kv_cache" in tags and "weights" in self.released - tags:
            return self.bad("resume the weights (and update them) before the KV cache")
        self.released -= tags
        return web.Response(status=200)

    async def state(self, request):
        return web.json_response({
            "calls": self.calls, "weights": {n: checksum(t) for n, t in self.weights.items()},
            "version": self.version, "released": sorted(self.released), "generate_count": self.generate_count,
            "violations": self.violations, "shm_senders": sorted(SHM_SENDERS), "pid": os.getpid(),
            "senders_by_tp_rank": {str(k): sorted(v) for k, v in self.senders_by_tp_rank.items()}})

    async def dump(self, request):
        """Write the rebuilt state dict as safetensors to the path in the body."""
        from safetensors.torch import save_file

        body = await request.json()
        save_file({n: t.contiguous() for n, t in self.weights.items()}, body["path"])
        return web.json_response({"tensors": len(self.weights)})


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--weight-version", default="0")
    p.add_argument("--fail-first", type=int, default=0)
    p.add_argument("--abort-first", type=int, default=0)
    p.add_argument("--die-after", type=int, default=0)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--reject-generate", action="store_true")
    p.add_argument("--fail-update", action="store_true")
    p.add_argument("--stale", action="store_true")
    p.add_argument("--model-path", default=None, help="HF checkpoint: every update must deliver all its tensors")
    p.add_argument("--expect-device", default="cpu", help="device update_weights_from_tensor tensors must be on")
    p.add_argument("--enable-memory-saver", dest="memory_saver", action="store_true")
    p.add_argument("--base-gpu-id", type=int, default=0, help="the first GPU of this server (SGLang's flag)")
    p.add_argument("--device-pid-dir", default=None,
                   help="CPU stand-in for GPUs: device{g}.pid = pid of the training process on GPU g")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--router-for", default=None,
                   help="act as sglang-router over these comma-separated server URLs: /generate is forwarded")
    args = p.parse_args(argv)
    if args.router_for:
        return run_router(args)
    fake = Fake(args)
    app = web.Application(client_max_size=1 << 30)
    app.add_routes([
        web.get("/health", fake.health), web.get("/model_info", fake.model_info),
        web.get("/server_info", fake.server_info), web.post("/generate", fake.generate),
        web.post("/flush_cache", fake.flush_cache), web.post("/begin_weight_update", fake.begin),
        web.post("/end_weight_update", fake.end), web.post("/update_weights_from_tensor", fake.from_tensor),
        web.post("/init_weights_update_group", fake.init_group),
        web.post("/destroy_weights_update_group", fake.destroy_group),
        web.post("/update_weights_from_distributed", fake.from_distributed),
        web.post("/update_weights_from_disk", fake.from_disk), web.post("/update_weight_version", fake.set_version),
        web.post("/release_memory_occupation", fake.release), web.post("/resume_memory_occupation", fake.resume),
        web.get("/_fake/state", fake.state), web.post("/_fake/dump", fake.dump),
    ])
    for route in ("/generate", "/flush_cache", "/begin_weight_update", "/update_weights_from_tensor",
                  "/init_weights_update_group", "/update_weights_from_distributed", "/update_weights_from_disk",
                  "/release_memory_occupation", "/model_info", "/health"):
        assert route in API["routes"], route  # the fake serves only routes real SGLang has
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


def run_router(args) -> None:
    """A stand-in for sglang-router 0.3.2: /generate forwarded round-robin to the workers."""
    import aiohttp

    workers = [u.strip().rstrip("/") for u in args.router_for.split(",") if u.strip()]
    state = {"next": 0, "forwarded": {u: 0 for u in workers}, "pid": os.getpid()}

    async def generate(request):
        body = await request.read()
        url = workers[state["next"] % len(workers)]
        state["next"] += 1
        state["forwarded"][url] += 1
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/generate", data=body,
                                    headers={"Content-Type": "application/json"}) as resp:
                return web.Response(status=resp.status, body=await resp.read(), content_type="application/json")

    async def health(request):
        return web.Response(status=200)

    async def router_state(request):
        return web.json_response(state)

    app = web.Application(client_max_size=1 << 30)
    app.add_routes([web.post("/generate", generate), web.get("/health", health),
                    web.get("/_fake/state", router_state)])
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
