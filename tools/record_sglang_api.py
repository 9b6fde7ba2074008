#!/usr/bin/env python
"""Record SGLang's HTTP API (request structs, routes, server flags) from its source, as JSON.

SGLang cannot be installed on CPU-only CI (it pins CUDA torch, flashinfer, sgl-kernel, ...),
so the tests check our payloads against the field lists read here from SGLang's own source
with ``ast`` (nothing is imported). Re-record when moving to a new SGLang:

    pip download --no-deps sglang==0.5.23 sglang-router==0.3.2 -d /tmp/sgl
    python tools/record_sglang_api.py --sglang-wheel /tmp/sgl/sglang-0.5.23-*.whl \
        --router-wheel /tmp/sgl/sglang_router-0.3.2-*.whl --output tests/data/sglang_0.5.23_api.json

What is recorded: for every class in ``srt/managers/io_struct.py`` and ``api/v1/api_types.py``
that our builders use, its fields (name, annotation, required or not; fields inherited from
``BaseReq`` included) and, for api_types structs, whether unknown keys are rejected; the
routes of ``srt/entrypoints/http_server.py``; ``SafeUnpickler.ALLOWED_GLOBALS``; the
``ServerArgs`` fields and aliases (``srt/arg_groups/fields/*.py``); sglang-router's flags.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import zipfile

IO_STRUCTS = [
    "BaseReq", "GenerateReqInput", "UpdateWeightsFromTensorReqInput", "InitWeightsUpdateGroupReqInput",
    "DestroyWeightsUpdateGroupReqInput", "UpdateWeightsFromDistributedReqInput", "UpdateWeightFromDiskReqInput",
    "UpdateWeightVersionReqInput", "ReleaseMemoryOccupationReqInput", "ResumeMemoryOccupationReqInput",
    "PauseGenerationReqInput", "ContinueGenerationReqInput", "FlushCacheReqInput", "BeginWeightUpdateReqInput",
    "EndWeightUpdateReqInput",
]
API_TYPES = ["GenerateRequest", "SamplingParams", "GenerateResponse", "GenerateMetaInfo", "FinishStop",
             "FinishLength", "FinishAbort", "LogprobEntry"]


def _class_fields(tree: ast.Module, names: list[str], base_fields: dict | None = None) -> dict:
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in names:
            fields = {}
            bases = [ast.unparse(b) for b in node.bases]
            if base_fields and "BaseReq" in bases:
                fields.update(base_fields)
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    value = stmt.value
                    required = value is None
                    if isinstance(value, ast.Call) and ast.unparse(value.func) == "field":
                        kws = {k.arg for k in value.keywords}
                        required = not ({"default", "default_factory"} & kws)
                    fields[stmt.target.id] = {"type": ast.unparse(stmt.annotation), "required": required}
            doc = ast.get_docstring(node) or ""
            entry = {"bases": bases, "fields": fields}
            if "unknown keys rejected" in doc:
                entry["unknown_keys"] = "rejected"
            elif "unknown keys ignored" in doc:
                entry["unknown_keys"] = "ignored"
            out[node.name] = entry
    missing = set(names) - set(out)
    if missing:
        raise SystemExit(f"classes not found: {sorted(missing)}")
    return out


def _routes(src: str) -> dict:
    tree = ast.parse(src)
    routes: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in node.decorator_list:
                if not isinstance(dec, ast.Call) or not isinstance(dec.func, ast.Attribute):
                    continue
                kind = dec.func.attr
                if kind not in ("get", "post", "put", "api_route") or not dec.args:
                    continue
                if not isinstance(dec.args[0], ast.Constant):
                    continue
                path = dec.args[0].value
                if kind == "api_route":
                    methods = next((ast.literal_eval(k.value) for k in dec.keywords if k.arg == "methods"), ["GET"])
                else:
                    methods = [kind.upper()]
                routes.setdefault(path, [])
                routes[path] = sorted(set(routes[path]) | set(methods))
    return dict(sorted(routes.items()))


def _allowed_globals(src: str) -> list[list[str]]:
    tree = ast.parse(src)
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "SafeUnpickler":
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and any(getattr(t, "id", "") == "ALLOWED_GLOBALS" for t in stmt.targets):
                    return sorted([list(x) for x in ast.literal_eval(stmt.value)])
    raise SystemExit("SafeUnpickler.ALLOWED_GLOBALS not found")


def _server_args(files: dict[str, str]) -> dict:
    """ServerArgs fields: ``name: A[type, "help"] = default`` or ``A[type, Arg(aliases=[...])]``."""
    out = {}
    for path, src in sorted(files.items()):
        tree = ast.parse(src)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for stmt in node.body:
                    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                        ann = stmt.annotation
                        if not (isinstance(ann, ast.Subscript) and ast.unparse(ann.value) == "A"):
                            continue
                        name = stmt.target.id
                        aliases = re.findall(r"aliases=\[([^\]]*)\]", ast.unparse(ann))
                        alias_list = re.findall(r"'([^']+)'", aliases[0]) if aliases else []
                        out[name] = ["--" + name.replace("_", "-"), *alias_list]
    return dict(sorted(out.items()))


def _router_flags(src: str) -> list[str]:
    flags = set(re.findall(r'"(--[a-z0-9-]+)"', src))
    flags |= {"--" + m for m in re.findall(r'f"--\{prefix\}([a-z0-9-]+)"', src)}
    return sorted(flags)


def _read_wheel(path: str, members: list[str]) -> dict[str, str]:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        out = {}
        for want in members:
            if want.endswith("/"):
                for n in names:
                    if n.startswith(want) and n.endswith(".py"):
                        out[n] = z.read(n).decode()
            else:
                out[want] = z.read(want).decode()
        return out


def _wheel_version(path: str) -> str:
    """The distribution version from the wheel's METADATA (version.py may say 0.0.0.dev0)."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return re.search(r"^Version: (\S+)$", z.read(meta).decode(), re.M).group(1)


