"""Small models shared by rule coverage, graph-level and end-to-end tests.

Each builder returns ``(model, example_inputs)`` with the model in eval mode and random
weights (seeded), small enough to export in well under two seconds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Built = tuple[nn.Module, tuple]


class MLP(nn.Module):
    def __init__(self, d_in: int = 32, hidden: int = 64, d_out: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act1 = nn.ReLU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.GELU()
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act2(self.fc2(self.drop(self.act1(self.fc1(x))))))


class SmallCNN(nn.Module):
    def __init__(self, c: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.relu(self.bn1(self.conv1(x))))
        h = self.relu(h + self.bn2(self.conv2(h)))  # residual add
        return self.fc(self.flatten(self.avg(h)))


def _seed() -> None:
    torch.manual_seed(0)


def random_affine(model: nn.Module) -> nn.Module:
    """transformers initialises every bias to zero and every LayerNorm to the identity: a bug
    that drops a bias or a norm's shift would go unseen. Give them random values (seeded)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # biases, and the scales of norms (around 1)
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
    return model


def mlp() -> Built:
    _seed()
    return MLP().eval(), (torch.randn(4, 32),)


def cnn() -> Built:
    _seed()
    return SmallCNN().eval(), (torch.randn(2, 3, 16, 16),)


_TF = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def bert(attention_mask: bool = False) -> Built:
    from transformers import BertConfig, BertModel

    _seed()
    cfg = BertConfig(vocab_size=100, max_position_embeddings=32, **_TF)
    model = random_affine(BertModel(cfg).eval())
    ids = torch.randint(0, 100, (2, 8))
    if attention_mask:
        am = torch.ones(2, 8, dtype=torch.long)
        am[1, 6:] = 0
        return model, (ids, am)
    return model, (ids,)


def gpt2(attention_mask: bool = False) -> Built:
    from transformers import GPT2Config, GPT2Model

    _seed()
    cfg = GPT2Config(
        vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4, n_inner=128, use_cache=False
    )
    model = random_affine(GPT2Model(cfg).eval())
    ids = torch.randint(0, 100, (2, 8))
    if attention_mask:
        am = torch.ones(2, 8, dtype=torch.long)
        am[1, 6:] = 0
        return model, (ids, None, am)  # forward(input_ids, past_key_values, attention_mask)
    return model, (ids,)


def vit() -> Built:
    from transformers import ViTConfig, ViTModel

    _seed()
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, **_TF)
    model = random_affine(ViTModel(cfg, add_pooling_layer=True).eval())
    return model, (torch.randn(2, 3, 16, 16),)


MODELS: dict[str, Callable[[], Built]] = {
    "mlp": mlp,
    "cnn": cnn,
    "bert": bert,
    "bert_mask": lambda: bert(attention_mask=True),
    "gpt2": gpt2,
    "gpt2_mask": lambda: gpt2(attention_mask=True),
    "vit": vit,
}


# --------------------------------------------------------------------------- masks for tests


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): weight (in, out), y = x @ W + b."""
    return type(module).__name__ == "Conv1D"


def unit_masks(model: nn.Module, keep: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Prune whole output units of every linear layer *with their biases* (seeded), so that
    the units really are zero: propagation prunes what reads them and the planner can shrink.

    For ``nn.Linear`` the units are rows of the weight, for GPT-2's ``Conv1D`` columns. A layer
    keeps at least one unit. Returns ``{parameter name: bool mask}`` (True = kept).
    """
    gen = torch.Generator().manual_seed(seed)
    attrs: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or _is_conv1d(module)):
            continue
        w = module.weight
        out_dim = 1 if _is_conv1d(module) else 0
        units = torch.rand(w.shape[out_dim], generator=gen) < keep
        units[int(torch.randint(0, len(units), (1,), generator=gen))] = True
        shape = [1, 1]
        shape[out_dim] = -1
        attrs[f"{name}.weight"] = units.view(shape).expand(w.shape).clone()
        if module.bias is not None:
            attrs[f"{name}.bias"] = units.clone()
    return attrs


def other_inputs(name: str, inputs: tuple) -> tuple:
    """Inputs of another batch size (and sequence length or image size where the model takes
    any) than the example, with fresh random values: the compiled module must accept them."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for a in inputs:
        if not isinstance(a, torch.Tensor):
            out.append(a)
        elif a.is_floating_point():
            shape = list(a.shape)
            shape[0] += 1
            if name == "cnn":
                shape[-1], shape[-2] = shape[-1] + 4, shape[-2] + 4
            out.append(torch.randn(shape, generator=gen))
        elif a.dim() == 2 and a.dtype == torch.long and a.max() > 1:  # token ids
            out.append(torch.randint(0, 100, (a.shape[0] + 1, a.shape[1] + 3), generator=gen))
        else:  # an attention mask (0/1) of the ids above
            am = torch.ones(a.shape[0] + 1, a.shape[1] + 3, dtype=a.dtype)
            am[-1, -4:] = 0
            out.append(am)
    return tuple(out)
