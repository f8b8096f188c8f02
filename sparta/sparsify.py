"""From a dense or already-pruned model to ``sparta.compile`` attrs.

``sparsify(model, spec)`` runs sparsifiers over the parameters a spec names;
``masks_from(model)`` reads the masks that ``torch.nn.utils.prune`` or
``torch.ao.pruning`` (``torch.nn.utils.parametrize``) attached to a model. Both return
``{qualified parameter name: bool mask (True = kept, CPU)}`` and never modify the model.
"""

from __future__ import annotations

import fnmatch
import re
import warnings
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import AttrError
from .sparsifiers import Sparsifier

__all__ = ["masks_from", "plain_parameter_name", "sparsify"]

_GLOB_CHARS = frozenset("*?[")
_PRUNE_SUFFIX = "_orig"
_PARAMETRIZED = re.compile(r"^(?P<owner>(?:.*\.)?)parametrizations\.(?P<name>[^.]+)\.original\d*$")


def plain_parameter_name(name: str) -> str:
    """The name a parameter has in the unpruned model.

    ``torch.nn.utils.prune`` renames ``fc1.weight`` to ``fc1.weight_orig`` (and adds a
    ``fc1.weight_mask`` buffer); ``torch.nn.utils.parametrize`` (used by ``torch.ao.pruning``)
    moves it to ``fc1.parametrizations.weight.original``. Both map back to ``fc1.weight``; any
    other name is returned unchanged. (A parameter genuinely called ``*_orig`` is mapped too:
    only apply this to names of a pruned model.)
    """
    if mt := _PARAMETRIZED.match(name):
        return mt["owner"] + mt["name"]
    if name.endswith(_PRUNE_SUFFIX) and len(name) > len(_PRUNE_SUFFIX):
        return name[: -len(_PRUNE_SUFFIX)]
    return name


def _generalised(names: list[str]) -> list[str]:
    """Names with their numeric parts replaced by ``*``: better suggestions for bad globs."""
    seen = dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", n) for n in names)
    return [n for n in seen if n not in names] + names


def _match(key: str, names: list[str]) -> list[str]:
    if _GLOB_CHARS.isdisjoint(key):
        return [key] if key in names else []
    return [n for n in names if fnmatch.fnmatchcase(n, key)]


def sparsify(model: nn.Module, spec: Mapping[str, Sparsifier]) -> dict[str, torch.Tensor]:
    """Masks for the parameters ``spec`` names, made by its sparsifiers.

    ``spec`` maps a qualified parameter name (as in ``model.named_parameters()``) or an
    ``fnmatch`` glob over those names to a ``sparta.sparsifiers.Sparsifier``. In a glob, ``*``
    matches any run of characters, dots included (``"encoder.*.intermediate.dense.weight"``
    matches every layer). Each entry's sparsifier sees all the parameters it matched at once
    (in model order), so global variants rank across them.

    Returns ``{name: bool mask}`` (True = kept, on the CPU) in model order: a ready ``attrs``
    for ``sparta.compile``. Raises ``AttrError`` when an entry matches nothing (with close
    matches), when a parameter is matched by two entries, or when a value is not a sparsifier.
    Deterministic; the model and its parameters are not modified.
    """
    params = dict(model.named_parameters())
    names = list(params)
    owner: dict[str, str] = {}
    entries: list[tuple[str, Sparsifier, list[str]]] = []
    for key, sparsifier in spec.items():
        if not isinstance(sparsifier, Sparsifier):
            raise AttrError(
                f"sparsify spec entry {key!r} must map to a sparta.sparsifiers.Sparsifier, got "
                f"{type(sparsifier).__name__}. Use e.g. {{{key!r}: sparta.sparsifiers.NM(2, 4)}}."
            )
        matched = _match(key, names)
        if not matched:
            err = AttrError.unknown_name(key, _generalised(names), what="sparsify spec key")
            raise AttrError(
                f"{err} (sparsify takes parameters only; a glob uses fnmatch syntax, where "
                f"'*' also matches dots.)"
            )
        for name in matched:
            if name in owner:
                raise AttrError(
                    f"parameter {name!r} is matched by two sparsify spec entries, {owner[name]!r} "
                    f"and {key!r}; each parameter takes one sparsifier. Narrow one of the globs."
                )
            owner[name] = key
        entries.append((key, sparsifier, matched))
        if matched != [key]:
            _warn_norms(model, key, matched)

    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, sparsifier, matched in entries:
            got = sparsifier.masks({n: params[n].detach() for n in matched})
            for name in matched:
                masks[name] = _checked(got.get(name), params[name], name, key)
    return {n: masks[n] for n in names if n in masks}


