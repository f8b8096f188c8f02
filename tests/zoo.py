"""The models people prune, as users build them: transformers' pure-PyTorch models from tiny
configs with random weights (seeded), default settings otherwise (GPT-2 and the decoders keep
``use_cache=True``, ResNet adds its residuals in place), and a pruning spec for each in the
styles pruning tools produce (FFN channels, attention heads, conv channels, n:m, the tied
embedding of a language model).

Each builder returns a ``Case``: the model, example inputs (batch 2), other inputs (another
batch size, and sequence length where the model allows), a ``sparta.sparsify`` spec, and masks
``sparsify`` cannot name (a parametrized weight's effective value).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import sparta
from sparta.sparsifiers import NM, Channels, Heads, Magnitude

H = 32  # hidden size of the transformer configs
HEADS = 4
TF = dict(hidden_size=H, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=64)


@dataclass
class Case:
    model: nn.Module
    inputs: tuple
    other: tuple
    spec: dict[str, Any]
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    def attrs(self) -> dict[str, torch.Tensor]:
        return {**sparta.sparsify(self.model, self.spec), **self.masks}


def _spec(model: nn.Module, entries: Sequence[tuple[Sequence[str], Any]]) -> dict[str, Any]:
    """A sparsify spec: per entry, the first glob that names parameters of this model
    (parameter names differ across transformers versions)."""
    names = [n for n, _ in model.named_parameters()]
    spec = {}
    for globs, sparsifier in entries:
        glob = next(g for g in globs if fnmatch.filter(names, g))
        spec[glob] = sparsifier
    return spec


def _ids(b: int, t: int) -> torch.Tensor:
    return torch.randint(0, 100, (b, t))


def _img(b: int, size: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, size, size)


def bert() -> Case:
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=100, max_position_embeddings=32, **TF))
    spec = _spec(model, [
        (["encoder.layer.?.output.dense.weight", "*layers.?.mlp.fc2.weight"], Channels(0.5, dim=1)),
        (["*attention.output.dense.weight", "*layers.?.attention.o_proj.weight"],
         Heads(HEADS, 0.5, dim=1)),
        (["encoder.layer.0.intermediate.dense.weight", "*layers.0.mlp.fc1.weight"], NM(2, 4)),
    ])  # fmt: skip
    return Case(model, (_ids(2, 8),), (_ids(3, 11),), spec)


def gpt2() -> Case:
    """The LM head shares the token embedding (tied weights); use_cache stays on."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=100, n_positions=32, n_embd=H, n_layer=1, n_head=HEADS)
    model = GPT2LMHeadModel(cfg)
    spec = {
        "transformer.wte.weight": Magnitude(0.3),
        "transformer.h.*.mlp.c_proj.weight": Channels(0.5, dim=0),  # Conv1D: (in, out)
        "transformer.h.*.attn.c_proj.weight": Heads(HEADS, 0.5, dim=0),
    }
    return Case(model, (_ids(2, 8),), (_ids(3, 11),), spec)


def _decoder_spec() -> dict[str, Any]:
    return {
        "model.layers.*.mlp.down_proj.weight": Channels(0.5, dim=1),
        "model.layers.*.self_attn.o_proj.weight": Heads(HEADS, 0.5, dim=1),
    }


def llama() -> Case:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, max_position_embeddings=32, num_key_value_heads=2, **TF)
    return Case(LlamaForCausalLM(cfg), (_ids(2, 8),), (_ids(3, 11),), _decoder_spec())


