"""Kernels for PhaseGuard-KL: the monitor's top-k JS (Eq. 2) and the regulariser KL (Eq. 1).

Layout per op, as in Liger-Kernel: the Triton kernel, directly below it the autograd
Function where a gradient is needed, then the plain-PyTorch reference, then the public
function, which runs the Triton path on CUDA tensors (or under TRITON_INTERPRET=1, where
Triton runs on the CPU) and the reference elsewhere. All arithmetic is fp32 whatever the input dtype: the kernels upcast
every load before touching it (the interpreter also gets bf16 arithmetic wrong).

    reference_topk / topk_js        monitor, Eq. 2: truncated JS over the reference's top-k
    kl_div                          Eq. 1 on materialised logits: per-token KL(policy || ref)
    fused_linear_ce_kl              Eq. 1 from hidden states: CE + lambda * KL, [N, V] never whole
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional: macOS / Windows users run the references
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False

# triton.jit chooses interpreted or compiled kernels when it decorates them (import time).
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
IGNORE_INDEX = -100
LN2 = math.log(2.0)
BLOCK_V = 4096  # vocabulary columns per Triton step; 152,064 = 37 full blocks + a tail
JS_VARIANTS = ("renorm", "rest")
NUM_WARPS = 8  # warps per row program; tests/test_compile.py checks registers, spills and shared memory at it


def launch_config(V: int, k: int | None = None) -> dict:
    """The launch parameters of every kernel here for a vocabulary of V (and top-k size k for the
    monitor): BLOCK columns per step, BLOCK_K top-k lanes, num_warps. The one place they are chosen,
    so the ahead-of-time compile check (compile_check.py) compiles exactly what runs."""
    config = {"BLOCK": min(BLOCK_V, 1 << (V - 1).bit_length()), "num_warps": NUM_WARPS}
    if k is not None:
        config["BLOCK_K"] = 1 << (k - 1).bit_length()  # next power of two: tl.arange needs one
    return config


def _on_device(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def use_triton(t: Tensor) -> bool:
    """Triton on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1; else the reference
    (also for empty tensors, which need no kernel)."""
    if not HAS_TRITON or t.numel() == 0:
        return False
    return t.is_cuda or (_INTERPRETED and os.environ.get("TRITON_INTERPRET") == "1")


def _require(ok: bool, message: str) -> None:
    """Bad input -> one-line ValueError that starts with the argument's name."""
    if not ok:
        raise ValueError(message)


