"""Every SGLang payload we build, field by field, against SGLang 0.5.23's own request structs.

SGLang cannot be installed here (CUDA-only pins), so the structs' field lists were read from
the 0.5.23 wheel's source by tools/record_sglang_api.py and committed as
tests/data/sglang_0.5.23_api.json (io_struct.py dataclasses/msgspec structs, the generated
api_types.py JSON contract of /generate, http_server.py routes, SafeUnpickler's allowlist,
ServerArgs flags, sglang-router flags)."""

from __future__ import annotations

import base64
import io
import json
import os
import pickle

import pytest
import torch

from megatron_rlrt.rollout import sglang_protocol as sp
from megatron_rlrt.rollout.base import SamplingParams
from megatron_rlrt.rollout.launch import EnginePlacement, sglang_router_command, sglang_server_command

API = json.load(open(os.path.join(os.path.dirname(__file__), "data", "sglang_0.5.23_api.json")))


def check(body: dict, struct: str, source: str = "io_struct"):
    fields = API[source][struct]["fields"]
    assert set(body) <= set(fields), f"{struct}: unknown {sorted(set(body) - set(fields))}"
    required = {k for k, f in fields.items() if f["required"]}
    assert required <= set(body), f"{struct}: missing {sorted(required - set(body))}"


def test_recorded_version_matches_the_code():
    assert API["sglang_version"] == sp.SGLANG_VERSION and API["sglang_router_version"] == sp.SGLANG_ROUTER_VERSION


def test_routes_exist_with_their_methods():
    for name, (method, path, struct) in sp.ROUTES.items():
        assert path in API["routes"], name
        assert method in API["routes"][path], (name, API["routes"][path])
        if struct and struct in API["io_struct"]:
            assert API["io_struct"][struct]["fields"] is not None
    assert "/get_weight_version" not in API["routes"]  # 0.5.23 reports the version in /model_info


@pytest.mark.parametrize("seed", [None, 3])
def test_generate_body_matches_generate_req_input_and_json_contract(seed):
    params = SamplingParams(max_new_tokens=16, temperature=0.7, top_p=0.9, top_k=20, stop_token_ids=(5, 6), seed=seed)
    body = sp.GenerateRequest.build([1, 2, 3], params, n=4, seed=seed, rid="r1").to_json()
    check(body, "GenerateReqInput")
    check(body, "GenerateRequest", "api_types")  # the /generate JSON contract gate
    assert API["api_types"]["SamplingParams"]["unknown_keys"] == "rejected"
    check(body["sampling_params"], "SamplingParams", "api_types")
    assert body["return_logprob"] is True and body["logprob_start_len"] == -1 and body["input_ids"] == [1, 2, 3]
    sampling = body["sampling_params"]
    assert sampling["n"] == 4 and sampling["stop_token_ids"] == [5, 6] and sampling["top_k"] == 20
    assert ("sampling_seed" in sampling) == (seed is not None)
    assert sp.sampling_params_json(SamplingParams(max_new_tokens=1), 1)["top_k"] == -1


def test_weight_payloads_field_by_field():
    bucket = [("a", torch.zeros(2, 3, dtype=torch.bfloat16)), ("b", torch.zeros(4))]
    cases = {
        "UpdateWeightsFromTensorReqInput": sp.UpdateWeightsFromTensorRequest(["eA=="] * 2, weight_version="3"),
        "InitWeightsUpdateGroupReqInput": sp.InitWeightsUpdateGroupRequest("10.0.0.1", 40000, 1, 9),
        "DestroyWeightsUpdateGroupReqInput": sp.DestroyWeightsUpdateGroupRequest(),
        "UpdateWeightsFromDistributedReqInput": sp.UpdateWeightsFromDistributedRequest.for_bucket(bucket,
                                                                                                  weight_version="3"),
        "UpdateWeightFromDiskReqInput": sp.UpdateWeightFromDiskRequest("/ckpt", weight_version="3"),
        "UpdateWeightVersionReqInput": sp.UpdateWeightVersionRequest("3"),
        "ReleaseMemoryOccupationReqInput": sp.ReleaseMemoryOccupationRequest(),
        "ResumeMemoryOccupationReqInput": sp.ResumeMemoryOccupationRequest(tags=["weights"]),
        "PauseGenerationReqInput": sp.PauseGenerationRequest(),
        "ContinueGenerationReqInput": sp.ContinueGenerationRequest(),
        "BeginWeightUpdateReqInput": sp.BeginWeightUpdateRequest(),
        "EndWeightUpdateReqInput": sp.EndWeightUpdateRequest(),
    }
    for struct, payload in cases.items():
        assert payload.STRUCT == struct
        check(payload.to_json(), struct)
        for name, (_, _, route_struct) in sp.ROUTES.items():
            if route_struct == struct:
                break
        else:
            pytest.fail(f"{struct} has no route")
    dist = cases["UpdateWeightsFromDistributedReqInput"].to_json()
    assert dist["dtypes"] == ["bfloat16", "float32"] and dist["shapes"] == [[2, 3], [4]]
    assert dist["load_format"] == "flattened_bucket"
    # the type SGLang declares for each field we send
    assert API["io_struct"]["UpdateWeightsFromDistributedReqInput"]["fields"]["dtypes"]["type"] == "List[str]"
    assert API["io_struct"]["InitWeightsUpdateGroupReqInput"]["fields"]["master_port"]["type"] == "int"
    assert API["io_struct"]["UpdateWeightsFromTensorReqInput"]["fields"]["serialized_named_tensors"]["type"].startswith(
        "Annotated[List[bytes]")


