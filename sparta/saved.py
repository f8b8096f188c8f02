"""Saved plans: ``compiled.save(path)`` and ``sparta.load(path, model)``.

A saved plan is one safetensors file: every tensor (the compiled graph's buffers — folded
weights, kept-index tables, input masks —, the masked weight and mask of each generated kernel,
the propagated masks of the report, the example inputs) in safetensors, and everything else as
JSON in the file's metadata under ``"sparta"`` (``FORMAT`` versioned): the compiled graph as
data (node op, target by name, arguments), the plan's choices and reasons, the report, the
kernels' recipes and cache keys, and the model's signature (names, shapes, dtypes, a digest of
its weights). There is no pickle and no code in the file: graph targets resolve only to
registered ``torch.ops`` and a fixed list of functions (``FUNCTIONS``); kernels are generated
again from their masked weights by sparta's own generators (so the kernel cache may be empty on
the loading machine: a missing library is built, a cached one found by its key).

``load`` does not trace, propagate or measure: it checks the model against the signature
(``SpartaError`` naming the first mismatch), rebuilds the graph and the kernels and returns the
``CompiledModel``. ``CompiledModel.planned()`` traces the model again only when asked (by
``sparta.measure``), with the saved masks instead of propagation.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from .decompose import Decomposed, Split
from .errors import PlanFileError
from .graph_json import decode, encode, graph_from_json, graph_to_json
from .tesa import Pattern, reduced

if TYPE_CHECKING:
    from .choice import Plan
    from .compile import CompiledModel
    from .propagate import Propagated

FORMAT = 4
KEY = "sparta"
KERNEL_FAMILIES = ("nm_cpu", "sparse_cpu", "triton", "triton-swiglu", "cusparselt", "triton-sddmm",
                   "triton-sparse-input")  # fmt: skip


# ------------------------------------------------------------------ the model's signature


def signature(model: torch.nn.Module) -> dict[str, Any]:
    """Names, shapes and dtypes of the model's parameters and buffers, and a digest of their
    values (BLAKE2b over the bytes, in name order)."""
    h = hashlib.blake2b(digest_size=16)
    tensors: dict[str, list] = {}
    items = list(model.named_parameters(remove_duplicate=False))
    items += list(model.named_buffers(remove_duplicate=False))
    for name, t in sorted(items, key=lambda kv: kv[0]):
        tensors[name] = [list(t.shape), str(t.dtype).removeprefix("torch.")]
        h.update(name.encode())
        data = t.detach()
        if data.numel():
            h.update(data.contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"tensors": tensors, "digest": h.hexdigest()}


def check_signature(saved: Mapping[str, Any], got: Mapping[str, Any]) -> None:
    """PlanFileError naming the first difference between a saved signature and ``got`` (the
    ``signature`` of the model the plan is loaded for)."""
    want_t, got_t = saved["tensors"], got["tensors"]
    missing = sorted(set(want_t) - set(got_t))
    extra = sorted(set(got_t) - set(want_t))
    fix = "load the plan with the model it was compiled from, or compile this model again."
    if missing or extra:
        raise PlanFileError(
            f"the model does not match the saved plan: it lacks {missing[:5]} and has "
            f"{extra[:5]} that the plan's model did not; {fix}"
        )
    for name, (shape, dtype) in want_t.items():
        if got_t[name] != [shape, dtype]:
            raise PlanFileError(
                f"the model does not match the saved plan: {name!r} is {got_t[name][1]} of shape "
                f"{tuple(got_t[name][0])}, the plan's model had {dtype} of shape {tuple(shape)}; "
                f"{fix}"
            )
    if got["digest"] != saved["digest"]:
        raise PlanFileError(
            f"the model does not match the saved plan: same names, shapes and dtypes but "
            f"different weight values (digest {got['digest']} vs {saved['digest']}); {fix}"
        )


# ------------------------------------------------------------------ masks, reduced


def _put_masks(masks: Mapping[fx.Node, Any], tensors: dict[str, torch.Tensor]) -> dict:
    shapes: dict[str, Any] = {}
    for n, m in masks.items():
        if isinstance(m, torch.Tensor):
            tensors[f"pmask/{n.name}"] = reduced(m.cpu())
            shapes[n.name] = list(m.shape)
        elif isinstance(m, tuple) and all(x is None or isinstance(x, torch.Tensor) for x in m):
            for i, x in enumerate(m):
                if x is not None:
                    tensors[f"pmask/{n.name}/{i}"] = reduced(x.cpu())
            shapes[n.name] = {"tuple": [None if x is None else list(x.shape) for x in m]}
    return shapes


def _get_mask(name: str, shape: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(shape, dict):
        return tuple(
            None if s is None else tensors[f"pmask/{name}/{i}"].expand(s)
            for i, s in enumerate(shape["tuple"])
        )
    return tensors[f"pmask/{name}"].expand(shape)


# ------------------------------------------------------------------ kernels


def _kernel_recipes(
    p: Propagated, plan: Plan, gm: fx.GraphModule, tensors: dict[str, torch.Tensor]
) -> tuple[list[dict], set[str]]:
    """How to generate each kernel of ``plan`` again, and the buffers it regenerates."""
    from .choice import masked_weight
    from .plan import MATMULS, fusable_activation, kernel_operands

    by_table: dict[int, fx.Node] = {}  # a kernel's packed table -> the kernel's call
    for e in gm.graph.nodes:
        for a in e.args if e.op == "call_function" else ():
            t = (
                getattr(gm, str(a.target), None)
                if isinstance(a, fx.Node) and a.op == "get_attr"
                else None
            )
            if isinstance(t, torch.Tensor):
                by_table.setdefault(t.data_ptr(), e)
    by_module = {
        id(gm.get_submodule(str(e.target))): e for e in gm.graph.nodes if e.op == "call_module"
    }
    recipes, regenerated = [], set()

    def located(n: fx.Node, mod: torch.nn.Module) -> tuple[fx.Node, list, dict]:
        """The compiled graph's call of kernel ``mod``, its table names and static config."""
        if hasattr(mod, "op_call"):  # a registered op reading packed tables
            call = mod.op_call()
            first = next(t for _, t in call.tables if t is not None)
            e = by_table.get(first.data_ptr())
            found = e is not None and e.target is call.op
            key, n_tables = dict(call.static), len(call.tables)
        else:  # a submodule (2:4 semi-structured weights), rebuilt from the masked weight
            e = by_module.get(id(mod))
            found, key, n_tables = e is not None, {}, 0
        if not found:
            raise PlanFileError(f"the kernel of node {n.name} is not in the compiled graph.")
        args = e.args[len(e.args) - n_tables :]  # the tables follow the activations
        tables = [a.target if isinstance(a, fx.Node) else None for a in args]
        regenerated.update(t for t in tables if t is not None)
        return e, tables, key

    for n, c in plan.choices.items():
        if c.impl in ("dense", "shrink", "fused"):
            continue
        families = c.impl.removeprefix("shrink+").split("+")
        if any(f not in KERNEL_FAMILIES for f in families):
            raise PlanFileError(
                f"node {n.name} runs a {c.impl} kernel, which a saved plan cannot hold yet "
                f"(saved: {', '.join(KERNEL_FAMILIES)} kernels and their sums)."
            )
        if n.target in MATMULS:  # attention products: rebuilt from their 2-D pattern
            e, tables, key = located(n, c.module)
            tensors[f"kernel/{e.name}/mask"] = c.module.pattern.contiguous()
            recipes.append(
                {
                    "node": e.name,
                    "plan_node": n.name,
                    "family": c.impl,
                    "part": [0, 1],
                    "block": c.module.block,
                    "dtype": str(c.module.dtype).removeprefix("torch."),
                    "tables": tables,
                    "key": key,
                    "module": None,
                }
            )
            continue
        w, wm, b, pattern = kernel_operands(p, n, c, plan.device)
        act_node, act = fusable_activation(n)
        x = p.traced.example[n.args[0]]
        parts: list[tuple] = [(c.module, w, wm, b, pattern)]
        if isinstance(c.module, Decomposed):  # one kernel per part; the first has the bias
            split = c.module.split
            parts = [
                (mod, w * pm.to(w.device), pm, b if i == 0 else None, pat)
                for i, (mod, pm, pat) in enumerate(zip(c.module.parts, split.masks, split.patterns))
            ]
        for i, (mod, pw, pm, pb, pat) in enumerate(parts):
            e, tables, key = located(n, mod)
            put = {"": (pw, pm, pb)}
            if c.impl == "triton-swiglu":  # the up projection's weight too (c.fused[1])
                put["up_"] = masked_weight(p, c.fused[1], plan.device)
            for pre, (tw, tm, tb) in put.items():
                tensors[f"kernel/{e.name}/{pre}weight"] = tw.detach().cpu().contiguous()
                tensors[f"kernel/{e.name}/{pre}mask"] = tm.cpu().contiguous()
                if tb is not None:
                    tensors[f"kernel/{e.name}/{pre}bias"] = tb.detach().cpu().contiguous()
            recipes.append(
                {
                    "node": e.name,
                    "plan_node": n.name,
                    "family": families[i],
                    "part": [i, len(parts)],
                    "activation": act if act_node is not None and act_node in c.fused else None,
                    "nm": [pat.n, pat.m] if pat.kind == "nm" else None,
                    "tokens": x.numel() // x.shape[-1],
                    "tables": tables,
                    "key": key,
                    "module": e.target if e.op == "call_module" else None,
                }
            )
    return recipes, regenerated


