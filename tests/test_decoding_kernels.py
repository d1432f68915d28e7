"""The decoding step's Triton kernels (`modeling_openflamingo.decoding_kernels`) against the library's operations.

The kernels run on a GPU (`OPENFLAMINGO_TEST_DEVICE=cuda`) or in Triton's interpreter on the CPU
(`TRITON_INTERPRET=1 python -m pytest tests/test_decoding_kernels.py` where Triton is installed: the variable must be
set before Triton is imported); the inductor pass that puts the linear kernel in compiled graphs is checked on the
CPU (there the op is `F.linear`), and the kernels' effect on whole decoding runs by `tests/test_fast_path.py` on a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from modeling_openflamingo import decoding_kernels

DEVICE = torch.device(os.environ.get("OPENFLAMINGO_TEST_DEVICE", "cpu"))


@pytest.fixture(params=[False, True], ids=["", "pdl"])
def kernels(request, monkeypatch):
    """The kernels on `DEVICE`: on the GPU if CUDA, else in Triton's interpreter (skipped without it); launched with
    and without programmatic dependent launch (the second only on CUDA: the interpreter has none)."""
    if request.param and DEVICE.type != "cuda":
        pytest.skip("programmatic dependent launch: CUDA only")
    monkeypatch.setattr(decoding_kernels, "PROGRAMMATIC_DEPENDENT_LAUNCH", request.param)
    if DEVICE.type != "cuda":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton kernels on the CPU: run with TRITON_INTERPRET=1 (or OPENFLAMINGO_TEST_DEVICE=cuda)")


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    # bf16 / fp16: a rounding of the output either way (the interpreter rounds bf16 towards zero)
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


@pytest.mark.parametrize(
    ("out_features", "in_features", "bias", "dtype"),
    [
        (48, 64, True, torch.float32),
        (50, 100, False, torch.float32),  # neither a multiple of the blocks
        (512, 2048, False, torch.float32),
        (33, 17, True, torch.bfloat16),
        (2048, 512, False, torch.bfloat16),
    ],
)
def test_linear_kernel_equals_f_linear(kernels, out_features, in_features, bias, dtype):
    torch.manual_seed(0)
    x = torch.randn(1, in_features, dtype=dtype, device=DEVICE)
    weight = torch.randn(out_features, in_features, dtype=dtype, device=DEVICE) / in_features**0.5
    b = torch.randn(out_features, dtype=dtype, device=DEVICE) if bias else None
    out = decoding_kernels.launch_linear(x, weight, b)
    expected = F.linear(x.double(), weight.double(), None if b is None else b.double())
    assert out.shape == (1, out_features) and out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, **_tolerance(dtype))
    # a row of a larger, non-contiguous batch (the kernel takes the row's stride)
    wide = torch.randn(3, 2 * in_features, dtype=dtype, device=DEVICE)[1:2, ::2]
    torch.testing.assert_close(
        decoding_kernels.launch_linear(wide, weight, b), F.linear(wide, weight, b), **_tolerance(dtype)
    )


@pytest.mark.parametrize(
    ("batch", "heads", "keys", "dim_head", "mask", "dtype"),
    [
        (1, 16, 192, 128, "additive", torch.float32),  # MPT's ALiBi bias, masked positions at finfo.min
        (2, 8, 192, 64, "bool", torch.float32),  # cross-attention: one image's latents of three
        (3, 4, 50, 80, None, torch.float32),
        (1, 2, 7, 16, "bool", torch.float32),
        (2, 8, 192, 64, "bool", torch.bfloat16),
    ],
)
def test_single_query_attention_kernel_equals_sdpa(kernels, batch, heads, keys, dim_head, mask, dtype):
    torch.manual_seed(0)
    # (batch, heads, 1, dim_head) as a view of (batch, 1, heads, dim_head), as the attention modules split heads
    query = torch.randn(batch, 1, heads, dim_head, dtype=dtype, device=DEVICE).transpose(1, 2)
    key, value = (torch.randn(batch, heads, keys, dim_head, dtype=dtype, device=DEVICE) for _ in range(2))
    attn_mask, scale = None, None
    if mask == "bool":
        image = torch.arange(keys, device=DEVICE) // 64
        attn_mask = (image == image[-1])[None, None, None, :].repeat(batch, 1, 1, 1)  # (batch, 1, 1, keys)
        attn_mask[0] = False
        attn_mask[0, ..., -3:] = True  # the first blocks of keys all masked: the online softmax starts at -inf
    elif mask == "additive":
        attn_mask = torch.randn(1, heads, 1, keys, dtype=dtype, device=DEVICE).expand(batch, -1, -1, -1).clone()
        attn_mask[..., 100:] = torch.finfo(dtype).min
        scale = 0.3
    out = decoding_kernels.launch_attention(query, key, value, attn_mask, scale)
    expected = F.scaled_dot_product_attention(
        query.double(),
        key.double(),
        value.double(),
        attn_mask=attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.double(),
        scale=scale,
    )
    assert out.shape == (batch, heads, 1, dim_head) and out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, **_tolerance(dtype))


class _RecordingPass(decoding_kernels.SmallBatchLinearPass):
    """The pass on the CPU (where the op is `F.linear`), keeping the graphs it rewrote."""

    def __init__(self) -> None:
        super().__init__(devices=("cpu",))
        self.graphs: list[str] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        super().__call__(graph)
        self.graphs.append(str(graph))


@pytest.mark.parametrize(("rows", "rewritten"), [(1, 2), (2, 0)])
def test_pass_puts_the_kernel_in_place_of_single_row_products(rows, rewritten):
    torch.manual_seed(0)
    first, second = torch.nn.Linear(64, 48), torch.nn.Linear(48, 32, bias=False)

    def f(x: torch.Tensor) -> torch.Tensor:
        return second(torch.relu(first(x))) + 1

    recording = _RecordingPass()
    # no FX graph cache: a cached graph would skip the passes
    options = {"post_grad_custom_post_pass": recording, "fx_graph_cache": False}
    compiled = torch.compile(f, fullgraph=True, options=options)
    x = torch.randn(rows, 1, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), f(x))
    (graph,) = recording.graphs
    assert graph.count("openflamingo.small_batch_linear") == rewritten
    assert ("aten.mm" in graph or "aten.addmm" in graph) == (rewritten == 0)


def test_scaled_dot_product_attention_keeps_the_library_outside_compiled_decoding():
    """Eager calls, training and the CPU go to `F.scaled_dot_product_attention` unchanged."""
    torch.manual_seed(0)
    query = torch.randn(2, 4, 1, 16, requires_grad=True)
    key, value = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    out = decoding_kernels.scaled_dot_product_attention(query, key, value)
    assert torch.equal(out, F.scaled_dot_product_attention(query, key, value))
    out.sum().backward()
    assert query.grad is not None


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the kernel's dispatch: run with OPENFLAMINGO_TEST_DEVICE=cuda")
def test_scaled_dot_product_attention_takes_the_kernel_only_for_its_dtypes(monkeypatch):
    """The single-query kernel accumulates in fp32: fp64 (a model moved to float64) stays with the library."""
    calls = []
    kernel = decoding_kernels.single_query_attention
    monkeypatch.setattr(decoding_kernels, "single_query_attention", lambda *a: calls.append(a[0].dtype) or kernel(*a))
    monkeypatch.setattr(decoding_kernels, "is_traced", lambda: True)  # as inside the compiled decoding step
    torch.manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        query = torch.randn(2, 4, 1, 16, dtype=dtype, device=DEVICE)
        key, value = (torch.randn(2, 4, 9, 16, dtype=dtype, device=DEVICE) for _ in range(2))
        with torch.no_grad():
            out = decoding_kernels.scaled_dot_product_attention(query, key, value)
        tolerance = {} if dtype == torch.float64 else _tolerance(dtype)  # fp64: the library's own result
        torch.testing.assert_close(out, F.scaled_dot_product_attention(query, key, value), **tolerance)
    assert calls == [torch.float32]


def test_a_second_copy_of_the_module_registers_ops_of_its_own():
    """A saved folder's copy of the file, loaded with `trust_remote_code=True` beside the package, imports (custom op
    names are global) and its ops work."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "transformers_modules.some_folder.decoding_kernels", decoding_kernels.__file__
    )
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    assert copy.OPS_NAMESPACE != decoding_kernels.OPS_NAMESPACE == "openflamingo"
    x, weight = torch.randn(1, 8), torch.randn(4, 8)
    torch.testing.assert_close(
        getattr(torch.ops, copy.OPS_NAMESPACE).small_batch_linear(x, weight), F.linear(x, weight)
    )


