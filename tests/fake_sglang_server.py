"""A fake SGLang HTTP server for the engine tests (run as its own process on 127.0.0.1).

It serves the SGLang 0.5.23 routes the engine uses and validates every body against the
field lists recorded from SGLang's source (tests/data/sglang_0.5.23_api.json): unknown or
missing fields get HTTP 400, as SGLang's own validation gives. Weight-update semantics follow
SGLang's scheduler: update_weights_from_tensor / _from_distributed only inside a
begin/end_weight_update session; the distributed path really joins the trainer's process group
(gloo) the way SGLang does and receives the flattened bucket by broadcast.

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
import json
import os
import sys

from aiohttp import web

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sglang_0.5.23_api.json")))


def check_fields(body: dict, struct: str, source: str = "io_struct") -> str | None:
    fields = API[source][struct]["fields"]
    unknown = sorted(set(body) - set(fields))
    missing = sorted(k for k, f in fields.items() if f["required"] and k not in body)
    if unknown:
        return f"unknown field(s) {unknown} for {struct}"
    if missing:
        return f"missing field(s) {missing} for {struct}"
    return None


def checksum(tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()).hexdigest()


class Fake:
    def __init__(self, args):
        self.args = args
        self.version = args.weight_version
        self.session_open = False
        self.generate_count = 0
        self.released = False
        self.weights: dict[str, str] = {}
        self.groups: dict = {}
        self.calls: list[str] = []

    def bad(self, msg: str, status: int = 400):
        return web.json_response({"success": False, "message": msg}, status=status)

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
        self.session_open = True
        return web.json_response({"success": True, "message": "Success"})

    async def end(self, request):
        body, err = await self._struct(request, "EndWeightUpdateReqInput")
        if err or not self.session_open:
            return self.bad(err or "no weight-update session is open")
        self.session_open = False
        return web.json_response({"success": True, "message": "Success"})

    async def from_tensor(self, request):
        body, err = await self._struct(request, "UpdateWeightsFromTensorReqInput")
        if err:
            return self.bad(err)
        if not self.session_open:
            return self.bad("update_weights_from_tensor must run between begin_weight_update() and end_weight_update()")
        if len(body["serialized_named_tensors"]) != self.args.tp:
            return self.bad("one serialized payload per TP rank expected")
        base64.b64decode(body["serialized_named_tensors"][0], validate=True)
        if self.args.fail_update:
            return self.bad("injected failure")
        self.version = body.get("weight_version") or self.version
        return web.json_response({"success": True, "message": "Success"})

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
            self.weights[name] = checksum(flat[start:end].view(dt).reshape(shape))
        if self.args.fail_update:
            return self.bad("injected failure")
        self.version = body.get("weight_version") or self.version
        return web.json_response({"success": True, "message": "Succeeded to update parameter online."})

    async def from_disk(self, request):
        from safetensors.torch import load_file

        body, err = await self._struct(request, "UpdateWeightFromDiskReqInput")
        if err:
            return self.bad(err)
        if self.args.fail_update:
            return self.bad("injected failure")
        path = body["model_path"]
        for fname in sorted(os.listdir(path)):
            if fname.endswith(".safetensors"):
                for name, t in load_file(os.path.join(path, fname)).items():
                    self.weights[name] = checksum(t)
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
        self.released = True
        return web.Response(status=200) if not err else self.bad(err)

    async def resume(self, request):
        body, err = await self._struct(request, "ResumeMemoryOccupationReqInput")
        self.released = False
        return web.Response(status=200) if not err else self.bad(err)

    async def state(self, request):
        return web.json_response({"calls": self.calls, "weights": self.weights, "version": self.version,
                                  "released": self.released, "generate_count": self.generate_count})


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
    args = p.parse_args(argv)
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
        web.get("/_fake/state", fake.state),
    ])
    for route in ("/generate", "/flush_cache", "/begin_weight_update", "/update_weights_from_tensor",
                  "/init_weights_update_group", "/update_weights_from_distributed", "/update_weights_from_disk",
                  "/release_memory_occupation", "/model_info", "/health"):
        assert route in API["routes"], route  # the fake serves only routes real SGLang has
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
