"""Emit the compiled graph: the exported graph rewritten by the plan, nothing else added.

One pass over the traced graph builds a new ``fx.Graph``:

- parameters become buffers with their masks folded in, once, at compile time;
- a node the plan gives a generated kernel becomes one call of the kernel's ``torch.library``
  op (``codegen/op_call.py``: activations, packed tables as buffers, static config), absorbing
  the activation the kernel fuses;
- a shrunk linear or convolution becomes a smaller one on compact values (``sparta/shrink.py``);
  a compact value is expanded with zeros only where a consumer needs it full-size;
- every other node is copied, with two rewrites: an op running on compact values gets the
  rewrite of its compact-layout entry (``sparta/shrink_ops.py``: sizes it names, per-channel
  parameters sliced, group counts), and a mask argument that value-range analysis proves
  has no effect on any run (``sparta/value_range.py``) is dropped (``DROPPABLE``), so e.g.
  ``scaled_dot_product_attention`` keeps its flash/cuDNN kernels when a model passes an
  all-True mask. The dead code that built such a mask goes with it.

With no attributes and a dense plan the result has no node the exported graph did not have.
"""

from __future__ import annotations

import copy
import operator
import warnings
from typing import Any

import torch
import torch.fx as fx

from .calls import bound_arguments
from .choice import Plan
from .decompose import Decomposed
from .errors import AttrError, PlanError
from .plan import MATMULS
from .propagate import Propagated
from .shrink import (
    CONVS,
    LINEAR,
    SDPA,
    conv_args,
    conv_fill_bias,
    conv_rows,
    conv_shrink,
    expand,
    linear_out_keep,
    unit_fill,
)
from .shrink_ops import lookup_through
from .tesa import reduced
from .value_range import all_true, all_zero, value_ranges

aten = torch.ops.aten


