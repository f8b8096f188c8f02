"""A dim the exported graph fixed to the example's size 1: an InputError naming the argument and
the fix, never a failure inside a kernel or a view (or a batch folded into another dim);
compiled and loaded alike."""

from __future__ import annotations

import pytest
import torch

import sparta
from sparta.codegen import nm_cpu
from sparta.errors import InputError
from sparta.sparsifiers import Magnitude
from tests.models import bert, mlp


def test_a_batch_of_one_fixes_the_batch_and_says_how_to_compile_again(tmp_path) -> None:
    model, (ids,) = bert()
    ids = ids[:1]  # export fixes a dim whose example size is 1
    attrs = sparta.sparsify(model, {"encoder.*.intermediate.dense.weight": Magnitude(0.5)})
    compiled = sparta.compile(model, attrs, (ids,), measure=False)
    ref = sparta.masked_model(model, attrs)
    with torch.no_grad():
        longer = torch.randint(0, 100, (1, ids.shape[1] + 5))  # the sequence stays dynamic
        torch.testing.assert_close(compiled(longer), ref(longer), rtol=1e-4, atol=1e-5)
        path = tmp_path / "b1.sparta"
        compiled.save(path)
        for m in (compiled, sparta.load(path, model)):
            with pytest.raises(InputError, match=r"argument 0 has shape \(2, .*size 1 in dim 0"):
                m(torch.randint(0, 100, (2, ids.shape[1])))


def test_shapes_of_a_batch_of_two_are_free() -> None:
    """Only dims fixed to an example size of 1 are checked: other batches, sequence lengths and
    ranks still run (and give the masked model's answer)."""
    model, (x,) = mlp()
    compiled = sparta.compile(model, {}, (x,), measure=False)
    with torch.no_grad():
        for shape in ((2, 32), (7, 32), (3, 5, 32)):
            fresh = torch.randn(shape)
            torch.testing.assert_close(compiled(fresh), model(fresh))


def test_a_wrong_feature_size_at_a_generated_kernel_is_an_input_error(tmp_path) -> None:
    """A generated CPU kernel names the feature size it takes, as an InputError (the dims
    export kept static are not checked up front: a CNN takes other image sizes)."""
    if not nm_cpu.available():
        pytest.skip("no C++ compiler")
    model, (x,) = mlp()
    attrs = sparta.sparsify(model, {"fc1.weight": Magnitude(0.9)})
    compiled = sparta.compile(model, attrs, (x,), backends=["sparse_cpu"], measure=False)
    assert compiled.report.node("linear").impl == "sparse_cpu"
    path = tmp_path / "mlp.sparta"
    compiled.save(path)
    for m in (compiled, sparta.load(path, model)):
        with pytest.raises(InputError, match=r"shape \(\.\.\., 32\), got \(4, 33\)"):
            m(torch.randn(4, 33))


def test_token_ids_take_any_integer_dtype_and_nothing_else() -> None:
    model, (ids,) = bert()
    compiled = sparta.compile(model, {}, (ids,), measure=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids.to(torch.int32)), model(ids))
    for dtype in (torch.float32, torch.bool):
        with pytest.raises(InputError, match=rf"argument 0 is {dtype}.*compiled for torch.int64"):
            compiled(ids.to(dtype))