def _desc(t: Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def _require_finite_rows(bad_rows: Tensor, name: str) -> None:
    if bool(bad_rows.any()):
        row = int(bad_rows.nonzero()[0, 0])
        raise ValueError(f"{name}: non-finite value (inf or nan) in row {row}")

# --------------------------------------------------------------------------------------
# Steps shared by the Triton kernels below. Every kernel runs one program per row and streams
# the row in BLOCK columns with an online softmax (running max m and running sum
# s = sum exp(z - m)), so no [N, V] fp32 copy exists.
# --------------------------------------------------------------------------------------
if HAS_TRITON:
    # A kernel reads a module global only as a tl.constexpr object.
    _IGNORE_INDEX_TL = tl.constexpr(IGNORE_INDEX)

    @triton.jit
    def _count_nonfinite(z, in_row):
        # NaN fails every comparison; +-inf has |z| == inf. Lanes past the row end are ignored.
        return tl.sum((in_row & ((z != z) | (tl.abs(z) == float("inf")))).to(tl.int32))

    @triton.jit
    def _online_lse_step(m, s, z):
        # Fold one block into (running max m, s = sum exp(z - m)); also return the factor that
        # rescales other sums kept on the same max, and exp(z - m_new) for them.
        m_new = tl.maximum(m, tl.max(z, 0))
        rescale = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        return m_new, s * rescale + tl.sum(e, 0), rescale, e

    @triton.jit
    def _kl_sum_step(t, s_p, m_p, m_p_new, m_q, m_q_new, rescale_p, e_p, z, w, in_row):
        # Fold one block into t = sum_i exp(z_i - m_p) d_i, d_i = (z_i - m_p) - (w_i - m_q), with m_p, m_q
        # the running maxima. Why not z_i - w_i and lse_p - lse_q: at logits ~1e4 each fp32 lse is off by
        # ~1e-3, many times a small KL; measured from each row's max, a constant added to a row cancels
        # exactly. New maxima shift every earlier d_i by (m_p - m_p_new) - (m_q - m_q_new), weighted by
        # s_p in all; then the p weights rescale. Before the first block s_p == 0: nothing to shift
        # (and -inf - -inf would be NaN).
        moved = tl.where(s_p > 0, s_p * ((m_p - m_p_new) - (m_q - m_q_new)), 0.0)
        d = (z - m_p_new) - (w - m_q_new)
        return (t + moved) * rescale_p + tl.sum(tl.where(in_row, e_p * d, 0.0), 0)


# --------------------------------------------------------------------------------------
# 1. Monitor (Eq. 2): truncated JS between current and reference next-token distributions.
#    No autograd Function: a monitor is never differentiated.
# --------------------------------------------------------------------------------------
def reference_topk(ref_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The reference's top-k ids [N, k] int64 and their full-vocabulary log-probs [N, k] float32.

    Computed once before training (the reference never changes) and passed to topk_js."""
    _require(ref_logits.dim() == 2, f"ref_logits: expected [N, V], got {_desc(ref_logits)}")
    _require(isinstance(k, int) and 1 <= k <= ref_logits.shape[1], f"k: must be in [1, V={ref_logits.shape[1]}], got {k}")
    _require_finite_rows(~torch.isfinite(ref_logits).all(dim=1), "ref_logits")
    logprobs, ids = torch.log_softmax(ref_logits.float(), dim=-1).topk(k, dim=-1)
    return ids, logprobs


if HAS_TRITON:

    @triton.jit
    def _log_normalise(logx):
        # log x - logsumexp(log x) over one vector (padding lanes are -inf).
        mx = tl.max(logx, 0)
        return logx - (mx + tl.log(tl.sum(tl.exp(logx - mx), 0)))

    @triton.jit
    def _js_bin_terms(P, logP, Q, logQ):
        # P log(P/M) + Q log(Q/M), M = (P + Q)/2, with 0 log 0 = 0 (empty bins, padding lanes).
        logM = tl.log(0.5 * (P + Q))
        return tl.where(P > 0, P * (logP - logM), 0.0) + tl.where(Q > 0, Q * (logQ - logM), 0.0)

    @triton.jit
    def _topk_js_kernel(
        logits_ptr,        # [N, V] current logits, any float dtype, last dim contiguous
        row_stride,        # int: elements between rows of logits
        ids_ptr,           # [N, K] int64, contiguous: the reference's top-k ids
        ref_logprobs_ptr,  # [N, K] fp32, contiguous: the reference's full-vocabulary log-probs at ids
        js_ptr,            # [N] fp32 out: JS_k per row, in [0, ln 2]
        nonfinite_ptr,     # [N] int32 out: number of inf / nan logits per row
        V,                 # int: vocabulary size
        K,                 # int: top-k size
        REST_BIN: tl.constexpr,  # False: variant renorm; True: variant rest
        BLOCK: tl.constexpr,     # vocabulary columns per step (launch_config)
        BLOCK_K: tl.constexpr,   # K rounded up to a power of two (launch_config)
    ):
        # Eq. 2 for one row, S = the reference's top-k ids, log p_i = z_i - logsumexp(z) over all V:
        #   renorm: P = p|_S / p(S), Q = q|_S / q(S);  rest: P = (p|_S, 1 - p(S)), Q likewise;
        #   JS = 1/2 sum_i [P_i log(P_i / M_i) + Q_i log(Q_i / M_i)],  M = (P + Q) / 2.
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * row_stride
        # One pass over the row for its full-vocabulary log-sum-exp.
        m = float("-inf")
        s = 0.0
        n_bad = 0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            in_row = cols < V
            z = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
            n_bad += _count_nonfinite(z, in_row)
            m, s, _, _ = _online_lse_step(m, s, z)
        lse = m + tl.log(s)
        # Gather the k logits at the reference's top-k ids: log p_i = z_i - lse (full vocabulary).
        offs = tl.arange(0, BLOCK_K)
        in_k = offs < K
        ids = tl.load(ids_ptr + row * K + offs, mask=in_k, other=0)
        logp = tl.where(in_k, tl.load(row_ptr + ids, mask=in_k, other=0.0).to(tl.float32) - lse, float("-inf"))
        logq = tl.load(ref_logprobs_ptr + row * K + offs, mask=in_k, other=float("-inf")).to(tl.float32)
        if REST_BIN:
            # (b) the k bins keep their full-vocabulary mass; one more bin holds the rest.
            P = tl.exp(logp)
            Q = tl.exp(logq)
            P_rest = tl.maximum(1.0 - tl.sum(P, 0), 0.0)
            Q_rest = tl.maximum(1.0 - tl.sum(Q, 0), 0.0)
            total = tl.sum(_js_bin_terms(P, logp, Q, logq), 0)
            total += _js_bin_terms(P_rest, tl.log(P_rest), Q_rest, tl.log(Q_rest))
        else:
            # (a) both restricted to the k ids and renormalised: log P = log p - logsumexp_S(log p).
            logP = _log_normalise(logp)
            logQ = _log_normalise(logq)
            total = tl.sum(_js_bin_terms(tl.exp(logP), logP, tl.exp(logQ), logQ), 0)
        # JS is in [0, ln 2]; clamp the fp32 rounding at both ends.
        tl.store(js_ptr + row, tl.minimum(tl.maximum(0.5 * total, 0.0), 0.6931471805599453))
        tl.store(nonfinite_ptr + row, n_bad)


def _js_from_logprobs(logp: Tensor, logq: Tensor, variant: str) -> Tensor:
    """JS over the k bins (plus a rest bin for 'rest') from log p, log q on the top-k set; float64."""
    logp, logq = logp.double(), logq.double()
    if variant == "renorm":
        logp = logp - logp.logsumexp(-1, keepdim=True)
        logq = logq - logq.logsumexp(-1, keepdim=True)
    else:  # the rest of the vocabulary as one more bin
        rest_p = (1 - logp.exp().sum(-1, keepdim=True)).clamp_min(0)
        rest_q = (1 - logq.exp().sum(-1, keepdim=True)).clamp_min(0)
        logp = torch.cat([logp, rest_p.log()], -1)
        logq = torch.cat([logq, rest_q.log()], -1)
    P, Q = logp.exp(), logq.exp()
    logM = torch.log(0.5 * (P + Q))
    terms = torch.where(P > 0, P * (logp - logM), 0) + torch.where(Q > 0, Q * (logq - logM), 0)
    return (0.5 * terms.sum(-1)).clamp(0, LN2)


def topk_js_reference(logits: Tensor, ref_ids: Tensor, ref_logprobs: Tensor, variant: str = "renorm") -> Tensor:
    """Plain-PyTorch topk_js (no input checks; float64 result for float64 logits)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = logits.gather(1, ref_ids).to(dtype) - logits.to(dtype).logsumexp(-1, keepdim=True)
    return _js_from_logprobs(logp, ref_logprobs, variant).to(dtype)


def topk_js(logits: Tensor, ref_ids: Tensor, ref_logprobs: Tensor, variant: str = "renorm") -> Tensor:
    """Eq. 2's JS_k per row, natural log, in [0, ln 2]; no gradient.

    logits [N, V]: current model at the first decode position; ref_ids / ref_logprobs [N, k]
    from reference_topk. variant "renorm" (default, the paper's literal reading): both
    distributions restricted to the reference's top-k ids and renormalised; "rest": the same
    k bins with their full-vocabulary mass plus one rest-of-vocabulary bin (a lower bound of
    the full JS)."""
    _require(variant in JS_VARIANTS, f"variant: must be one of {JS_VARIANTS}, got {variant!r}")
    _require(logits.dim() == 2 and logits.is_floating_point(), f"logits: expected float [N, V], got {_desc(logits)}")
    N, V = logits.shape
    _require(ref_ids.dim() == 2 and ref_ids.shape[0] == N and ref_ids.dtype == torch.int64,
             f"ref_ids: expected int64 [N={N}, k], got {_desc(ref_ids)}")
    k = ref_ids.shape[1]
    _require(1 <= k <= V, f"ref_ids: k must be in [1, V={V}], got k={k}")
    _require(ref_logprobs.shape == ref_ids.shape and ref_logprobs.is_floating_point(),
             f"ref_logprobs: expected float {list(ref_ids.shape)}, got {_desc(ref_logprobs)}")
    _require(ref_ids.device == logits.device == ref_logprobs.device,
             f"ref_ids: device {ref_ids.device} (ref_logprobs {ref_logprobs.device}) != logits' {logits.device}")
    _require(bool(((ref_ids >= 0) & (ref_ids < V)).all()), f"ref_ids: ids must be in [0, {V})")
    _require(bool((ref_ids.sort(-1).values.diff(dim=-1) != 0).all()), "ref_ids: duplicate ids within a row")
    _require_finite_rows(~torch.isfinite(ref_logprobs).all(dim=1), "ref_logprobs")
    logits = logits.detach()  # a monitor: never part of the training graph
    if not use_triton(logits):
        _require_finite_rows(~torch.isfinite(logits).all(dim=1), "logits")
        return topk_js_reference(logits, ref_ids, ref_logprobs, variant)
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    js = torch.empty(N, dtype=torch.float32, device=logits.device)
    nonfinite = torch.empty(N, dtype=torch.int32, device=logits.device)
    with _on_device(logits):  # launch on the tensors' GPU, not the current one
        _topk_js_kernel[(N,)](logits, logits.stride(0), ref_ids.contiguous(), ref_logprobs.float().contiguous(),
                              js, nonfinite, V, k, REST_BIN=variant == "rest", **launch_config(V, k))
    _require_finite_rows(nonfinite != 0, "logits")
    return js


# --------------------------------------------------------------------------------------
# 2. Regulariser on materialised logits (Eq. 1): per-token KL(pi_policy || pi_ref).
# --------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _kl_fwd_kernel(
        p_ptr,           # [N, V] policy logits z, any float dtype, last dim contiguous
        q_ptr,           # [N, V] reference logits w, same dtype, last dim contiguous
        p_stride,        # int: elements between rows of p
        q_stride,        # int: elements between rows of q
        row_mask_ptr,    # [N] int8: 0 = skip the row (read only when HAS_MASK)
        kl_ptr,          # [N] fp32 out: KL(p || q) per row (0 for masked rows)
        m_p_ptr,         # [N] fp32 out: row max of z, for the backward
        log_s_p_ptr,     # [N] fp32 out: log sum exp(z - m_p)
        m_q_ptr,         # [N] fp32 out: row max of w
        log_s_q_ptr,     # [N] fp32 out: log sum exp(w - m_q)
        nonfinite_ptr,   # [N] int32 out: bit 0 set if z has an inf / nan, bit 1 if w has one
        V,               # int: vocabulary size
        HAS_MASK: tl.constexpr,  # whether row_mask_ptr is read
        BLOCK: tl.constexpr,     # vocabulary columns per step (launch_config)
    ):
        # With z policy and w reference logits, lse(z) = m_p + log s_p (running max, sum of exp(z - m_p)):
        #   KL(p || q) = sum_i p_i ((z_i - m_p) - (w_i - m_q)) + log(s_q / s_p),
        # the first term being t / s_p with t kept on the same running max as s_p (_kl_sum_step): the
        # whole forward is ONE pass over both rows, and no large lse is ever formed (a constant added to
        # a row changes nothing). log(s_q / s_p): one rounding at log's magnitude instead of two.
        row = tl.program_id(0).to(tl.int64)
        active = 1
        if HAS_MASK:
            active = tl.load(row_mask_ptr + row).to(tl.int32)
        m_p = float("-inf")
        s_p = 0.0
        t = 0.0
        m_q = float("-inf")
        s_q = 0.0
        bad_p = 0
        bad_q = 0
        for start in range(0, V * active, BLOCK):  # masked rows: zero iterations, never read
            cols = start + tl.arange(0, BLOCK)
            in_row = cols < V
            z = tl.load(p_ptr + row * p_stride + cols, mask=in_row, other=float("-inf")).to(tl.float32)
            w = tl.load(q_ptr + row * q_stride + cols, mask=in_row, other=float("-inf")).to(tl.float32)
            bad_p += _count_nonfinite(z, in_row)
            bad_q += _count_nonfinite(w, in_row)
            m_p_new, s_p_new, rescale, e = _online_lse_step(m_p, s_p, z)
            m_q_new, s_q, _, _ = _online_lse_step(m_q, s_q, w)
            t = _kl_sum_step(t, s_p, m_p, m_p_new, m_q, m_q_new, rescale, e, z, w, in_row)
            m_p, s_p, m_q = m_p_new, s_p_new, m_q_new
        is_active = active != 0
        log_s_p = tl.where(is_active, tl.log(s_p), 0.0)
        log_s_q = tl.where(is_active, tl.log(s_q), 0.0)
        tl.store(kl_ptr + row, tl.where(is_active, t / s_p + tl.log(s_q / s_p), 0.0))
        # The backward gets m and log s apart: m + log s would round at the logits' magnitude.
        tl.store(m_p_ptr + row, tl.where(is_active, m_p, 0.0))
        tl.store(log_s_p_ptr + row, log_s_p)
        tl.store(m_q_ptr + row, tl.where(is_active, m_q, 0.0))
        tl.store(log_s_q_ptr + row, log_s_q)
        # Flags, not counts: a count of 2 in z would read as a bad w.
        tl.store(nonfinite_ptr + row, (bad_p > 0).to(tl.int32) + 2 * (bad_q > 0).to(tl.int32))

    @triton.jit
    def _kl_bwd_kernel(
        p_ptr,         # [N, V] policy logits z, as given to _kl_fwd_kernel
        q_ptr,         # [N, V] reference logits w, as given to _kl_fwd_kernel
        p_stride,      # int: elements between rows of p
        q_stride,      # int: elements between rows of q
        grad_ptr,      # [N, V] out, p's dtype: d loss / dz
        grad_stride,   # int: elements between rows of grad
        grad_kl_ptr,   # [N] fp32: d loss / d KL per row (the incoming gradient)
        row_mask_ptr,  # [N] int8: 0 = zero gradient, row not read (read only when HAS_MASK)
        kl_ptr,        # [N] fp32: KL per row from _kl_fwd_kernel
        m_p_ptr,       # [N] fp32: row max of z from _kl_fwd_kernel
        log_s_p_ptr,   # [N] fp32: log sum exp(z - m_p)
        m_q_ptr,       # [N] fp32: row max of w
        log_s_q_ptr,   # [N] fp32: log sum exp(w - m_q)
        V,             # int: vocabulary size
        HAS_MASK: tl.constexpr,  # whether row_mask_ptr is read
        BLOCK: tl.constexpr,     # vocabulary columns per step (launch_config)
    ):
        # dKL/dz_i = p_i (log p_i - log q_i - KL): the second and last pass over the logits, with
        # log p_i = (z_i - m_p) - log s_p (never z_i - lse_p: see _kl_sum_step).
        row = tl.program_id(0).to(tl.int64)
        active = 1
        if HAS_MASK:
            active = tl.load(row_mask_ptr + row).to(tl.int32)
        scale = tl.load(grad_kl_ptr + row)
        kl = tl.load(kl_ptr + row)
        m_p = tl.load(m_p_ptr + row)
        log_s_p = tl.load(log_s_p_ptr + row)
        m_q = tl.load(m_q_ptr + row)
        log_s_q = tl.load(log_s_q_ptr + row)
        grad_row = grad_ptr + row * grad_stride
        for start in range(0, V * active, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            in_row = cols < V
            logp = (tl.load(p_ptr + row * p_stride + cols, mask=in_row, other=0.0).to(tl.float32) - m_p) - log_s_p
            logq = (tl.load(q_ptr + row * q_stride + cols, mask=in_row, other=0.0).to(tl.float32) - m_q) - log_s_q
            grad = scale * tl.exp(logp) * (logp - logq - kl)
            tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)
        for start in range(0, V * (1 - active), BLOCK):  # masked rows: write zeros, read nothing
            cols = start + tl.arange(0, BLOCK)
            tl.store(grad_row + cols, tl.zeros((BLOCK,), grad_ptr.dtype.element_ty), mask=cols < V)


class _KLDivFunction(torch.autograd.Function):
    """Forward: one pass, saves (KL, m_p, log s_p, m_q, log s_q) per row. Backward: one pass writing the gradient."""

    @staticmethod
    def forward(ctx, policy_logits, ref_logits, row_mask):
        N, V = policy_logits.shape
        dev = policy_logits.device
        kl = torch.empty(N, dtype=torch.float32, device=dev)
        stats = torch.empty(4, N, dtype=torch.float32, device=dev)  # m_p, log s_p, m_q, log s_q per row
        nonfinite = torch.empty(N, dtype=torch.int32, device=dev)
        has_mask = row_mask is not None
        mask_arg = row_mask if has_mask else kl  # never read when HAS_MASK is False
        config = launch_config(V)
        with _on_device(policy_logits):  # launch on the tensors' GPU, not the current one
            _kl_fwd_kernel[(N,)](policy_logits, ref_logits, policy_logits.stride(0), ref_logits.stride(0), mask_arg,
                                 kl, *stats, nonfinite, V, HAS_MASK=has_mask, **config)
        _require_finite_rows(nonfinite & 1 != 0, "policy_logits")
        _require_finite_rows(nonfinite & 2 != 0, "ref_logits")
        ctx.save_for_backward(policy_logits, ref_logits, mask_arg, kl, stats)
        ctx.has_mask, ctx.config = has_mask, config
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        policy_logits, ref_logits, mask_arg, kl, stats = ctx.saved_tensors
        N, V = policy_logits.shape
        grad = torch.empty_like(policy_logits)  # input dtype: no [N, V] fp32 buffer
        with _on_device(policy_logits):  # launch on the tensors' GPU, not the current one
            _kl_bwd_kernel[(N,)](policy_logits, ref_logits, policy_logits.stride(0), ref_logits.stride(0), grad,
                                 grad.stride(0), grad_kl.float().contiguous(), mask_arg, kl, *stats, V,
                                 HAS_MASK=ctx.has_mask, **ctx.config)
        return grad, None, None


def kl_div_reference(policy_logits: Tensor, ref_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Plain-PyTorch kl_div: fp32 log-softmax (float64 for float64 input) of the rows in mask."""
    if mask is not None:  # only the rows in mask are read; the others give 0 and a zero gradient
        rows = mask.nonzero().squeeze(1)
        kl_rows = kl_div_reference(policy_logits[rows], ref_logits[rows])
        return kl_rows.new_zeros(policy_logits.shape[0]).index_put((rows,), kl_rows)
    dtype = torch.float64 if policy_logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(policy_logits.to(dtype), dim=-1)
    logq = torch.log_softmax(ref_logits.detach().to(dtype), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def kl_div(policy_logits: Tensor, ref_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-token KL(softmax(policy) || softmax(ref)) over the full vocabulary, float32 [N].

    The gradient goes to policy_logits only; rows with mask False give 0, are never read,
    and get a zero gradient. Accumulates in fp32 on bf16 input without an fp32 copy."""
    _require(policy_logits.dim() == 2 and policy_logits.is_floating_point(),
             f"policy_logits: expected float [N, V], got {_desc(policy_logits)}")
    _require(ref_logits.shape == policy_logits.shape and ref_logits.dtype == policy_logits.dtype,
             f"ref_logits: expected {_desc(policy_logits)} like policy_logits, got {_desc(ref_logits)}")
    _require(ref_logits.device == policy_logits.device,
             f"ref_logits: expected device {policy_logits.device}, got {ref_logits.device}")
    _require(mask is None or (mask.shape == policy_logits.shape[:1] and mask.dtype == torch.bool),
             f"mask: expected bool [{policy_logits.shape[0]}], got {_desc(mask) if mask is not None else ''}")
    if not use_triton(policy_logits):
        for name, t in (("policy_logits", policy_logits), ("ref_logits", ref_logits)):
            bad = ~torch.isfinite(t).all(dim=1)
            _require_finite_rows(bad if mask is None else bad & mask, name)
        return kl_div_reference(policy_logits, ref_logits, mask)
    p = policy_logits if policy_logits.stride(-1) == 1 else policy_logits.contiguous()
    q = ref_logits.detach()
    q = q if q.stride(-1) == 1 else q.contiguous()
    return _KLDivFunction.apply(p, q, None if mask is None else mask.to(torch.int8))


# --------------------------------------------------------------------------------------
# 3. Fused lm_head + CE + KL (Eq. 1) in token chunks: per chunk, fp32 logits = h W^T, the
#    loss and d loss / d logits in one kernel, d loss / d h = grad_logits W. The gradient is
#    made in the forward (Liger's design), so backward only scales it by grad_output.
# --------------------------------------------------------------------------------------
class FusedLoss(NamedTuple):
    loss: Tensor    # ce_weight * sum CE + kl_weight * sum KL, differentiable w.r.t. policy_hidden
    ce_sum: float   # sum of CE over supervised tokens (detached)
    kl_sum: float   # sum of KL over KL tokens (detached)
    n_ce: int
    n_kl: int


# Working set per token and vocabulary entry. Triton: fp32 policy and reference logits + the
# gradient in the lm_head's dtype (bf16; written over the policy logits when fp32). PyTorch:
# the two fp32 logits + p + one temporary.
BYTES_PER_LOGIT = {"triton": 10, "torch": 16}


def chunk_tokens_for_budget(vocab_size: int, memory_budget_bytes: int, path: str = "triton") -> int:
    """How many tokens' [V] logits fit the budget (at least 1)."""
    return max(1, memory_budget_bytes // (vocab_size * BYTES_PER_LOGIT[path]))


if HAS_TRITON:

    @triton.jit
    def _ce_kl_chunk_kernel(
        zp_ptr,       # [C, V] fp32 policy logits of the chunk's C tokens, contiguous
        zq_ptr,       # [C, V] fp32 reference logits (read only when HAS_REF)
        grad_ptr,     # [C, V] out, the lm_head's dtype: d loss / d zp (may be zp_ptr itself)
        stride,       # int: elements between rows of zp, zq and grad
        labels_ptr,   # [C] int64: target id per row, or IGNORE_INDEX for no CE
        kl_rows_ptr,  # [C] int8: 1 = the row gets KL (read only when HAS_REF)
        ce_ptr,       # [C] fp32 out: CE per row (0 without a label)
        kl_ptr,       # [C] fp32 out: KL(p || q) per row (0 off kl_rows)
        V,            # int: vocabulary size
        ce_weight,    # fp32: weight of each row's CE in the loss
        kl_weight,    # fp32: weight of each row's KL in the loss
        HAS_REF: tl.constexpr,       # whether there is a reference (a KL term)
        COMPUTE_GRAD: tl.constexpr,  # whether to write grad (pass 2)
        BLOCK: tl.constexpr,         # vocabulary columns per step (launch_config)
    ):
        # CE = lse(z) - z_label;  KL(p || q) as in _kl_fwd_kernel;
        # One token chunk of fused_linear_ce_kl: fp32 logits in, per-row CE and KL out, and (if a
        # gradient is needed) d loss / d logits, written in the lm_head's dtype for the next GEMM
        # (over the fp32 policy logits in place when that dtype is fp32):
        #   d loss / dz = ce_weight (p - onehot(label)) + kl_weight p (log p - log q - KL).
        row = tl.program_id(0).to(tl.int64)
        zp_row = zp_ptr + row * stride
        zq_row = zq_ptr + row * stride
        grad_row = grad_ptr + row * stride
        label = tl.load(labels_ptr + row)
        has_label = label != _IGNORE_INDEX_TL
        kl_on = 0
        if HAS_REF:
            kl_on = tl.load(kl_rows_ptr + row).to(tl.int32)
        active = (has_label | (kl_on != 0)).to(tl.int32)
        m_p = float("-inf")
        s_p = 0.0
        t = 0.0
        m_q = float("-inf")
        s_q = 0.0
        for start in range(0, V * active, BLOCK):  # pass 1: online softmax of both rows
            cols = start + tl.arange(0, BLOCK)
            in_row = cols < V
            z = tl.load(zp_row + cols, mask=in_row, other=float("-inf"))
            m_p_new, s_p_new, rescale, e = _online_lse_step(m_p, s_p, z)
            if HAS_REF:  # KL as in _kl_fwd_kernel: log-ratios measured from each row's max
                w = tl.load(zq_row + cols, mask=in_row, other=float("-inf"))
                m_q_new, s_q, _, _ = _online_lse_step(m_q, s_q, w)
                t = _kl_sum_step(t, s_p, m_p, m_p_new, m_q, m_q_new, rescale, e, z, w, in_row)
                m_q = m_q_new
            m_p, s_p = m_p_new, s_p_new
        # Never lse = m + log s: it rounds at the logits' magnitude (see _kl_sum_step).
        log_s_p = tl.log(s_p)
        log_s_q = tl.log(s_q)
        safe_label = tl.where(has_label, label, 0)
        ce = tl.where(has_label, (m_p - tl.load(zp_row + safe_label, mask=has_label, other=0.0)) + log_s_p, 0.0)
        kl = tl.where(kl_on != 0, t / s_p + tl.log(s_q / s_p), 0.0)
        tl.store(ce_ptr + row, ce)
        tl.store(kl_ptr + row, kl)
        if COMPUTE_GRAD:
            ce_scale = tl.where(has_label, ce_weight, 0.0)
            kl_scale = tl.where(kl_on != 0, kl_weight, 0.0)
            for start in range(0, V * active, BLOCK):  # pass 2: gradient, in place
                cols = start + tl.arange(0, BLOCK)
                in_row = cols < V
                logp = (tl.load(zp_row + cols, mask=in_row, other=0.0) - m_p) - log_s_p
                p = tl.exp(logp)
                grad = ce_scale * (p - tl.where(cols == label, 1.0, 0.0))
                if HAS_REF:
                    logq = (tl.load(zq_row + cols, mask=in_row, other=0.0) - m_q) - log_s_q
                    grad += kl_scale * p * (logp - logq - kl)
                tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)
            for start in range(0, V * (1 - active), BLOCK):
                cols = start + tl.arange(0, BLOCK)
                tl.store(grad_row + cols, tl.zeros((BLOCK,), grad_ptr.dtype.element_ty), mask=cols < V)


def _ce_kl_chunk_triton(zp, zq, labels, kl_rows, ce_weight, kl_weight, need_grad, grad_dtype):
    C, V = zp.shape
    ce = torch.empty(C, dtype=torch.float32, device=zp.device)
    kl = torch.empty_like(ce)
    has_ref = zq is not None
    # A bf16 gradient is written directly (no fp32 gradient + cast pass); fp32 goes in place.
    grad = zp if grad_dtype == zp.dtype or not need_grad else torch.empty(C, V, dtype=grad_dtype, device=zp.device)
    with _on_device(zp):  # launch on the tensors' GPU, not the current one
        _ce_kl_chunk_kernel[(C,)](zp, zq if has_ref else zp, grad, zp.stride(0), labels,
                                  kl_rows.to(torch.int8) if has_ref else labels, ce, kl, V, float(ce_weight),
                                  float(kl_weight), HAS_REF=has_ref, COMPUTE_GRAD=need_grad,
                                  **launch_config(V))
    return ce, kl, grad if need_grad else None


class _FusedLinearCEKLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, policy_hidden, ref_hidden, weight, labels, kl_mask, ce_weight, kl_weight, chunk_tokens,
                need_grad, path):
        # Autocast would turn the fp32-output GEMMs back into bf16 ones: the dtypes here are chosen.
        with torch.autocast(policy_hidden.device.type, enabled=False):
            ce_rows, kl_rows, grad_hidden = _fused_chunks(policy_hidden, ref_hidden, weight, labels, kl_mask,
                                                          ce_weight, kl_weight, chunk_tokens, need_grad, path)
        _require_finite_rows(~torch.isfinite(ce_rows) | ~torch.isfinite(kl_rows),
                             "lm_head_weight (non-finite logits)")
        ctx.save_for_backward(grad_hidden)
        ce_sum, kl_sum = ce_rows.sum(), kl_rows.sum()
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        return ce_weight * ce_sum + kl_weight * kl_sum, ce_sum, kl_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce_sum, _grad_kl_sum):
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden * grad_loss.to(grad_hidden.dtype),) + (None,) * 9