def qwen3() -> Case:
    """Hand-written RMSNorm on each head's q and k (q_norm, k_norm). Without the cache, whose
    keys and values the model would return (and so use), a pruned head's q, k and v rows are
    all unused."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(
        vocab_size=100, max_position_embeddings=32, num_key_value_heads=HEADS, head_dim=8,
        use_cache=False, **TF,
    )  # fmt: skip
    return Case(Qwen3ForCausalLM(cfg), (_ids(2, 8),), (_ids(3, 11),), _decoder_spec())


def vit() -> Case:
    from transformers import ViTConfig, ViTModel

    model = ViTModel(ViTConfig(image_size=32, patch_size=8, **TF))
    spec = _spec(model, [
        (["encoder.layer.?.output.dense.weight", "*layers.?.mlp.fc2.weight"], Channels(0.5, dim=1)),
        (["*attention.output.dense.weight", "*layers.?.attention.o_proj.weight"],
         Heads(HEADS, 0.5, dim=1)),
    ])  # fmt: skip
    return Case(model, (_img(2),), (_img(3),), spec)


def swin() -> Case:
    from transformers import SwinConfig, SwinModel

    cfg = SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[2, 2], window_size=4
    )
    model = SwinModel(cfg)
    spec = _spec(model, [
        (["encoder.layers.*.output.dense.weight", "encoder.layers.*.mlp.fc2.weight"],
         Channels(0.5, dim=1)),
    ])  # fmt: skip
    return Case(model, (_img(2),), (_img(3),), spec)


def whisper_encoder() -> Case:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(
        d_model=H, encoder_layers=1, encoder_attention_heads=HEADS, encoder_ffn_dim=64,
        num_mel_bins=16, max_source_positions=16,
    )  # fmt: skip
    spec = {
        "layers.*.fc2.weight": Channels(0.5, dim=1),
        "layers.*.self_attn.out_proj.weight": Heads(HEADS, 0.5, dim=1),
    }
    # Whisper needs exactly 2 * max_source_positions frames.
    return Case(WhisperEncoder(cfg), (torch.randn(2, 16, 32),), (torch.randn(3, 16, 32),), spec)


def wav2vec2() -> Case:
    """Its positional convolution is weight-normalised (torch.nn.utils.parametrizations): the
    mask is given on the effective weight."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    cfg = Wav2Vec2Config(
        hidden_size=H, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    )  # fmt: skip
    model = Wav2Vec2Model(cfg)
    spec = {"feature_extractor.conv_layers.1.conv.weight": Channels(0.5, dim=0)}
    with torch.no_grad():
        w = model.encoder.pos_conv_embed.conv.weight  # weight_norm's effective weight
    masks = {"encoder.pos_conv_embed.conv.weight": Magnitude(0.5).mask(w.detach())}
    return Case(model, (torch.randn(2, 400),), (torch.randn(3, 400),), spec, masks)


def resnet() -> Case:
    """Residuals added in place (out += identity), ReLU in place."""
    from transformers import ResNetConfig, ResNetModel

    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    spec = {"encoder.stages.*.layers.*.layer.0.convolution.weight": Channels(0.5, dim=0)}
    return Case(ResNetModel(cfg), (_img(2),), (_img(3),), spec)


def convnext() -> Case:
    from transformers import ConvNextConfig, ConvNextModel

    cfg = ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)
    spec = {"encoder.stages.*.layers.*.pwconv2.weight": Channels(0.5, dim=1)}
    return Case(ConvNextModel(cfg), (_img(2),), (_img(3),), spec)


def mobilenet_v2() -> Case:
    from transformers import MobileNetV2Config, MobileNetV2Model

    cfg = MobileNetV2Config(image_size=32, depth_multiplier=0.25)
    spec = {"layer.*.expand_1x1.convolution.weight": Channels(0.5, dim=0)}
    return Case(MobileNetV2Model(cfg), (_img(2),), (_img(3),), spec)


def efficientnet() -> Case:
    from transformers import EfficientNetConfig, EfficientNetModel

    cfg = EfficientNetConfig(
        image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320
    )
    spec = {"encoder.blocks.*.projection.project_conv.weight": Channels(0.5, dim=1)}
    return Case(EfficientNetModel(cfg), (_img(2),), (_img(3),), spec)


ZOO: dict[str, Callable[[], Case]] = {
    "bert": bert,
    "gpt2": gpt2,
    "llama": llama,
    "qwen3": qwen3,
    "vit": vit,
    "swin": swin,
    "whisper_encoder": whisper_encoder,
    "wav2vec2": wav2vec2,
    "resnet": resnet,
    "convnext": convnext,
    "mobilenet_v2": mobilenet_v2,
    "efficientnet": efficientnet,
}


def build(name: str) -> Case:
    torch.manual_seed(0)
    case = ZOO[name]()
    case.model.eval()
    return case
