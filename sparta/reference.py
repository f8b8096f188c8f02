"""The masked model, built independently of the compiler: the reference every check compares to.

The contract of ``sparta.compile`` is "the model with every parameter and input multiplied by
its attribute mask". ``masked_model`` builds exactly that from the user's module alone, through
``named_parameters(remove_duplicate=False)`` (so every alias of a tied tensor resolves to the one
shared tensor), ``torch.nn.utils.parametrize`` (a mask on a parametrized weight multiplies
the *effective* weight) and, for a weight that a forward pre-hook computes
(``torch.nn.utils.prune``, the older ``weight_norm`` / ``spectral_norm``), one more pre-hook that
multiplies it after them — never through the traced graph or the compiler's name resolution.
So a wrong name resolution in the compiler cannot hide in a comparison against it.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import AttrError
from .tesa import TeSA


class _MaskParametrization(nn.Module):
    """``weight -> weight * mask``, appended after the module's own parametrizations."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


class _MaskHook:
    """A forward pre-hook multiplying a hook-computed weight (``module.weight``) by a mask."""

    def __init__(self, name: str, mask: torch.Tensor) -> None:
        self.name, self.mask = name, mask

    def __call__(self, module: nn.Module, args: Any) -> None:
        w = getattr(module, self.name)
        setattr(module, self.name, w * self.mask.to(w.device))


def copy_module(model: nn.Module) -> nn.Module:
    """A deep copy. Weights that forward pre-hooks computed (torch.nn.utils.prune, the older
    weight_norm) are autograd outputs, which deepcopy refuses: they are copied detached (the
    hooks compute them again on every call)."""
    memo: dict[int, object] = {}
    for m in model.modules():
        for v in vars(m).values():
            if isinstance(v, torch.Tensor) and not v.is_leaf:
                memo[id(v)] = v.detach()
    return copy.deepcopy(model, memo)


def _mask_of(value: TeSA | torch.Tensor) -> torch.Tensor:
    return value.mask if isinstance(value, TeSA) else value


def broadcast_input_mask(mask: torch.Tensor) -> torch.Tensor:
    """Collapse dims along which an input mask is constant, so that it applies to inputs of
    other batch sizes and sequence lengths than the example it was made for."""
    for d in range(mask.dim()):
        first = mask.narrow(d, 0, 1)
        if torch.equal(first.expand_as(mask), mask):
            mask = first
    return mask


class MaskedModel(nn.Module):
    """A copy of the user's module with masked parameters; forward() masks the named inputs."""

    def __init__(self, model: nn.Module, input_masks: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.input_masks = dict(input_masks)
        self._signature = inspect.signature(model.forward)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.input_masks:
            bound = self._signature.bind(*args, **kwargs)
            for name, mask in self.input_masks.items():
                if name in bound.arguments:
                    bound.arguments[name] = bound.arguments[name] * mask.to(
                        bound.arguments[name].device
                    )
            args, kwargs = bound.args, bound.kwargs
        return self.model(*args, **kwargs)


def masked_model(model: nn.Module, attrs: Mapping[str, TeSA | torch.Tensor]) -> MaskedModel:
    """A deep copy of ``model`` computing the model with params and inputs times their masks.

    Args:
        model: the user's module (not modified).
        attrs: parameter names (any alias ``named_parameters(remove_duplicate=False)`` lists,
            the name of a parametrized weight such as ``"fc1.weight"`` under weight_norm, or of
            a weight a forward pre-hook computes such as a torch.nn.utils.prune'd
            ``"fc1.weight"``) and forward() argument names, mapped to bool masks (True = kept)
            or TeSAs.

    Raises:
        AttrError: a name that is neither a parameter, a computed weight nor a forward()
            argument.
    """
    ref = copy_module(model)
    params = dict(ref.named_parameters(remove_duplicate=False))
    arg_names = set(inspect.signature(model.forward).parameters)
    inputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, value in attrs.items():
            mask = _mask_of(value)
            owner = _owner(ref, name)
            leaf = name.rpartition(".")[2]
            if owner is not None and parametrize.is_parametrized(owner, leaf):
                parametrize.register_parametrization(
                    owner, leaf, _MaskParametrization(mask.to(getattr(owner, leaf).device))
                )
            elif name in params:
                params[name].mul_(mask.to(params[name].device))
            elif owner is not None and isinstance(vars(owner).get(leaf), torch.Tensor):
                owner.register_forward_pre_hook(_MaskHook(leaf, mask))  # runs after the others
            elif name in arg_names:
                inputs[name] = broadcast_input_mask(mask)
            else:
                raise AttrError.unknown_name(name, [*params, *arg_names])
    return MaskedModel(ref, inputs).train(model.training)


def _owner(root: nn.Module, name: str) -> nn.Module | None:
    owner_name = name.rpartition(".")[0]
    try:
        return root.get_submodule(owner_name) if owner_name else root
    except AttributeError:
        return None
