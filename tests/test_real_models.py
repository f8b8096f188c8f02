"""The faults of real models, each as a small test: tied and reparametrized weights, a check
that can see a wrong name resolution, hand-written norms, recurrent layers, scrambling without
autograd, n:m after propagation, default configs and in-place ops.

Every model-level equality is against ``sparta.masked_model`` (the user's module with its
parameters multiplied by the masks through ``named_parameters``/``parametrize``).
"""

from __future__ import annotations

import copy
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import sparta
from sparta.sparsifiers import NM, Channels

propagate_module = importlib.import_module("sparta.propagate")  # the module, not the function


def leaves(out) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def assert_matches_reference(compiled, model, attrs, *inputs, tol: float = 1e-5) -> None:
    ref = sparta.masked_model(model, attrs).eval()
    with torch.no_grad():
        got, want = leaves(compiled(*inputs)), leaves(ref(*inputs))
    assert len(got) == len(want) and want
    for g, w in zip(got, want):
        scale = w.abs().max().item() or 1.0
        assert (g - w).abs().max().item() / scale < tol


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before)


# ----------------------------------------------------------------------------- tied weights


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.emb(ids)))


def _rows_3_to_6() -> torch.Tensor:
    m = torch.ones(20, 8, dtype=torch.bool)
    m[3:7] = False
    return m


@pytest.mark.parametrize("name", ["emb.weight", "head.weight"])
def test_tied_weights_every_alias_reaches_the_tensor(name: str) -> None:
    torch.manual_seed(0)
    model = TiedLM().eval()
    ids = torch.randint(0, 20, (2, 5))
    attrs = {name: _rows_3_to_6()}
    compiled = sparta.compile(model, attrs, (ids,), measure=False)
    assert_matches_reference(compiled, model, attrs, ids)
    report = compiled.report
    entry = report.tensor("emb.weight")  # the primary name, as named_parameters() gives it
    assert entry.aliases == ["head.weight"]
    assert entry.density_given == pytest.approx(16 / 20)
    assert torch.equal(report.mask("head.weight"), report.mask("emb.weight"))
    assert not report.mask("head.weight")[3:7].any()
    assert "emb.weight (= head.weight)" in str(report)
    assert "head.weight" not in [t.name for t in report.tensors]  # no phantom dense tensor
    sparta.check_soundness(model, attrs, (ids,))


def test_tied_weights_two_masks() -> None:
    model = TiedLM().eval()
    ids = torch.randint(0, 20, (2, 5))
    same = {"emb.weight": _rows_3_to_6(), "head.weight": _rows_3_to_6()}
    report = sparta.propagate(model, same, (ids,))
    assert report.tensor("emb.weight").density_given == pytest.approx(16 / 20)
    other = _rows_3_to_6()
    other[10] = False
    with pytest.raises(sparta.AttrError, match=r"'emb\.weight' and 'head\.weight'.*same tensor"):
        sparta.propagate(model, {"emb.weight": _rows_3_to_6(), "head.weight": other}, (ids,))


# ----------------------------------------------------------------------------- reparametrized