def _warn_norms(model: nn.Module, key: str, matched: list[str]) -> None:
    """A glob that also caught normalization layers' parameters (``"encoder.*.weight"`` takes
    every LayerNorm's scale): pruning those is rarely meant, so say so (a warning, not an
    error: an exact name or a narrower glob is how to mean it)."""
    norms = [
        n
        for n in matched
        if "." in n and "Norm" in type(model.get_submodule(n.rsplit(".", 1)[0])).__name__
    ]
    if norms:
        warnings.warn(
            f"sparta: sparsify entry {key!r} also matched {len(norms)} parameter(s) of "
            f"normalization layers (e.g. {norms[0]!r}), which the sparsifier prunes like "
            f"weights; narrow the glob (e.g. to the linears' '*.dense.weight') unless that is "
            f"meant.",
            stacklevel=3,
        )


def _checked(mask: object, param: torch.Tensor, name: str, key: str) -> torch.Tensor:
    ok = isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.shape == param.shape
    if not ok:
        got = (
            f"dtype {mask.dtype}, shape {tuple(mask.shape)}"
            if isinstance(mask, torch.Tensor)
            else type(mask).__name__
        )
        raise AttrError(
            f"the sparsifier of entry {key!r} must return a bool mask of shape "
            f"{tuple(param.shape)} for {name!r}, got {got}. Fix its masks()/mask() method."
        )
    return mask.detach().to("cpu", copy=True)


def _to_shape(mask: torch.Tensor, shape: torch.Size, name: str) -> torch.Tensor:
    """A pruning mask as a bool tensor of the parameter's shape.

    A 1-D mask over dim 0 (``torch.ao.pruning``'s structured pruner keeps one flag per output
    channel) is broadcast over the other dims.
    """
    m = mask.detach().to("cpu") != 0
    if m.shape == shape:
        return m.clone()
    if m.dim() == 1 and len(shape) >= 1 and m.shape[0] == shape[0]:
        return m.view(-1, *([1] * (len(shape) - 1))).expand(shape).contiguous()
    raise AttrError(
        f"the pruning mask of {name!r} has shape {tuple(m.shape)}, which matches neither the "
        f"parameter's shape {tuple(shape)} nor its first dim. Pass the mask to sparta.compile "
        f"yourself, expanded to the parameter's shape."
    )


def masks_from(model: nn.Module) -> dict[str, torch.Tensor]:
    """The masks PyTorch's pruning tools attached to ``model``, by plain parameter name.

    * ``torch.nn.utils.prune``: a module with a ``<name>_orig`` parameter and a
      ``<name>_mask`` buffer gives ``"<module>.<name>"`` (e.g. ``"fc1.weight"``, while
      ``model.named_parameters()`` says ``"fc1.weight_orig"``). Several pruning calls on the
      same tensor already combine into that one buffer.
    * ``torch.nn.utils.parametrize`` (``torch.ao.pruning``'s ``FakeSparsity``): each
      parametrization of ``<module>.parametrizations.<name>`` that holds a ``mask`` tensor
      contributes; several are intersected. A 1-D mask over the first dim is broadcast.

    Returns ``{plain name: bool mask (True = kept, CPU copy)}`` in module order, empty when the
    model carries no pruning masks. Use ``plain_parameter_name`` to map the pruned model's
    parameter names back. The model is not modified.
    """
    out: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        buffers = dict(module.named_buffers(recurse=False))
        for pname, param in module.named_parameters(recurse=False):
            base = pname[: -len(_PRUNE_SUFFIX)]
            if pname.endswith(_PRUNE_SUFFIX) and f"{base}_mask" in buffers:
                out[prefix + base] = _to_shape(buffers[f"{base}_mask"], param.shape, prefix + base)
        if not parametrize.is_parametrized(module):
            continue
        for pname, plist in module.parametrizations.items():
            found = [p.mask for p in plist if isinstance(getattr(p, "mask", None), torch.Tensor)]
            if not found:
                continue
            with torch.no_grad():
                shape = getattr(module, pname).shape
            mask = _to_shape(found[0], shape, prefix + pname)
            for extra in found[1:]:
                mask &= _to_shape(extra, shape, prefix + pname)
            out[prefix + pname] = mask
    return out