def _fused_chunks(policy_hidden, ref_hidden, weight, labels, kl_mask, ce_weight, kl_weight, chunk_tokens,
                  need_grad, path):
    """Per-row CE and KL and (if need_grad) d loss / d policy_hidden, chunk_tokens tokens at a time."""
    N = policy_hidden.shape[0]
    with_kl = ref_hidden is not None
    active = (labels != IGNORE_INDEX) | kl_mask if with_kl else labels != IGNORE_INDEX
    rows = active.nonzero().squeeze(1)  # tokens with neither CE nor KL cost no GEMM at all
    ce_rows = torch.zeros(N, dtype=torch.float32, device=policy_hidden.device)
    kl_rows = torch.zeros_like(ce_rows)
    grad_hidden = torch.zeros_like(policy_hidden) if need_grad else None
    gemm_dtype = weight.dtype  # dtype of d loss / d logits for the second GEMM
    if path == "triton":  # the kernel writes the gradient in gemm_dtype itself
        chunk_fn = functools.partial(_ce_kl_chunk_triton, grad_dtype=gemm_dtype)
    else:  # an fp32 gradient, cast below
        chunk_fn = _ce_kl_chunk_torch
    for idx in rows.split(chunk_tokens):
        zp = _matmul_fp32(policy_hidden.index_select(0, idx), weight.t())
        zq = _matmul_fp32(ref_hidden.index_select(0, idx), weight.t()) if with_kl else None
        ce, kl, grad_logits = chunk_fn(zp, zq, labels.index_select(0, idx),
                                       kl_mask.index_select(0, idx) if with_kl else None,
                                       ce_weight, kl_weight, need_grad)
        ce_rows.index_copy_(0, idx, ce.float())
        kl_rows.index_copy_(0, idx, kl.float())
        if need_grad:  # low precision: a bf16 x bf16 GEMM with fp32 accumulation, as Liger
            grad_logits = grad_logits.to(gemm_dtype)
            grad_hidden.index_copy_(0, idx, _matmul_fp32(grad_logits, weight).to(grad_hidden.dtype))
        del zp, zq, grad_logits
    return ce_rows, kl_rows, grad_hidden