def test_programmatic_dependent_launch_only_where_the_gpu_has_it(monkeypatch):
    """The decoding step's options ask inductor for programmatic dependent launch only with the flag on, for one row,
    on CUDA GPUs of compute capability 9.0 or newer; the pass is there whenever the kernels are."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(decoding_kernels, "ENABLED", True)
    monkeypatch.setattr(decoding_kernels, "PROGRAMMATIC_DEPENDENT_LAUNCH", True)
    assert "triton.enable_pdl" not in decoding_kernels.decoding_step_options(cpu, 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    options = decoding_kernels.decoding_step_options(cuda, 1)
    expected = os.environ.get("TRITON_INTERPRET") != "1" and decoding_kernels.inductor_has_option("triton.enable_pdl")
    assert options.get("triton.enable_pdl", False) is expected
    assert isinstance(options["post_grad_custom_post_pass"], decoding_kernels.SmallBatchLinearPass)
    assert "triton.enable_pdl" not in decoding_kernels.decoding_step_options(cuda, 8)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "triton.enable_pdl" not in decoding_kernels.decoding_step_options(cuda, 1)
    monkeypatch.setattr(decoding_kernels, "PROGRAMMATIC_DEPENDENT_LAUNCH", False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert "triton.enable_pdl" not in decoding_kernels.decoding_step_options(cuda, 1)
    monkeypatch.setattr(decoding_kernels, "PROGRAMMATIC_DEPENDENT_LAUNCH", True)
    monkeypatch.setattr(decoding_kernels, "inductor_has_option", lambda name: False)  # torch < 2.9
    assert "triton.enable_pdl" not in decoding_kernels.decoding_step_options(cuda, 1)
    monkeypatch.setattr(decoding_kernels, "ENABLED", False)
    assert decoding_kernels.decoding_step_options(cuda, 1) is None