def _pattern(r: Mapping[str, Any]) -> Pattern:
    if r["nm"] is not None:
        return Pattern("nm", n=r["nm"][0], m=r["nm"][1], dim=1)
    return Pattern("unstructured")


def _build_kernel(r: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], device):
    from .families import builder

    if r["family"] in ("triton-sddmm", "triton-sparse-input"):
        from .codegen import triton_gen

        build = triton_gen.build_sddmm if r["family"] == "triton-sddmm" else (
            triton_gen.build_sparse_input_matmul)  # fmt: skip
        pattern = tensors[f"kernel/{r['node']}/mask"]
        dtype = getattr(torch, r["dtype"])
        return build(pattern, r["block"], dtype=dtype, device=device, node=r["plan_node"])
    w = tensors[f"kernel/{r['node']}/weight"].to(device)
    wm = tensors[f"kernel/{r['node']}/mask"].to(device)
    b = tensors.get(f"kernel/{r['node']}/bias")
    b = b.to(device) if b is not None else None
    kw = {"node": r["plan_node"], "tokens": r["tokens"]}
    if r["family"] == "triton-swiglu":
        from .codegen.triton_swiglu import build_block_sparse_swiglu

        wu = tensors[f"kernel/{r['node']}/up_weight"].to(device)
        mu = tensors[f"kernel/{r['node']}/up_mask"].to(device)
        bu = tensors.get(f"kernel/{r['node']}/up_bias")
        bu = bu.to(device) if bu is not None else None
        return build_block_sparse_swiglu(w, wm, b, wu, mu, bu, **kw)
    build = builder(r["family"], _pattern(r), device) if r["family"] in KERNEL_FAMILIES else None
    if build is None:
        raise PlanFileError(f"no {r['family']!r} kernel can be built for {r['node']} on {device}.")
    return build(w, wm, b, r["activation"], **kw)