class RestrictedUnpickler(pickle.Unpickler):
    """SGLang's SafeUnpickler rule, with the allowlist recorded from its source."""

    ALLOWED = {tuple(x) for x in API["safe_unpickler_allowed_globals"]}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"SGLang would block {module}.{name}")
        return super().find_class(module, name)


def test_flattened_bucket_payload_passes_sglang_safe_unpickler_and_rebuilds():
    g = torch.Generator().manual_seed(0)
    bucket = [("w1", torch.randn(3, 5, generator=g).to(torch.bfloat16)), ("n", torch.rand(7, generator=g)),
              ("w2", torch.randn(2, 2, generator=g).to(torch.bfloat16)), ("i", torch.arange(3))]
    flat, meta = sp.flatten_bucket(bucket, align=16)
    payload = sp.serialize_flattened_bucket(flat, meta)
    data = RestrictedUnpickler(io.BytesIO(base64.b64decode(payload, validate=True))).load()
    assert set(data) == {"flattened_tensor", "metadata"}
    # what SGLang's weight_updater reads from each metadata entry
    for m in data["metadata"]:
        assert {"name", "shape", "dtype", "start_idx", "end_idx", "numel"} <= set(vars(m))
    rebuilt = sp.unflatten_bucket(data["flattened_tensor"], data["metadata"])
    assert [n for n, _ in rebuilt] == [n for n, _ in bucket]
    for (_, a), (_, b) in zip(rebuilt, bucket):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(ValueError, match="split the bucket by dtype"):
        sp.flatten_bucket(bucket, align=1)  # a broadcast bucket must be one dtype
    assert [len(p) for p in sp.split_by_dtype(bucket)] == [2, 1, 1]


def test_parse_generate_response():
    def out(ids, finish="length", lp_ids=None):
        return {"output_ids": ids, "meta_info": {"finish_reason": {"type": finish}, "weight_version": "2",
                                                  "output_token_logprobs": [[-0.5, t, None] for t in (lp_ids or ids)]}}

    one = sp.parse_generate_response(out([4, 5]), 1, 7)
    assert one[0].response_ids == [4, 5] and one[0].logprobs == [-0.5, -0.5] and one[0].prompt_index == 7
    assert one[0].meta["weight_version"] == "2"
    two = sp.parse_generate_response([out([1]), out([2], "stop")], 2, 0)
    assert [s.finish_reason for s in two] == ["length", "stop"]
    for bad, n in [([out([1])], 2), (out([1], "abort"), 1), (out([1, 2], lp_ids=[1, 3]), 1), ({"text": "x"}, 1)]:
        with pytest.raises(ValueError):
            sp.parse_generate_response(bad, n, 0)
    with pytest.raises(Exception):
        sp.GenerateRequest.build([], SamplingParams(max_new_tokens=1), 1)


def test_server_and_router_flags_exist():
    known = {f for flags in API["server_args"].values() for f in flags}
    cmd = sglang_server_command("/m", EnginePlacement(0, 2, 2, "0.0.0.0", 30000, 31000), python="py",
                                mem_fraction_static=0.7, enable_memory_saver=True, dtype="bfloat16",
                                weight_version="0", seed=1)
    flags = [a for a in cmd if a.startswith("--")]
    assert set(flags) <= known, sorted(set(flags) - known)
    assert cmd[cmd.index("--tp-size") + 1] == "2" and cmd[cmd.index("--base-gpu-id") + 1] == "2"
    multi = sp.server_args(model_path="/m", host="h", port=1, nnodes=2, node_rank=1, dist_init_addr="h:5000")
    assert {a for a in multi if a.startswith("--")} <= known
    router = sglang_router_command(["http://a:1", "http://b:2"], "0.0.0.0", 29000, python="py")
    assert {a for a in router if a.startswith("--")} <= set(API["router_flags"])
