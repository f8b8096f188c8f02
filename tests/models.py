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
    model = BertModel(cfg).eval()
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
    model = GPT2Model(cfg).eval()
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
    model = ViTModel(cfg, add_pooling_layer=True).eval()
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