def record(sglang_wheel: str, router_wheel: str | None) -> dict:
    files = _read_wheel(sglang_wheel, [
        "sglang/srt/managers/io_struct.py", "sglang/api/v1/api_types.py", "sglang/srt/entrypoints/http_server.py",
        "sglang/srt/utils/common.py", "sglang/srt/arg_groups/fields/",
    ])
    version = _wheel_version(sglang_wheel)
    io_tree = ast.parse(files["sglang/srt/managers/io_struct.py"])
    base = _class_fields(io_tree, ["BaseReq"])["BaseReq"]["fields"]
    out = {
        "sglang_version": version,
        "source": os.path.basename(sglang_wheel),
        "io_struct": _class_fields(io_tree, IO_STRUCTS, base_fields=base),
        "api_types": _class_fields(ast.parse(files["sglang/api/v1/api_types.py"]), API_TYPES),
        "routes": _routes(files["sglang/srt/entrypoints/http_server.py"]),
        "safe_unpickler_allowed_globals": _allowed_globals(files["sglang/srt/utils/common.py"]),
        "server_args": _server_args({k: v for k, v in files.items() if "/arg_groups/fields/" in k}),
    }
    if router_wheel:
        rfiles = _read_wheel(router_wheel, ["sglang_router/router_args.py"])
        out["sglang_router_version"] = _wheel_version(router_wheel)
        out["router_flags"] = _router_flags(rfiles["sglang_router/router_args.py"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sglang-wheel", required=True,
                   help="SGLang wheel to read the source from (pip download --no-deps sglang==VERSION)")
    p.add_argument("--router-wheel", default=None,
                   help="sglang-router wheel whose launch_router flags are recorded too (optional)")
    p.add_argument("--output", required=True, help="JSON file to write (e.g. tests/data/sglang_0.5.23_api.json)")
    args = p.parse_args(argv)
    data = record(args.sglang_wheel, args.router_wheel)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False)
        f.write("\n")
    print(f"recorded SGLang {data['sglang_version']}: {len(data['io_struct'])} io_struct classes, "
          f"{len(data['routes'])} routes, {len(data['server_args'])} server args -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