def apply_input_mask(x: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """Multiply a forward() argument by its attribute mask (reduced to the dims it varies on)."""
    try:
        return x * mask
    except RuntimeError:
        raise AttrError(
            f"input {name!r} has shape {tuple(x.shape)}, which its attribute mask of shape "
            f"{tuple(mask.shape)} does not broadcast to; compile again with an example of this "
            f"shape, or give a mask that is constant along the batch dims."
        ) from None


def pruned_module(gm: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    """A trainable copy of a compiled graph whose nodes all run dense or shrunk: the constants
    holding model parameters become ``nn.Parameter`` s (so ``sum(p.numel() for p in
    m.parameters())`` counts what is left after shrinking); buffers (BatchNorm statistics),
    index tables and constant fills stay buffers. It runs without sparta
    (ATen ops and ``sparta.shrink.expand`` only), so it can be fine-tuned or handed on.

    Raises:
        PlanError: the plan uses generated kernels; compile with ``backends=["dense", "shrink"]``
        to get the shrunk dense model.
    """
    kernels = sorted({c.impl for c in plan.choices.values()} - {"dense", "shrink"})
    if kernels:
        raise PlanError(
            f"export_pruned needs a graph of dense and shrunk ops, this plan uses {kernels}: "
            f"compile again with backends=['dense', 'shrink'] to export the shrunk model."
        )
    out = copy.deepcopy(gm)
    params = set(gm.meta.get("sparta_parameters", ()))
    for name, buf in list(out.named_buffers(recurse=False)):
        if name in params and buf.is_floating_point():
            delattr(out, name)
            out.register_parameter(name, torch.nn.Parameter(buf.clone()))
    return out


# Mask arguments an op ignores when they are proven all-True (bool) or all-zero (additive).
DROPPABLE: dict[Any, str] = {SDPA: "attn_mask"}


class Emitter:
    """Builds the compiled ``fx.GraphModule`` from a propagation result and a plan."""

    def __init__(self, p: Propagated, plan: Plan, root: torch.nn.Module) -> None:
        self.p, self.plan, self.root = p, plan, root
        self.layout = plan.layout
        self.g = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.expanded: dict[fx.Node, fx.Node] = {}
        self.attr_count = 0
        self.skip: dict[fx.Node, fx.Node] = {}  # node absorbed into a kernel -> the kernel node
        self.notes: list[str] = []  # rewrites beyond the plan, for the report
        self.slices: dict[tuple, fx.Node] = {}
        self.param_attrs: set[str] = set()  # constants that hold model parameters
        self.params = set(p.traced.params.values())
        ex = p.traced.example
        consts = {n: v for n, v in ex.items() if n.op == "get_attr" and torch.is_tensor(v)}
        self.ranges = value_ranges(p.traced.gm, consts, self._dtype)

    def _dtype(self, n: fx.Node) -> torch.dtype | None:
        v = self.p.traced.example.get(n)
        return v.dtype if isinstance(v, torch.Tensor) else None

    def attr(self, value: torch.Tensor, hint: str, param: bool = False) -> fx.Node:
        """A constant of the compiled graph; ``param``: it holds (part of) a model parameter."""
        name = f"{hint.replace('.', '_')}_{self.attr_count}"
        self.attr_count += 1
        if param:
            self.param_attrs.add(name)
        self.root.register_buffer(name, value.detach().to(self.plan.device))
        return self.g.get_attr(name)

    def value(self, n: Any) -> Any:
        return self.p.traced.example.get(n)

    def masked(self, n: fx.Node) -> torch.Tensor:
        """A constant's example value with its propagated mask folded in."""
        value, mask = self.p.traced.example[n], self.p.result.masks.get(n)
        if isinstance(mask, torch.Tensor) and value.is_floating_point():
            value = value * mask.to(value.device)
        return value

    def sliced(self, a: fx.Node, dim: int, keep: torch.Tensor) -> fx.Node:
        """``a`` at the indices ``keep`` along ``dim``: a smaller buffer for a constant, an
        ``index_select`` for a computed value."""
        key = (a, dim, tuple(keep.tolist()))
        if key not in self.slices:
            if a.op == "get_attr":
                v = self.masked(a).index_select(dim, keep.to(self.value(a).device))
                self.slices[key] = self.attr(v, str(a.target), a in self.params)
            else:
                idx = self.attr(keep, "keep")
                self.slices[key] = self.g.call_function(
                    torch.ops.aten.index_select.default, (self.full(a), dim, idx)
                )
        return self.slices[key]

    def full(self, a: fx.Node) -> fx.Node:
        """The value of ``a`` at full size (expanding a compact value with zeros)."""
        c = self.layout.get(a)
        if c is None or len(c.keep) == c.full:
            return self.env[a]
        if a not in self.expanded:
            args = (self.env[a], c.dim, self.attr(c.keep, "keep"), c.full)
            if c.fill is not None:
                args += (self.attr(c.fill, "fill"),)
            self.expanded[a] = self.g.call_function(expand, args)
        return self.expanded[a]

    def arg(self, a: Any, compact_ok: bool) -> Any:
        if isinstance(a, fx.Node):
            return self.env[a] if compact_ok and a in self.layout else self.full(a)
        if isinstance(a, (list, tuple)):
            return type(a)(self.arg(x, compact_ok) for x in a)
        return a

    def emit(self) -> fx.GraphModule:
        traced = self.p.traced
        for n in traced.gm.graph.nodes:
            choice = self.plan.choices.get(n)
            if n in self.skip:
                self.env[n] = self.env[self.skip[n]]
            elif n.op == "placeholder":
                self.env[n] = self._placeholder(n)
            elif n.op == "get_attr":
                self.env[n] = self._get_attr(n)
            elif n.op == "output":
                self.g.output(self.arg(n.args[0], False))
            elif n.op == "call_module":
                continue  # export's shape guards: the compiled graph re-checks nothing it needs
            elif choice is not None and choice.impl == "fused":
                continue  # computed inside another node's kernel (which absorbs its user)
            elif choice is not None and choice.impl not in ("dense", "shrink"):  # kernels
                self.env[n] = self._kernel(n)
            elif n.target is LINEAR and choice is not None and choice.impl == "shrink":
                self.env[n] = self._shrunk_linear(n)
            elif n.target in CONVS and choice is not None and choice.impl == "shrink":
                self.env[n] = self._shrunk_conv(n)
            else:
                self.env[n] = self._copy(n)
        # Same calling convention and output structure as the exported module.
        with warnings.catch_warnings():  # torch's own pytree deprecation, not the user's
            warnings.simplefilter("ignore", FutureWarning)
            self.g._codegen = copy.deepcopy(traced.gm.graph._codegen)
        gm = fx.GraphModule(self.root, self.g)
        gm.graph.eliminate_dead_code()  # drops replaced weights and masks proven useless
        gm = fx.GraphModule(self.root, gm.graph)  # keeps only the attributes still used
        gm.meta["sparta_parameters"] = sorted(self.param_attrs)
        return gm

    def _placeholder(self, n: fx.Node) -> fx.Node:
        ph = self.g.placeholder(n.name)
        ph.meta = dict(n.meta)
        given = self.p.given_nodes.get(n)
        if given is None:
            return ph
        mask = self.attr(reduced(given), f"mask_{n.name}")
        return self.g.call_function(apply_input_mask, (ph, mask, n.name))

    def _get_attr(self, n: fx.Node) -> fx.Node:
        value = self.p.traced.example[n]
        if isinstance(value, torch.nn.Module):  # the body of a higher-order op (autocast region)
            name = f"{str(n.target).replace('.', '_')}_{self.attr_count}"
            self.attr_count += 1
            self.root.add_module(name, value)
            return self.g.get_attr(name)
        mask = self.p.result.masks.get(n)
        if isinstance(mask, torch.Tensor) and value.is_floating_point() and not bool(mask.all()):
            value = value * mask.to(value.device)
        return self.attr(value, str(n.target), n in self.params)

    def _kernel(self, n: fx.Node) -> fx.Node:
        choice = self.plan.choices[n]
        if choice.splits:  # sibling linears: each reads its slice of the stacked output
            return self._stacked(n, choice)
        for absorbed in choice.fused:
            self.skip[absorbed] = n
        operands = n.args[:2] if n.target in MATMULS else n.args[:1]
        acts = tuple(self.full(a) for a in operands)
        if choice.reads_compact:
            acts = (self.env[n.args[0]],)
        parts = choice.module.parts if isinstance(choice.module, Decomposed) else [choice.module]
        node = None
        for i, module in enumerate(parts):  # a decomposition: one call per part, summed
            one = self._kernel_call(n, module, acts, f"{n.name}_{i}" if len(parts) > 1 else n.name)
            node = one if node is None else self.g.call_function(aten.add.Tensor, (node, one))
        if choice.shrunk and n not in self.layout:  # consumers need it full-size
            masks = self.p.result.masks
            keep = linear_out_keep(masks, n)
            node = self._expand(node, masks[n].dim() - 1, keep, masks[n].shape[-1], n)
        return node

    def _stacked(self, n: fx.Node, choice) -> fx.Node:
        """One kernel for sibling linears: its output split along the last dim, each slice made
        contiguous (a consumer may view it as if it were the linear's own output)."""
        out = self._kernel_call(n, choice.module, (self.full(n.args[0]),), n.name)
        parts = self.g.call_function(aten.split_with_sizes.default, (out, list(choice.splits), -1))
        for i, m in enumerate((n, *choice.fused)):
            part = self.g.call_function(operator.getitem, (parts, i))
            self.env[m] = self.g.call_function(
                aten.clone.default, (part,), {"memory_format": torch.contiguous_format}
            )
        return self.env[n]

    def _kernel_call(self, n: fx.Node, module, acts: tuple, name: str) -> fx.Node:
        if not hasattr(module, "op_call"):  # a module that is not a registered op (2:4 weights)
            self.root.add_module(f"kernel_{name}", module)
            return self.g.call_module(f"kernel_{name}", acts)
        call = module.op_call()
        tables = tuple(
            None if t is None else self.attr(t, f"{name}.{table}") for table, t in call.tables
        )
        return self.g.call_function(call.op, acts + tables, dict(call.static))

    def _shrunk_linear(self, n: fx.Node) -> fx.Node:
        """A smaller linear: kept output features only, compact input features if compact."""
        ex, masks = self.p.traced.example, self.p.result.masks
        w = ex[n.args[1]] * masks[n.args[1]].to(ex[n.args[1]].device)
        out_dim = masks[n].dim() - 1
        keep_out = linear_out_keep(masks, n).to(w.device)
        src = self.layout.get(n.args[0])
        x_compact = src is not None and src.dim == ex[n.args[0]].dim() - 1
        w = w[keep_out]
        b_node = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        b = self.masked(b_node)[keep_out] if isinstance(b_node, fx.Node) else None
        if x_compact and src.fill is not None:  # constant input features fold into the bias
            f = src.fill.to(w.device, w.dtype).clone()
            f[src.keep.to(w.device)] = 0
            b = w @ f if b is None else b + w @ f
        if x_compact:
            w = w[:, src.keep.to(w.device)]
        args = [self.env[n.args[0]] if x_compact else self.full(n.args[0]), self.attr(w, "w", True)]
        if b is not None:
            args.append(self.attr(b, "b", True))
        node = self.g.call_function(LINEAR, tuple(args))
        if n not in self.layout:  # consumers need it full-size: expand right here
            node = self._expand(node, out_dim, keep_out, masks[n].shape[-1], n)
        return node

    def _expand(self, node: fx.Node, dim: int, keep: torch.Tensor, full: int, n: fx.Node):
        """A shrunk linear/conv's output at full size, its constant units filled in."""
        fill = unit_fill(self.p.traced.example, self.p.result.masks, n, keep)
        args = (node, dim, self.attr(keep, "keep"), full)
        if fill is not None:
            args += (self.attr(fill, "fill"),)
        return self.g.call_function(expand, args)

    def _shrunk_conv(self, n: fx.Node) -> fx.Node:
        """A smaller convolution: kept output channels (whole groups), compact input channels
        if the input is compact, the group count rewritten."""
        ex, masks = self.p.traced.example, self.p.result.masks
        x_node = n.args[0]
        in_c = self.layout.get(x_node)
        s = conv_shrink(n, ex[x_node], masks[n], in_c, conv_rows(masks, n))
        b = conv_args(n)
        if s.reads_compact:
            x = self.env[x_node]
            if s.regroup is not None:
                regroup = self.attr(s.regroup, "regroup")
                x = self.g.call_function(expand, (x, 1, regroup, len(s.in_keep)))
        elif s.in_keep is not None:
            x = self.sliced(x_node, 1, s.in_keep)
        else:
            x = self.full(x_node)
        b["input"] = x
        w = self.masked(n.args[1])
        bias = self.masked(b["bias"]) if isinstance(b.get("bias"), fx.Node) else None
        bias = None if bias is None else bias[s.out_keep.to(bias.device)]
        if s.reads_compact and in_c.fill is not None:  # constant channels fold into the bias
            add = conv_fill_bias(w[s.out_keep.to(w.device)], in_c.fill, in_c.keep)
            bias = add if bias is None else bias + add
        b["weight"] = self.attr(s.weight(w), "w", True)
        b["bias"] = None if bias is None else self.attr(bias, "b", True)
        b["groups"] = s.groups
        node = self.g.call_function(n.target, tuple(b.values()))
        c = self.layout.get(n)
        if c is None or not torch.equal(c.keep, s.out_keep):  # consumers need it full-size
            node = self._expand(node, 1, s.out_keep, masks[n].shape[1], n)
        return node

    def _copy(self, n: fx.Node) -> fx.Node:
        compact_ok = n in self.layout
        args = self.arg(n.args, compact_ok)
        kwargs = {k: self.arg(v, compact_ok) for k, v in n.kwargs.items()}
        entry = lookup_through(n.target) if compact_ok else None
        c = self.layout.get(n)
        target = n.target
        if entry is not None and entry.emit is not None and len(c.keep) < c.full:
            args, kwargs = entry.emit(self, n, args, kwargs, c)
            target = entry.op or target
        if n.target in DROPPABLE:
            args, kwargs = self._drop_proven(n, args, kwargs, DROPPABLE[n.target])
        new = self.g.call_function(target, tuple(args), kwargs)
        new.meta = {k: v for k, v in n.meta.items() if k in ("stack_trace", "nn_module_stack")}
        return new

    def _drop_proven(self, n: fx.Node, args: tuple, kwargs: dict, name: str):
        """Drop argument ``name`` when it is proven all-True (bool) / all-zero (additive)."""
        a = bound_arguments(n.target, n.args, n.kwargs).get(name)
        dt = self._dtype(a) if isinstance(a, fx.Node) else None
        if not (all_true(a, self.ranges, dt) or all_zero(a, self.ranges, dt)):
            return args, kwargs
        self.notes.append(
            f"{n.name}: {name} {a.name} proven to have no effect on any input, dropped"
        )
        pos = [arg.name for arg in n.target._schema.arguments].index(name)
        if name in kwargs:
            kwargs = {k: v for k, v in kwargs.items() if k != name}
        if pos < len(args):
            args = (*args[:pos], None, *args[pos + 1 :])
        return args, kwargs
