"""Parameter names as the user knows them: tied aliases and reparametrized weights.

A user names a tensor by any name ``model.named_parameters(remove_duplicate=False)`` lists (tied
weights have several), or by the name of a weight that a reparametrization computes:
``torch.nn.utils.parametrize`` (``parametrizations.weight_norm``, ``spectral_norm``,
``orthogonal``, torch.ao.pruning's ``FakeSparsity``, user parametrizations), the hooks of
``torch.nn.utils.prune`` and the older hook-based ``weight_norm`` / ``spectral_norm``. The
contract masks the *effective* weight, so the model is traced from a copy in which every
reparametrization is folded into a plain parameter holding its eval-mode value (``fc1.weight``
itself): the graph then reads one ordinary weight that every rule and backend understands, and
the compiled module, which runs inference only, computes exactly the reparametrized model.

A mask on a tensor that a reparametrization only reads (``fc1.parametrizations.weight.original0``,
weight_norm's ``weight_g``) cannot mean "this tensor times the mask" once folded; it is refused
with the effective weight's name (``underlying``). ``torch.nn.utils.prune``'s ``weight_orig`` is
the exception: the pruned weight is ``weight_orig * weight_mask``, elementwise, so a mask on
``weight_orig`` equals the same mask on ``weight`` and the name is an alias.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from .reference import copy_module

# The hook classes of the older APIs (functions of the same name shadow their modules).
_WeightNorm = importlib.import_module("torch.nn.utils.weight_norm").WeightNorm
_SpectralNorm = importlib.import_module("torch.nn.utils.spectral_norm").SpectralNorm


@dataclass
class ParamNames:
    """Every name a user may give a parameter or buffer, and what it resolves to."""

    primary: dict[str, str] = field(default_factory=dict)  # any accepted name -> primary name
    groups: dict[str, list[str]] = field(default_factory=dict)  # primary -> all names, it first
    underlying: dict[str, str] = field(default_factory=dict)  # read by a reparam. -> effective
    parameters: set[str] = field(default_factory=set)  # primary names that are parameters

    def parameter_names(self) -> set[str]:
        """Every accepted name of every parameter."""
        return {n for n, p in self.primary.items() if p in self.parameters}

    def aliases(self, primary: str) -> list[str]:
        """The other names of the tensor named ``primary`` (tied weights, ``weight_orig``)."""
        return self.groups.get(primary, [primary])[1:]


def _set_plain(module: nn.Module, name: str, value: torch.Tensor, as_parameter: bool) -> None:
    if hasattr(module, name):
        delattr(module, name)
    if as_parameter:
        module.register_parameter(name, nn.Parameter(value, requires_grad=False))
    else:
        module.register_buffer(name, value)


def _fold_module(module: nn.Module, prefix: str, names: ParamNames) -> bool:
    """Fold the reparametrizations of one module in place; True if there were any."""
    folded = False
    for hook_id, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, prune.BasePruningMethod):
            name = hook._tensor_name
            prune.remove(module, name)  # weight = weight_orig * weight_mask, as a parameter
            names.primary[f"{prefix}{name}_orig"] = f"{prefix}{name}"
        elif isinstance(hook, (_WeightNorm, _SpectralNorm)):
            name = hook.name
            reads = ("_g", "_v") if isinstance(hook, _WeightNorm) else ("_orig",)
            for suffix in reads:
                names.underlying[f"{prefix}{name}{suffix}"] = f"{prefix}{name}"
            hook.remove(module)  # eval-mode weight as a parameter (no power iteration)
            del module._forward_pre_hooks[hook_id]
        else:
            continue
        folded = True
    if parametrize.is_parametrized(module):
        values: dict[str, tuple[torch.Tensor, bool]] = {}
        for leaf, plist in module.parametrizations.items():
            inner = f"{prefix}parametrizations.{leaf}."
            for n, _ in plist.named_parameters(remove_duplicate=False):
                names.underlying[inner + n] = prefix + leaf
            for n, _ in plist.named_buffers(remove_duplicate=False):
                names.underlying[inner + n] = prefix + leaf
            own = plist.named_parameters(recurse=False)
            with torch.no_grad():
                value = getattr(module, leaf).detach().clone()
            values[leaf] = value, any(n.startswith("original") for n, _ in own)
        # parametrize gave the module a class of its own (Parametrized<Class>, one per original
        # module and shared by deep copies): restore the original class on this copy, never
        # touch the shared one.
        module.__class__ = type(module).__bases__[0]
        del module._modules["parametrizations"]
        for leaf, (value, as_parameter) in values.items():
            _set_plain(module, leaf, value, as_parameter)
        folded = True
    return folded


def _needs_folding(model: nn.Module) -> bool:
    for m in model.modules():
        if parametrize.is_parametrized(m):
            return True
        hooks = m._forward_pre_hooks.values()
        if any(isinstance(h, (prune.BasePruningMethod, _WeightNorm, _SpectralNorm)) for h in hooks):
            return True
    return False


def fold_reparametrizations(model: nn.Module) -> tuple[nn.Module, ParamNames]:
    """``model`` itself, or an eval-mode copy with every reparametrization folded, and the
    names of its parameters and buffers (``model`` is never modified)."""
    names = ParamNames()
    source = model
    if _needs_folding(model):
        source = copy_module(model).eval()
        for prefix, module in list(source.named_modules()):
            _fold_module(module, f"{prefix}." if prefix else "", names)
    by_tensor: dict[int, list[str]] = {}
    for n, p in source.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(n)
        names.parameters.add(n)
    for n, b in source.named_buffers(remove_duplicate=False):
        by_tensor.setdefault(id(b), []).append(n)
    folded_aliases = dict(names.primary)
    for group in by_tensor.values():
        for n in group:
            names.primary[n] = group[0]
        names.groups[group[0]] = list(group)
    for alias, effective in folded_aliases.items():  # prune's weight_orig
        primary = names.primary.get(effective, effective)
        names.primary[alias] = primary
        names.groups.setdefault(primary, [primary]).append(alias)
    names.parameters = {names.primary[n] for n in names.parameters}
    return source, names