_warned_mm = False


def _matmul_fp32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b with an fp32 result and fp32 accumulation. bf16-rounded logits before the fp32 cast
    are a known source of several-percent gradient error, so low-precision GEMMs write fp32."""
    global _warned_mm
    if a.dtype in (torch.float32, torch.float64) and a.dtype == b.dtype:
        return a @ b
    if a.is_cuda and a.dtype == b.dtype:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # older torch: no out_dtype
            if not _warned_mm:
                warnings.warn("torch.mm(out_dtype=float32) unavailable: upcasting operands (slower, more memory)")
                _warned_mm = True
    return a.float() @ b.float()


def _log_softmax_(z: Tensor) -> Tensor:
    """log_softmax over the last dim, in place, as (z - max) - log sum exp(z - max). Not
    z - logsumexp(z): that logsumexp is rounded at the logits' magnitude (~1e-3 at 1e4), one error
    shared by the whole row, which swamps a small KL (log p - log q)."""
    z.sub_(z.amax(-1, keepdim=True))
    return z.sub_(z.logsumexp(-1, keepdim=True))


def _ce_kl_chunk_torch(zp, zq, labels, kl_rows, ce_weight, kl_weight, need_grad):
    """PyTorch version of _ce_kl_chunk_kernel, in place on the chunk's fp32 logits (fp32 gradient;
    the caller casts it for the GEMM)."""
    has_label = labels != IGNORE_INDEX
    safe_labels = labels.clamp_min(0).unsqueeze(1)
    logp = _log_softmax_(zp)
    ce = torch.where(has_label, -logp.gather(1, safe_labels).squeeze(1), 0)
    p = logp.exp()
    kl = torch.zeros_like(ce)
    if zq is not None:
        log_ratio = _log_softmax_(zq).neg_().add_(logp)  # log p - log q
        kl = torch.where(kl_rows, (p.unsqueeze(1) @ log_ratio.unsqueeze(2)).reshape(-1), 0)
    if not need_grad:
        return ce, kl, None
    ce_scale = (has_label * ce_weight).to(p.dtype).unsqueeze(1)
    if zq is None:
        grad = p.mul_(ce_scale)
    else:
        kl_scale = (kl_rows * kl_weight).to(p.dtype).unsqueeze(1)
        grad = log_ratio.sub_(kl.unsqueeze(1)).mul_(kl_scale).add_(ce_scale).mul_(p)
    return ce, kl, grad.scatter_add_(1, safe_labels, -ce_scale)


def _fused_linear_ce_kl(path, policy_hidden, ref_hidden, lm_head_weight, labels, kl_mask, ce_weight, kl_weight,
                        chunk_tokens, memory_budget_bytes) -> FusedLoss:
    _require(policy_hidden.dim() == 2 and policy_hidden.is_floating_point(),
             f"policy_hidden: expected float [N, H], got {_desc(policy_hidden)}")
    (N, H), dtype = policy_hidden.shape, policy_hidden.dtype
    _require(lm_head_weight.dim() == 2 and lm_head_weight.shape[1] == H and lm_head_weight.dtype == dtype,
             f"lm_head_weight: expected {str(dtype).removeprefix('torch.')} [V, H={H}], got {_desc(lm_head_weight)}")
    V = lm_head_weight.shape[0]
    _require(labels.shape == (N,) and not labels.is_floating_point() and not labels.is_complex(),
             f"labels: expected integer [{N}], got {_desc(labels)}")
    _require(labels.device == policy_hidden.device == lm_head_weight.device,
             f"labels: device {labels.device} (lm_head_weight {lm_head_weight.device}) != policy_hidden's {policy_hidden.device}")
    bad_label = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V))
    if bool(bad_label.any()):
        raise ValueError(f"labels: must be in [0, {V}) or {IGNORE_INDEX}, got {int(labels[bad_label][0])}")
    with_kl = ref_hidden is not None and kl_weight != 0
    if with_kl:
        _require(ref_hidden.shape == policy_hidden.shape and ref_hidden.dtype == dtype,
                 f"ref_hidden: expected {_desc(policy_hidden)} like policy_hidden, got {_desc(ref_hidden)}")
        # No default here: which tokens get KL is TrainConfig.kl_tokens, chosen in config.py alone.
        _require(kl_mask is not None, "kl_mask: required with ref_hidden and kl_weight != 0 (the tokens that get KL)")
        _require(kl_mask.shape == (N,) and kl_mask.dtype == torch.bool, f"kl_mask: expected bool [{N}], got {_desc(kl_mask)}")
        _require_finite_rows(~torch.isfinite(ref_hidden).all(dim=1), "ref_hidden")
    _require_finite_rows(~torch.isfinite(policy_hidden).all(dim=1), "policy_hidden")
    if chunk_tokens is None:
        _require(memory_budget_bytes > 0, f"memory_budget_bytes: must be positive, got {memory_budget_bytes}")
        chunk_tokens = chunk_tokens_for_budget(V, memory_budget_bytes, path)
    _require(isinstance(chunk_tokens, int) and chunk_tokens > 0, f"chunk_tokens: must be a positive int, got {chunk_tokens}")
    need_grad = torch.is_grad_enabled() and policy_hidden.requires_grad
    loss, ce_sum, kl_sum = _FusedLinearCEKLFunction.apply(
        policy_hidden, ref_hidden.detach() if with_kl else None, lm_head_weight.detach(), labels.long(),
        kl_mask if with_kl else None, float(ce_weight), float(kl_weight) if with_kl else 0.0, chunk_tokens,
        need_grad, path)
    n_kl = int(kl_mask.sum()) if with_kl else 0
    return FusedLoss(loss, float(ce_sum.detach()), float(kl_sum.detach()), int((labels != IGNORE_INDEX).sum()), n_kl)


def fused_linear_ce_kl_reference(policy_hidden, ref_hidden, lm_head_weight, labels, kl_mask, ce_weight, kl_weight,
                                 chunk_tokens=None, memory_budget_bytes=1 << 30) -> FusedLoss:
    """Plain-PyTorch fused_linear_ce_kl: the same token chunking, so the CPU gets the memory saving."""
    return _fused_linear_ce_kl("torch", policy_hidden, ref_hidden, lm_head_weight, labels, kl_mask, ce_weight,
                               kl_weight, chunk_tokens, memory_budget_bytes)


def fused_linear_ce_kl(policy_hidden: Tensor, ref_hidden: Tensor | None, lm_head_weight: Tensor, labels: Tensor,
                       kl_mask: Tensor | None, ce_weight: float, kl_weight: float, chunk_tokens: int | None = None,
                       memory_budget_bytes: int = 1 << 30) -> FusedLoss:
    """Eq. 1 from final hidden states: ce_weight * sum_{labels != IGNORE_INDEX} CE + kl_weight * sum_{kl_mask} KL.

    labels are already shifted (labels[i] is the target of row i). ref_hidden None or
    kl_weight == 0: CE only (kl_mask may be None); otherwise kl_mask [N] bool marks the KL tokens. lm_head_weight is
    frozen; the gradient goes to policy_hidden only. Tokens are processed chunk_tokens at a
    time (default: as many as memory_budget_bytes of logits allows), so [N, V] never exists."""
    path = "triton" if use_triton(policy_hidden) else "torch"
    return _fused_linear_ce_kl(path, policy_hidden, ref_hidden, lm_head_weight, labels, kl_mask, ce_weight,
                               kl_weight, chunk_tokens, memory_budget_bytes)