# ------------------------------------------------------------------ save and load


def save(compiled: CompiledModel, path: str | Path) -> None:
    """Write ``compiled``'s plan to ``path`` (see the module docstring)."""
    from safetensors.torch import save_file

    source = compiled.__dict__.get("_source")
    if source is not None and compiled.__dict__.get("_propagated") is None:
        doc, tensors = source["doc"], source["tensors"]  # a loaded plan, written back as read
    else:
        doc, tensors = _document(compiled)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={KEY: json.dumps(doc)})


def _document(compiled: CompiledModel) -> tuple[dict, dict[str, torch.Tensor]]:
    from .propagate import tensor_names

    p, plan = compiled.planned()
    model_sig = compiled.__dict__.get("_signature") or signature(compiled.__dict__["_model"])
    args, kwargs = compiled.__dict__["_example"]
    tensors: dict[str, torch.Tensor] = {}
    recipes, regenerated = _kernel_recipes(p, plan, compiled.graph_module, tensors)
    graph, buffers = graph_to_json(compiled.graph_module, regenerated)
    tensors.update({f"buffer/{k}": v for k, v in buffers.items()})
    masks = _put_masks(p.result.masks, tensors)
    report = compiled.report
    names = {name: n.name for n, (name, _) in tensor_names(p.traced).items()}
    for n, c in plan.choices.items():
        if c.in_keep is not None:
            tensors[f"in_keep/{n.name}"] = c.in_keep
    given = {}
    for name, tesa in p.given.items():
        tensors[f"given/{name}"] = tesa.mask
        given[name] = str(tesa.pattern) if tesa.pattern is not None else None
    doc = {
        "format": FORMAT,
        "versions": _versions(),
        "signature": model_sig,
        "device": str(plan.device),
        "mode": compiled.runtime.mode,
        "backends": list(plan.backends),
        "timer": plan.timer,
        "dynamic": p.traced.dynamic,
        "input_sizes": [[k, list(v)] for k, v in compiled.input_signature.sizes.items()],
        "inputs": _put_inputs(args, kwargs, tensors),
        "graph": graph,
        "kernels": recipes,
        "masks": masks,
        "given": given,
        "choices": {
            n.name: {
                "impl": c.impl,
                "latency_ms": c.latency_ms,
                "dense_latency_ms": c.dense_latency_ms,
                "candidates": c.candidates,
                "reason": c.reason,
                "fused": [f.name for f in c.fused],
                "reads_compact": c.reads_compact,
                "splits": list(c.splits),
            }
            for n, c in plan.choices.items()
        },
        "report": {
            **{k: v for k, v in report.to_dict().items() if k != "summary"},
            "sweeps": report.sweeps,
            "aliases": report.aliases,
            "masks": {k: names[k] for k in report.masks if k in names},
        },
    }
    return doc, tensors


