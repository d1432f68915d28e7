"""Triton kernels for the greedy decoding step (one token per row), where the library's kernels are slow on the GPU.

- `small_batch_linear`: `F.linear` for one row. At one token per step the step's matrix products read each weight
  once for one row: they are bound by the memory's bandwidth, and cuBLAS's kernels for them reach ~2.3-2.9 TB/s on
  of3b's 25-34 MB projections and much less on its 2-8 MB ones (H200, `benchmarks/bench_kernels.py`: 0.39 TB/s for
  the cross-attention's 2 MB `to_q`, where this kernel reaches 0.77). The kernel streams the weight through a grid of
  `BLOCK_N`-row slices, each program keeping `BLOCK_N x BLOCK_K` fp32 partial sums (products in fp32, one reduction at
  the end): `F.linear`'s values up to the order of the fp32 additions. [`SmallBatchLinearPass`] is the inductor
  post-grad pass that puts it in place of `mm`/`addmm` when a compiled graph multiplies a single row by a weight
  (`torch.compile(..., options={"post_grad_custom_post_pass": SmallBatchLinearPass()})`); every other product stays
  with inductor.
- `single_query_attention`: `F.scaled_dot_product_attention` for one query per row, one program per row and head, an
  online softmax in fp32 over blocks of keys. [`scaled_dot_product_attention`] calls it inside compiled graphs, on
  CUDA, without gradients: the gated cross-attention's decoding step uses it (over 3 images' latents, 6.6 us against
  cuDNN's 9.4 at batch 1, H200); MPT's self-attention keeps `F.scaled_dot_product_attention`, which was faster there
  (6.5 against 7.4 us at batch 1, 10.2 against 15.1 us for of9b's 32 heads at batch 8).

At batch 1, on GPUs of compute capability 9.0 and up, the decoding step's Triton kernels (these and inductor's) are
launched with programmatic dependent launch (`PROGRAMMATIC_DEPENDENT_LAUNCH`): each kernel waits on the device for the
previous one's results (`gdc_wait`) instead of being launched after it ends.

`ENABLED = False` turns all of it off (the library's kernels then run everywhere).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

# Whether the decoding step uses these kernels (`_StaticDecoder` reads it when it compiles its step).
ENABLED = True
# Whether a decoding step of up to `MAX_ROWS` rows launches its kernels with programmatic dependent launch on GPUs that
# have it (compute capability 9.0 and up): each kernel is launched while the previous one runs and waits on the device
# for its results (inductor's `triton.enable_pdl` for its kernels, `launch_pdl` for these), which hides a launch's
# latency between the step's many small kernels. Kernels of other libraries (cuBLAS, cuDNN) are launched as usual.
# Measured in one job (H200, of3b, `benchmarks/results/2026-12-02-h200-run33-*`): the batch-1 step 2.499 -> 2.250 ms;
# at batch 8, where cuBLAS does the products, 3.089 -> 3.178 ms, so larger batches launch as usual.
PROGRAMMATIC_DEPENDENT_LAUNCH = True
# Rows of `x` up to which the pass uses the linear kernel (one: the kernel reads the weight once per row).
MAX_ROWS = 1
# The namespace of this module's custom ops. A saved folder's copy of this file (loaded with `trust_remote_code=True`,
# as `transformers_modules.<folder>.decoding_kernels`) can be imported beside the package: each copy registers its
# ops under a name of its own.
OPS_NAMESPACE = (
    "openflamingo"
    if __name__ == "modeling_openflamingo.decoding_kernels"
    else "openflamingo_" + hashlib.sha256(__name__.encode()).hexdigest()[:16]
)


def is_traced() -> bool:
    """Whether this code is being traced by `torch.compile` (dynamo) or `torch.export`, rather than run eagerly.

    Not `torch.compiler.is_compiling()` (nor transformers' `is_torchdynamo_compiling()`, which returns it): that is a
    process-wide flag, true in every thread while any one thread compiles something, so an eager forward in another
    thread would take the traced branches (and run with another forward's state). `is_dynamo_compiling()` is true
    only inside the frame that dynamo traces."""
    return torch.compiler.is_dynamo_compiling() or torch.compiler.is_exporting()


def is_capturing_cuda_graph() -> bool:
    """Whether the current CUDA stream is capturing a CUDA graph (the fast path's steps): reading a device value on
    the host is an error there, and Python state set there is not set again when the graph is replayed. Does not
    initialise CUDA (without it, nothing captures)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _triton() -> tuple[Any, Any]:
    """`triton` and `triton.language` (there with CUDA builds of torch only). Imported inside a `try`: transformers'
    remote-code loader requires every package that a file of a Hub folder imports, except in a `try` (or under an
    `is_..._available()` check), and these kernels are never used without CUDA."""
    try:
        import triton
        import triton.language as tl
    except ImportError as error:
        raise ImportError("The decoding kernels need Triton, which comes with CUDA builds of torch.") from error
    return triton, tl


@functools.cache
def _linear_kernel() -> Any:
    """The linear kernel, compiled on first use (Triton is only there with CUDA builds of torch)."""
    triton, tl = _triton()

    @triton.jit
    def small_batch_linear_kernel(
        x_ptr,
        w_ptr,
        bias_ptr,
        y_ptr,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_ym,
        HAS_BIAS: tl.constexpr,
        EVEN_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]); program (i, m) makes y[m, i * BLOCK_N : (i + 1) * BLOCK_N]
        if PDL:  # launched before the previous kernel ends: wait for its results (x) before reading any
            tl.extra.cuda.gdc_wait()
        pid_n = tl.program_id(0)
        m = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_n = offs_n < N
        w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
        x_ptrs = x_ptr + m * stride_xm + offs_k
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0, eviction_policy="evict_first")
                x = tl.load(x_ptrs)
            else:
                mask_k = (k + offs_k) < K
                w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0, eviction_policy="evict_first")
                x = tl.load(x_ptrs, mask=mask_k, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        if PDL:  # every load is issued: the next kernel may be launched
            tl.extra.cuda.gdc_launch_dependents()
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(y_ptr + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)

    return small_batch_linear_kernel


def kernel_config(out_features: int, in_features: int) -> dict[str, int]:
    """Launch parameters for an `(out_features, in_features)` weight: `BLOCK_N`, `BLOCK_K`, `num_warps`,
    `num_stages`. From a sweep on an H100 (`benchmarks/bench_kernels.py --only small-batch-linear --gemv-sweep`,
    of3b's seven decoding weights, 2 to 206 MB): slices of 2 rows x 1024 columns (a 4 KB bf16 tile per iteration,
    16 elements per thread of 4 warps) were the fastest or within 2% of it for every weight with 1024 columns or more;
    narrower weights keep the tile's 2048 elements with more rows. So the settings follow `in_features` only: the
    sweep found no weight whose rows (`out_features`, 512 to 50,432) called for others."""
    block_k = min(1024, max(16, 1 << (in_features - 1).bit_length()))
    return {"BLOCK_N": max(2, 2048 // block_k), "BLOCK_K": block_k, "num_warps": 4, "num_stages": 3}


@functools.cache
def inductor_has_option(name: str) -> bool:
    """Whether this torch's inductor has the config option `name` (dotted, e.g. `"triton.enable_pdl"`): options come
    and go between the torch versions this package supports."""
    import torch._inductor.config

    *path, option = name.split(".")
    owner: Any = torch._inductor.config
    for part in path:
        owner = getattr(owner, part, None)
    return owner is not None and hasattr(owner, option)


def _programmatic_launch(device: torch.device, rows: int) -> bool:
    """Whether kernels for `rows` rows on `device` are launched with programmatic dependent launch
    (`PROGRAMMATIC_DEPENDENT_LAUNCH`, up to `MAX_ROWS` rows, a CUDA GPU of compute capability 9.0 or newer, a torch
    whose inductor has it; never in Triton's interpreter)."""
    return (
        PROGRAMMATIC_DEPENDENT_LAUNCH
        and rows <= MAX_ROWS
        and inductor_has_option("triton.enable_pdl")  # torch >= 2.9, whose Triton has `gdc_wait`
        and device.type == "cuda"
        and os.environ.get("TRITON_INTERPRET") != "1"
        and torch.cuda.get_device_capability(device)[0] >= 9
    )


def _launch_options(device: torch.device, rows: int) -> dict[str, bool]:
    """The kernels' `PDL` argument and Triton's `launch_pdl` option for a launch for `rows` rows on `device`."""
    pdl = _programmatic_launch(device, rows)
    return {"PDL": True, "launch_pdl": True} if pdl else {"PDL": False}


def launch_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: dict[str, int] | None = None
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a 2-D `x` of shape (rows, in_features) and a contiguous `weight` of shape
    (out_features, in_features), by the Triton kernel; returns (rows, out_features) in `x`'s dtype."""
    rows, in_features = x.shape
    out_features = weight.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    config = dict(config or kernel_config(out_features, in_features))
    grid = (-(-out_features // config["BLOCK_N"]), rows)
    _linear_kernel()[grid](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        out_features,
        in_features,
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        HAS_BIAS=bias is not None,
        EVEN_K=in_features % config["BLOCK_K"] == 0,
        **config,
        **_launch_options(x.device, rows),
    )
    return y


@torch.library.custom_op(f"{OPS_NAMESPACE}::small_batch_linear", mutates_args=())
def small_batch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a 2-D `x` with a few rows: the Triton kernel on CUDA, `F.linear` elsewhere.

    Args:
        x: (rows, in_features).
        weight: (out_features, in_features), contiguous.
        bias: (out_features,) or None.

    Returns:
        (rows, out_features), `x`'s dtype.
    """
    if x.is_cuda:
        return launch_linear(x, weight, bias)
    return F.linear(x, weight, bias)


@small_batch_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def _rewritable(x: Any, weight: Any, max_rows: int, devices: tuple[str, ...]) -> bool:
    """Whether `mm(x, weight.t())` (fake tensors from the nodes' metadata) can be the kernel's: a static row count
    up to `max_rows`, and a contiguous 2-D weight on one of `devices`, of `x`'s floating dtype."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor)):
        return False
    rows = x.shape[0]
    return (
        x.dim() == 2
        and weight.dim() == 2
        and isinstance(rows, int)
        and rows <= max_rows
        and x.device.type in devices
        and weight.device == x.device
        and x.dtype == weight.dtype
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
        and weight.is_contiguous()
    )


class SmallBatchLinearPass(CustomGraphPass):
    """Inductor post-grad pass: `mm(x, permute(w, [1, 0]))` and `addmm(bias, x, permute(w, [1, 0]))` with at most
    `max_rows` rows in `x` become `openflamingo::small_batch_linear(x, w, bias)`.

    Args:
        max_rows: the largest static row count rewritten.
        devices: device types on which it rewrites ("cpu" only for tests: there the op is `F.linear`).
    """

    def __init__(self, max_rows: int = MAX_ROWS, devices: tuple[str, ...] = ("cuda",)) -> None:
        self.max_rows = max_rows
        self.devices = devices

    def __call__(self, graph: torch.fx.Graph) -> None:
        aten = torch.ops.aten
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
                continue
            if node.target is aten.addmm.default:
                if node.kwargs:  # beta / alpha
                    continue
                bias, x, weight_t = node.args
                if bias.meta.get("val") is None or bias.meta["val"].dim() != 1:
                    continue
            else:
                bias, (x, weight_t) = None, node.args
            if not (
                isinstance(weight_t, torch.fx.Node)
                and weight_t.target is aten.permute.default
                and list(weight_t.args[1]) == [1, 0]
            ):
                continue
            weight = weight_t.args[0]
            if not _rewritable(x.meta.get("val"), weight.meta.get("val"), self.max_rows, self.devices):
                continue
            with graph.inserting_before(node):
                op = getattr(torch.ops, OPS_NAMESPACE).small_batch_linear.default
                new = graph.call_function(op, (x, weight, bias))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            if not weight_t.users:
                graph.erase_node(weight_t)

    def uuid(self) -> Any:
        return (get_hash_for_files((__file__,)), self.max_rows, self.devices)


def decoding_step_options(device: torch.device, rows: int) -> dict[str, Any] | None:
    """Inductor's options for compiling a decoding step of `rows` rows on `device`: the pass that puts the batch-1
    linear kernel in place of single-row products, and programmatic dependent launch for inductor's kernels where these
    kernels use it (`PROGRAMMATIC_DEPENDENT_LAUNCH`). None when `ENABLED` is False."""
    if not ENABLED:
        return None
    options: dict[str, Any] = {"post_grad_custom_post_pass": SmallBatchLinearPass()}
    if _programmatic_launch(device, rows):
        options["triton.enable_pdl"] = True
    return options


@functools.cache
def _attention_kernel() -> Any:
    """The single-query attention kernel, compiled on first use."""
    triton, tl = _triton()

    @triton.jit
    def single_query_attention_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        mask_ptr,
        out_ptr,
        heads,
        keys,
        dim,
        scale,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kh,
        stride_kl,
        stride_vb,
        stride_vh,
        stride_vl,
        stride_mb,
        stride_mh,
        stride_ml,
        stride_ob,
        stride_oh,
        MASK: tl.constexpr,  # 0: none, 1: bool (True: attend), 2: additive
        BLOCK_L: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # out[b, h] = softmax(q[b, h] . k[b, h]^T * scale + mask[b, h]) @ v[b, h]; program (b * heads + h)
        if PDL:  # launched before the previous kernel ends: wait for its results before reading any
            tl.extra.cuda.gdc_wait()
        pid = tl.program_id(0)
        b = pid // heads
        h = pid % heads
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < dim
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        m_i = tl.max(tl.full([BLOCK_L], float("-inf"), tl.float32), axis=0)  # running max of the scores
        l_i = tl.sum(tl.zeros([BLOCK_L], tl.float32), axis=0)  # running sum of their exponentials
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh
        for start in range(0, keys, BLOCK_L):
            offs_l = start + tl.arange(0, BLOCK_L)
            mask_l = offs_l < keys
            tile = mask_l[:, None] & mask_d[None, :]
            k = tl.load(k_base + offs_l[:, None] * stride_kl + offs_d[None, :], mask=tile, other=0.0)
            s = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
            if MASK == 1:
                keep = tl.load(mask_ptr + b * stride_mb + h * stride_mh + offs_l * stride_ml, mask=mask_l, other=0)
                s = tl.where(keep != 0, s, float("-inf"))
            if MASK == 2:
                bias = tl.load(mask_ptr + b * stride_mb + h * stride_mh + offs_l * stride_ml, mask=mask_l, other=0.0)
                s += bias.to(tl.float32)
            s = tl.where(mask_l, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all keys so far masked: no NaN from -inf - -inf
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe)
            v = tl.load(v_base + offs_l[:, None] * stride_vl + offs_d[None, :], mask=tile, other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        if PDL:  # every load is issued: the next kernel may be launched
            tl.extra.cuda.gdc_launch_dependents()
        out = acc / l_i  # every key masked: 0 / 0, NaN, as `F.scaled_dot_product_attention` gives
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=mask_d)

    return single_query_attention_kernel


@functools.cache
def _attention_kernel_autotuned() -> Any:
    """The attention kernel with its block of keys and warps chosen by timing, once per (heads, keys, dim_head):
    with few programs (one per row and head), how many keys each loads at once decides its latency."""
    triton, _ = _triton()

    configs = [
        triton.Config({"BLOCK_L": block_l}, num_warps=num_warps)
        for block_l, num_warps in ((32, 4), (64, 4), (64, 8), (128, 8), (256, 8), (128, 16), (256, 16))
    ]
    return triton.autotune(configs=configs, key=["heads", "keys", "dim"])(_attention_kernel())


@torch.library.custom_op(f"{OPS_NAMESPACE}::single_query_attention", mutates_args=())
def single_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention(query, key, value, attn_mask, scale=scale)` for one query per row: the Triton
    kernel on CUDA, `F.scaled_dot_product_attention` elsewhere.

    Args:
        query: `(batch, heads, 1, dim_head)`.
        key, value: `(batch, heads, keys, dim_head)`, the last dimension contiguous.
        attn_mask: broadcastable to `(batch, heads, 1, keys)`: bool (True: attend) or added to the scores.
        scale: of the scores; default `1 / sqrt(dim_head)`.

    Returns:
        `(batch, heads, 1, dim_head)`, `query`'s dtype.
    """
    if query.is_cuda:
        return launch_attention(query, key, value, attn_mask, scale)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)


def launch_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """[`single_query_attention`] by the Triton kernel (shapes there)."""
    batch, heads, _, dim = query.shape
    keys = key.shape[-2]
    out = torch.empty(batch, heads, 1, dim, dtype=query.dtype, device=query.device)
    mask_kind, mask, mask_strides = 0, key, (0, 0, 0)
    if attn_mask is not None:
        mask_kind = 1 if attn_mask.dtype == torch.bool else 2
        mask = attn_mask.expand(batch, heads, 1, keys)
        mask_strides = (mask.stride(0), mask.stride(1), mask.stride(3))
    block_d = max(16, 1 << (dim - 1).bit_length())
    if os.environ.get("TRITON_INTERPRET") == "1":  # tests on the CPU: no timing there
        kernel, config = _attention_kernel(), {"BLOCK_L": max(16, 4096 // block_d)}
    else:
        kernel, config = _attention_kernel_autotuned(), {}
    kernel[(batch * heads,)](
        query,
        key,
        value,
        mask,
        out,
        heads,
        keys,
        dim,
        scale if scale is not None else 1 / math.sqrt(dim),
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        key.stride(2),
        value.stride(0),
        value.stride(1),
        value.stride(2),
        *mask_strides,
        out.stride(0),
        out.stride(1),
        MASK=mask_kind,
        BLOCK_D=block_d,
        **config,
        **_launch_options(query.device, batch),
    )
    return out


@single_query_attention.register_fake
def _(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` (shapes `(batch, heads, seq, dim_head)`), through [`single_query_attention`]
    for one query per row inside a compiled graph on CUDA without gradients (the decoding step); eager calls and
    training keep the library's kernels."""
    if (
        ENABLED
        and query.shape[-2] == 1
        and query.dim() == 4
        and query.is_cuda
        and query.dtype in (torch.float32, torch.bfloat16, torch.float16)  # the kernel accumulates in fp32
        and dropout_p == 0.0
        and query.shape[-1] <= 256
        and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
        and not torch.is_grad_enabled()
        and is_traced()
    ):
        return single_query_attention(query, key, value, attn_mask, scale)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