class _Affine(nn.Module):
    """A user parametrization with a parameter of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.scale + 0.1


def _user(layer: nn.Linear) -> nn.Linear:
    parametrize.register_parametrization(layer, "weight", _Affine())
    return layer


def _pruned(layer: nn.Linear) -> nn.Linear:
    prune.l1_unstructured(layer, "weight", amount=0.3)
    return layer


REPARAMETRIZE = {
    "weight_norm": parametrizations.weight_norm,
    "spectral_norm": parametrizations.spectral_norm,
    "orthogonal": parametrizations.orthogonal,
    "user": _user,
    "old_weight_norm": torch.nn.utils.weight_norm,
    "old_spectral_norm": torch.nn.utils.spectral_norm,
    "prune": _pruned,
}


def _reparametrized(kind: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the older APIs are deprecated
        first = REPARAMETRIZE[kind](nn.Linear(8, 16))
    return nn.Sequential(first, nn.ReLU(), nn.Linear(16, 4)).eval()


@pytest.mark.parametrize("kind", sorted(REPARAMETRIZE))
def test_reparametrized_weight_masks_the_effective_weight(kind: str) -> None:
    model = _reparametrized(kind)
    x = torch.randn(3, 8)
    with torch.no_grad():
        y_before = model(x)
    before = state(model)
    mask = torch.ones(16, 8, dtype=torch.bool)
    mask[:, :3] = False  # input columns 0..2 of the effective weight
    attrs = {"0.weight": mask}
    compiled = sparta.compile(model, attrs, (x,), measure=False)
    assert_matches_reference(compiled, model, attrs, x)
    assert sparta.check_soundness(model, attrs, (x,)) < 1e-5
    entry = compiled.report.tensor("0.weight")
    assert entry.kind == "parameter" and entry.density_given == pytest.approx(5 / 8)
    assert same_state(model, before)  # the model, its parametrizations and hooks are intact
    with torch.no_grad():
        assert torch.equal(model(x), y_before)


@pytest.mark.parametrize(
    ("kind", "underlying"),
    [
        ("weight_norm", "0.parametrizations.weight.original0"),
        ("orthogonal", "0.parametrizations.weight.original"),
        ("user", "0.parametrizations.weight.0.scale"),
        ("old_weight_norm", "0.weight_g"),
        ("old_spectral_norm", "0.weight_orig"),
    ],
)
def test_mask_on_an_underlying_tensor_is_refused(kind: str, underlying: str) -> None:
    model = _reparametrized(kind)
    shape = dict(model.named_parameters())[underlying].shape
    with pytest.raises(sparta.AttrError, match=r"effective weight.*'0\.weight'"):
        sparta.propagate(
            model, {underlying: torch.ones(shape, dtype=torch.bool)}, (torch.randn(2, 8),)
        )


def test_prune_orig_name_is_an_alias_of_the_weight() -> None:
    """torch.nn.utils.prune multiplies weight_orig by its mask, elementwise: masking weight_orig
    is masking the weight."""
    model = _reparametrized("prune")
    x = torch.randn(3, 8)
    mask = torch.rand(16, 8, generator=torch.Generator().manual_seed(1)) > 0.5
    attrs = {"0.weight_orig": mask}
    compiled = sparta.compile(model, attrs, (x,), measure=False)
    assert_matches_reference(compiled, model, attrs, x)
    assert compiled.report.tensor("0.weight").aliases == ["0.weight_orig"]


# ----------------------------------------------------------------------------- the check itself


def test_check_soundness_sees_a_wrong_name_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference is built from the module alone: a mask the compiler puts on the wrong
    tensor is caught (the old check compared two runs that shared the resolution)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[:, :4] = False
    attrs = {"0.weight": mask}
    x = torch.randn(4, 8)
    assert sparta.check_soundness(model, attrs, (x,)) < 1e-5
    real = propagate_module._node_of

    def wrong(traced, name):  # resolves 0.weight to the other layer's weight
        return real(traced, "2.weight" if name == "0.weight" else name)

    monkeypatch.setattr(propagate_module, "_node_of", wrong)
    with pytest.raises(AssertionError, match="masked model"):
        sparta.check_soundness(model, attrs, (x,))


# ----------------------------------------------------------------------------- hand-written norms


class HandRMS(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + 1e-6))


class HandLayerNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(d)), nn.Parameter(torch.randn(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return self.weight * (x - u) / torch.sqrt(s + 1e-12) + self.bias


class QKNormAttention(nn.Module):
    """Per-head norm of q and k (Qwen3, timm's qk_norm)."""

    def __init__(self, norm: type[nn.Module], d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.q_norm, self.k_norm = norm(self.dh), norm(self.dh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.h, self.dh)

        q = self.q_norm(heads(self.q(x))).transpose(1, 2)
        k = self.k_norm(heads(self.k(x))).transpose(1, 2)
        v = heads(self.v(x)).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.o(y)


@pytest.mark.parametrize("norm", [HandRMS, HandLayerNorm])
def test_hand_written_norm_keeps_heads_prunable(norm: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = QKNormAttention(norm).eval()
    x = torch.randn(2, 5, 32)
    mask = torch.ones(32, 32, dtype=torch.bool)
    mask[:, 8:16] = False  # head 1 of the output projection
    attrs = {"o.weight": mask}
    compiled = sparta.compile(model, attrs, (x,), measure=False)
    for name in ("q.weight", "k.weight", "v.weight"):
        rows = compiled.report.mask(name).any(dim=1)
        assert not rows[8:16].any(), name  # the head's rows: unused
        assert rows[:8].all() and rows[16:].all(), name
    assert_matches_reference(compiled, model, attrs, torch.randn(3, 7, 32))
    sparta.check_soundness(model, attrs, (x,))


def test_rsqrt_input_is_pruned_only_when_never_zero() -> None:
    """rsqrt(x) for an x that can be zero stays unprunable: an inf in an unused slot would
    still meet the zero of a pruned weight."""

    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.rsqrt(self.a(x).abs()))

    model = Bare().eval()
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[:, 1] = False
    report = sparta.propagate(model, {"b.weight": mask}, (torch.randn(2, 4),))
    assert report.mask("a.weight").all()  # |a(x)| can be 0: nothing pruned through rsqrt


# ----------------------------------------------------------------------------- recurrent layers


class LinearLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.rnn = nn.LSTM(8, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(self.fc(x))[0]


def test_linear_then_lstm_strict() -> None:
    torch.manual_seed(0)
    model = LinearLSTM().eval()
    x = torch.randn(5, 3, 6)
    w = torch.ones(8, 6, dtype=torch.bool)
    w[[2, 5]] = False
    b = torch.ones(8, dtype=torch.bool)
    b[[2, 5]] = False
    attrs = {"fc.weight": w, "fc.bias": b}
    compiled = sparta.compile(model, attrs, (x,), measure=False)  # strict: lstm has a rule
    cols = compiled.report.mask("rnn.weight_ih_l0").any(dim=0)
    assert cols.tolist() == [True, True, False, True, True, False, True, True]
    assert_matches_reference(compiled, model, attrs, torch.randn(4, 2, 6))
    sparta.check_soundness(model, attrs, (x,))


# ----------------------------------------------------------------------------- scrambling


@torch.library.custom_op("sparta_test_real::odd_zero", mutates_args=())
def odd_zero(x: torch.Tensor) -> torch.Tensor:
    """Zeroes the odd features; registers no backward (no autograd)."""
    y = x.clone()
    y[..., 1::2] = 0
    return y


@odd_zero.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class OddZero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(8, 64), nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(odd_zero(self.fc(x)))


def test_scrambling_without_autograd_finds_unused_inputs() -> None:
    from sparta import scramble

    scramble.clear_cache()
    torch.manual_seed(0)
    model = OddZero().eval()
    x = torch.randn(4, 16, 8)  # 4096 elements into the op: too many for element tests alone
    with pytest.warns(scramble.ScrambleWarning):
        report = sparta.propagate(model, {}, (x,), strict=False)
    rows = report.mask("fc.weight").any(dim=1)
    assert rows[0::2].all() and not rows[1::2].any()  # odd features: zero out, unused in
    assert not report.mask("out.weight")[:, 1::2].any()
    assert report.inferred_ops == ["sparta_test_real.odd_zero.default"]


def test_random_ops_are_scrambled_when_randomness_is_off() -> None:
    from sparta.scramble import why_not_scramble

    lstm = torch.ops.aten.lstm.input
    assert why_not_scramble(lstm, {"train": True, "dropout": 0.5}) == "its output is random"
    assert why_not_scramble(lstm, {"train": False, "dropout": 0.5}) is None
    assert why_not_scramble(torch.ops.aten.dropout.default, {"p": 0.0, "train": True}) is None


@torch.library.custom_op("sparta_test_real::rowsum", mutates_args=())
def rowsum(x: torch.Tensor) -> torch.Tensor:
    return x.sum(-1, keepdim=True).expand_as(x).clone()


@rowsum.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("sparta_test_real::random_jitter", mutates_args=())
def random_jitter(x: torch.Tensor) -> torch.Tensor:
    return x + 0.01 * torch.randn_like(x)


@random_jitter.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def test_ops_without_rules_are_reported_inferred_or_conservative() -> None:
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return random_jitter(rowsum(self.fc(x)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = sparta.propagate(Custom().eval(), {}, (torch.randn(2, 4),), strict=False)
    assert report.inferred_ops == ["sparta_test_real.rowsum.default"]
    assert report.conservative_ops == ["sparta_test_real.random_jitter.default"]
    assert "treated conservatively" in report.summary()
    assert report.to_dict()["conservative_ops"] == report.conservative_ops


# ------------------------------------------------------------------------ n:m after propagation


def test_nm_survives_rows_pruned_by_propagation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    attrs = sparta.sparsify(model, {"0.weight": NM(2, 4), "2.weight": Channels(0.25, dim=1)})
    x = torch.randn(8, 64)
    with pytest.warns(UserWarning, match=r"'nm_cpu'.*linear_1 \(weight '2\.weight'\): .*column"):
        compiled = sparta.compile(model, attrs, (x,), backends=["nm_cpu"], measure=False)
    entry = compiled.report.tensor("0.weight")
    assert entry.pattern == "2:4" and entry.density == pytest.approx(0.75 * 0.5)
    impls = {n.name: n.impl for n in compiled.report.nodes if n.target == "aten.linear.default"}
    assert impls == {"linear": "nm_cpu", "linear_1": "dense"}
    assert_matches_reference(compiled, model, attrs, torch.randn(5, 64))


def test_patterns_survive_pruned_rows_and_columns() -> None:
    from sparta.tesa import Pattern, detect_pattern, surviving_pattern

    nm = NM(2, 4).mask(torch.randn(32, 64))
    rows = nm.clone()
    rows[:8] = False  # units nobody reads
    assert str(detect_pattern(rows)) == "2:4"
    lined = rows.clone()
    lined[:, 5] = False  # a dead input feature leaves groups short of 2
    assert str(detect_pattern(lined)) == "unstructured"  # the mask alone cannot tell
    assert str(surviving_pattern(Pattern.parse("2:4"), lined)) == "2:4"  # the given pattern can
    random = torch.rand(32, 64, generator=torch.Generator().manual_seed(0)) > 0.5
    assert str(surviving_pattern(Pattern.parse("2:4"), random)) == "unstructured"
    blocks = torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    blocks = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)
    blocks[3] = False
    blocks[:, 40] = False
    assert detect_pattern(blocks).kind == "block"


def test_nm_weight_with_dead_inputs_keeps_its_pattern() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)
    ).eval()
    spec = {"0.weight": Channels(0.25), "0.bias": Channels(0.25), "2.weight": NM(2, 4)}
    attrs = sparta.sparsify(model, spec)
    x = torch.randn(8, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the other linears are not n:m
        compiled = sparta.compile(model, attrs, (x,), backends=["nm_cpu"], measure=False)
    assert not compiled.report.mask("2.weight")[:, :16].all()  # dead input columns
    assert compiled.report.tensor("2.weight").pattern == "2:4"
    assert compiled.report.node("linear_1").impl == "nm_cpu"
    assert_matches_reference(compiled, model, attrs, torch.randn(5, 16))


# ----------------------------------------------------------------------------- in-place ops


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc1(x)
        out += x  # the residual, in place
        return self.fc2(self.act(out))


def test_in_place_residual_and_relu_are_made_functional() -> None:
    torch.manual_seed(0)
    model = InPlace().eval()
    x = torch.randn(4, 8)
    w = torch.ones(8, 8, dtype=torch.bool)
    w[:, 3] = False
    attrs = {"fc2.weight": w}
    compiled = sparta.compile(model, attrs, (x,), measure=False)  # strict: no add_ / relu_
    targets = {n.target for n in compiled.report.nodes}
    assert "aten.add.Tensor" in targets and "aten.relu.default" in targets
    assert not any(t.endswith("_.Tensor") or t.endswith("_.default") for t in targets)
    assert_matches_reference(compiled, model, attrs, torch.randn(6, 8))


def test_mutating_an_input_is_a_trace_error() -> None:
    class Mutates(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.mul_(2)
            return x + 1

    with pytest.raises(sparta.TraceError, match=r"mutates tensors .*copy_.*out of place"):
        sparta.propagate(Mutates(), {}, (torch.randn(2, 3),))


def test_gpt2_default_config_returns_its_cache() -> None:
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=1, n_head=4)
    assert cfg.use_cache
    model = GPT2Model(cfg).eval()
    ids = torch.randint(0, 100, (2, 6))
    mask = torch.ones(128, 32, dtype=torch.bool)
    mask[:64] = False
    attrs = {"h.0.mlp.c_proj.weight": mask}
    compiled = sparta.compile(model, attrs, (ids,), measure=False)
    other = torch.randint(0, 100, (3, 9))
    with torch.no_grad():
        got, want = compiled(other), sparta.masked_model(model, attrs).eval()(other)
    assert type(got) is type(want)
    assert type(got["past_key_values"] if "past_key_values" in got else got[1]) is type(
        want["past_key_values"] if "past_key_values" in want else want[1]
    )
    assert_matches_reference(compiled, model, attrs, other)
    assert copy.deepcopy(model) is not None