def _versions() -> dict[str, str]:
    from . import __version__

    out = {"sparta": __version__, "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    return out


def _put_inputs(args: tuple, kwargs: Mapping[str, Any], tensors: dict) -> dict:
    def one(v: Any, key: str) -> Any:
        if isinstance(v, torch.Tensor):
            tensors[key] = v.detach()
            return {"tensor": key}
        return encode(v, "example input")

    return {
        "args": [one(v, f"input/{i}") for i, v in enumerate(args)],
        "kwargs": {k: one(v, f"kwarg/{k}") for k, v in kwargs.items()},
    }


def _get_inputs(doc: Mapping, tensors: Mapping, device) -> tuple[tuple, dict]:
    def one(v: Any) -> Any:
        if isinstance(v, dict) and "tensor" in v:
            return tensors[v["tensor"]].to(device)
        return decode(v, {})

    spec = doc["inputs"]
    return tuple(one(v) for v in spec["args"]), {k: one(v) for k, v in spec["kwargs"].items()}


def read(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON document and the tensors of a saved plan; PlanFileError when unreadable."""
    from safetensors.torch import load as load_tensors

    try:
        # Read into memory (not memory-mapped): the module must not depend on the file later.
        data = Path(path).read_bytes()
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        doc = json.loads(meta[KEY])
        tensors = load_tensors(data)
    except FileNotFoundError:
        raise PlanFileError(f"no saved plan at {path}.") from None
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file: say which)
        raise PlanFileError(
            f"{path} is not a readable sparta plan ({type(e).__name__}: {e}); save it again "
            f"with compiled.save(path)."
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else None
        raise PlanFileError(
            f"{path} holds a sparta plan of format {got}; this sparta reads format {FORMAT}: "
            f"compile the model again."
        )
    return doc, tensors


def load(path: str | Path, model: torch.nn.Module) -> CompiledModel:
    """The compiled module saved at ``path``, for ``model`` (the model it was compiled from).

    No tracing, propagation or measuring: the graph is read, the kernels generated again from
    their saved masked weights (found in the kernel cache by key when present). Raises
    ``SpartaError`` (``PlanFileError``) when the file is unreadable, of another format, or
    ``model`` differs from the plan's model (names, shapes, dtypes, weight digest: the message
    names the first difference), or the plan's device is absent here.
    """
    if not isinstance(model, torch.nn.Module):
        raise PlanFileError(f"sparta.load needs the model (a torch.nn.Module), got {model!r}.")
    return load_checked(path, model, signature(model))


def load_checked(path: str | Path, model: torch.nn.Module, sig: Mapping[str, Any]):
    """``load`` with the model's ``signature`` already computed."""
    from .compile import CompiledModel, InputSignature
    from .runtime import resolve

    doc, tensors = read(path)
    check_signature(doc["signature"], sig)
    device = torch.device(doc["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PlanFileError(f"the plan at {path} was made for {device}, which is absent here.")
    root = torch.nn.Module()
    for k, v in tensors.items():
        if k.startswith("buffer/"):
            root.register_buffer(k.removeprefix("buffer/"), v.to(device))
    modules: dict[str, torch.nn.Module] = {}
    parts: dict[str, list] = {}
    static = {}
    for r in doc["kernels"]:
        try:
            mod = _build_kernel(r, tensors, device)
        except KeyError as e:
            msg = f"the saved plan lacks the tensor {e} of kernel {r['node']}."
            raise PlanFileError(msg) from None
        if r["module"] is not None:
            root.add_module(r["module"], mod)
        else:
            call = mod.op_call()
            for (_, t), name in zip(call.tables, r["tables"]):
                if (t is None) != (name is None):
                    raise PlanFileError(f"the kernel of {r['node']} does not fit the saved graph.")
                if name is not None:
                    root.register_buffer(name, t)
            static[r["node"]] = (call.op, dict(call.static))
        i, count = r["part"]
        if count == 1:
            modules[r["plan_node"]] = mod
            continue
        parts.setdefault(r["plan_node"], []).append((r, mod))
        if i == count - 1:  # the last part of a decomposition
            done = parts.pop(r["plan_node"])
            split = Split(
                tuple(q["family"] for q, _ in done),
                tuple(tensors[f"kernel/{q['node']}/mask"] for q, _ in done),
                tuple(_pattern(q) for q, _ in done),
            )
            modules[r["plan_node"]] = Decomposed(split, [m for _, m in done])
    gm = graph_from_json(doc["graph"], root)
    for n in gm.graph.nodes:  # the kernels' keys on this machine
        if n.name in static:
            n.target, n.kwargs = static[n.name]
    gm.recompile()
    report = _report(doc, tensors)
    report.origin = f"plan loaded from {path}"
    runtime = resolve(doc["mode"], device)
    source = {"doc": doc, "tensors": tensors, "model": model, "modules": modules, "report": report}
    example = _get_inputs(doc, tensors, device)
    sizes = {k: tuple(v) for k, v in doc.get("input_sizes", [])}
    inputs = InputSignature.of(example[0], example[1], sizes)
    out = CompiledModel(gm, report, None, runtime, None, source=source, input_signature=inputs)
    out.__dict__["_signature"] = doc["signature"]
    out.__dict__["_example"] = example
    return out


def _report(doc: Mapping, tensors: Mapping[str, torch.Tensor]):
    from .report import NodeEntry, Report, TensorEntry

    r = doc["report"]
    masks = {
        name: _get_mask(node, doc["masks"][node], tensors) for name, node in r["masks"].items()
    }
    return Report(
        tensors=[TensorEntry(**t) for t in r["tensors"]],
        nodes=[NodeEntry(**n) for n in r["nodes"]],
        masks=masks,
        propagation_s=r["propagation_s"],
        sweeps=r["sweeps"],
        inferred_ops=r["inferred_ops"],
        conservative_ops=r["conservative_ops"],
        aliases=r["aliases"],
        latency_dense_ms=r["latency_dense_ms"],
        latency_compiled_ms=r["latency_compiled_ms"],
        runtime=r["runtime"],
        rewrites=r["rewrites"],
        whole=r["whole"],
    )


def replan(source: Mapping[str, Any]) -> tuple[Propagated, Plan]:
    """The propagation and plan of a loaded plan: the model traced again, the saved masks in
    place of propagation, the saved choices and the rebuilt kernels."""
    from .choice import Choice, Plan
    from .engine import Propagation
    from .propagate import Propagated, resolve_attrs
    from .shrink import analyse
    from .tesa import TeSA
    from .trace import trace

    doc, tensors, model = source["doc"], source["tensors"], source["model"]
    device = torch.device(doc["device"])
    args, kwargs = _get_inputs(doc, tensors, device)
    if any(t.device != device for t in model.parameters()):
        model = copy.deepcopy(model).to(device)  # as compile traced it; the user's stays put
    traced = trace(model, args, kwargs, dynamic=doc["dynamic"])
    by_name = {n.name: n for n in traced.gm.graph.nodes}
    missing = sorted(set(doc["masks"]) - set(by_name))
    if missing:
        raise PlanFileError(
            f"the model traces to another graph than the saved plan's (no node {missing[:3]}); "
            f"compile it again."
        )
    masks = {by_name[k]: _get_mask(k, s, tensors) for k, s in doc["masks"].items()}
    attrs = {k: TeSA(tensors[f"given/{k}"], pattern) for k, pattern in doc["given"].items()}
    given, given_nodes = resolve_attrs(traced, attrs)
    result = Propagation(masks=masks, rules={}, sweeps=doc["report"]["sweeps"])
    report = source.get("report")
    p = Propagated(traced, given, given_nodes, result, report)
    choices = {}
    for name, c in doc["choices"].items():
        choices[by_name[name]] = Choice(
            c["impl"],
            c["latency_ms"],
            c["dense_latency_ms"],
            source["modules"].get(name),
            tuple(by_name[f] for f in c["fused"]),
            c["candidates"],
            c["reason"],
            c["reads_compact"],
            tensors.get(f"in_keep/{name}"),
            tuple(c.get("splits", ())),
        )
    shrunk = {n for n, c in choices.items() if c.shrunk}
    layout = analyse(traced, masks, shrunk) if shrunk else {}
    return p, Plan(choices, layout, device, tuple(doc["backends"]), doc["timer"])
