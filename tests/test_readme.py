"""The README's five-line example runs as written (on a small BERT)."""

from __future__ import annotations

import pathlib
import re

import torch
from transformers import BertConfig, BertModel


def test_five_line_example_runs() -> None:
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("in five lines", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    cfg = BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=100,
    )
    env = {"model": BertModel(cfg).eval(), "input_ids": torch.randint(0, 100, (2, 16))}
    exec(compile(code, "README.md", "exec"), env)
    report = env["compiled"].report
    given, after = report.weight_density()
    assert after < given < 1.0
