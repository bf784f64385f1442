"""kernels.py against float64 PyTorch and scipy, on the CPU.

conftest.py sets TRITON_INTERPRET=1, so the public functions run the Triton kernels in the
interpreter; the `path` fixture also runs them with TRITON_INTERPRET=0 (the PyTorch
reference). Shapes stay small: the interpreter is slow. V = 5000 spans a full 4096-column
block plus a tail, so every kernel's loop and its masking are exercised.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon

import kernels as K

# The interpreter evaluates both branches of tl.where in numpy (log 0, 0 * inf in lanes that
# are then discarded), which numpy reports as RuntimeWarnings.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

V_TAIL = 5000  # 4096 + 904: not a multiple of the block


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    """Run the public function through the Triton kernels (interpreted) or the reference."""
    if request.param == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    else:
        assert K.use_triton(torch.zeros(1)), "Triton interpreter not active: the kernels would go untested"
    return request.param


def _pair(n, v, dtype, seed, shift=0.7):
    """Reference logits and a perturbed 'current' copy, rounded to dtype."""
    g = torch.Generator().manual_seed(seed)
    ref = 2.0 * torch.randn(n, v, generator=g)
    cur = ref + shift * torch.randn(n, v, generator=g)
    return cur.to(dtype), ref.to(dtype)


def _rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------ monitor: top-k JS (Eq. 2)
def test_reference_topk_matches_float64():
    _, ref = _pair(3, V_TAIL, torch.float32, 0)
    ids, logprobs = K.reference_topk(ref, 256)
    want_lp, want_ids = torch.log_softmax(ref.double(), -1).topk(256, -1)
    assert ids.dtype == torch.int64 and logprobs.dtype == torch.float32 and ids.shape == (3, 256)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(logprobs.double(), want_lp, atol=1e-5, rtol=0)


def _scipy_js(cur, ids, ref, variant):
    """scipy's jensenshannon(...)**2, natural log, on the same truncated distributions (float64)."""
    out = []
    for row in range(cur.shape[0]):
        p_full = torch.softmax(cur[row].double(), -1)
        q_full = torch.softmax(ref[row].double(), -1)
        P, Q = p_full[ids[row]].numpy(), q_full[ids[row]].numpy()
        if variant == "renorm":
            P, Q = P / P.sum(), Q / Q.sum()
        else:
            P, Q = np.append(P, 1 - P.sum()), np.append(Q, 1 - Q.sum())
        out.append(jensenshannon(P, Q) ** 2)  # base=None: natural log
    return torch.tensor(out)


@pytest.mark.parametrize("variant", ["renorm", "rest"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_js_matches_scipy(variant, dtype, path):
    cur, ref = _pair(4, V_TAIL, dtype, 1)
    ids, ref_logprobs = K.reference_topk(ref, 100)  # k not a power of two: padded lanes
    js = K.topk_js(cur, ids, ref_logprobs, variant)
    want = _scipy_js(cur, ids, ref, variant)
    assert js.dtype == torch.float32 and js.shape == (4,)
    assert (want > 1e-3).all()  # a real divergence, not a trivially small one
    torch.testing.assert_close(js.double(), want, atol=2e-6, rtol=2e-4)


@pytest.mark.parametrize("variant", ["renorm", "rest"])
def test_topk_js_zero_for_identical_and_symmetric(variant, path):
    a, b = _pair(3, V_TAIL, torch.float32, 2, shift=1.5)
    ids, lq_b = K.reference_topk(b, 64)
    assert K.topk_js(b, ids, lq_b, variant).abs().max() < 1e-6
    # Swap the roles on the same id set: JS(a, b) == JS(b, a).
    lp_a = torch.log_softmax(a, -1).gather(1, ids)
    torch.testing.assert_close(K.topk_js(a, ids, lq_b, variant), K.topk_js(b, ids, lp_a, variant),
                               atol=1e-6, rtol=1e-5)


def test_topk_js_variants_differ_when_mass_leaves_the_set(path):
    # The reference puts its mass on ids 0..9, the current model on ids 10..19, uniformly within
    # each. Renormalised on the reference's set both are uniform (JS = 0); with the rest bin the
    # two are disjoint (JS = ln 2, the maximum). This is why "renorm" can miss a large shift.
    ref = torch.zeros(2, 300)
    ref[:, :10] = 30.0
    cur = torch.zeros(2, 300)
    cur[:, 10:20] = 30.0
    ids, lq = K.reference_topk(ref, 10)
    renorm, rest = K.topk_js(cur, ids, lq, "renorm"), K.topk_js(cur, ids, lq, "rest")
    assert renorm.abs().max() < 1e-6
    torch.testing.assert_close(rest, torch.full((2,), math.log(2)), atol=1e-4, rtol=0)
    assert ((rest >= 0) & (rest <= math.log(2))).all()


def test_topk_js_no_grad_and_large_vocab():
    cur, ref = _pair(2, 30_000, torch.bfloat16, 3)
    ids, lq = K.reference_topk(ref, 256)
    with torch.no_grad():
        js = K.topk_js(cur, ids, lq)
    torch.testing.assert_close(js.double(), _scipy_js(cur, ids, ref, "renorm"), atol=2e-6, rtol=2e-4)


# ------------------------------------------------------------------ regulariser: kl_div (Eq. 1)
def _kl_float64(policy, ref, mask):
    """Float64 autograd reference on the same (possibly bf16-rounded) values."""
    p = policy.detach().double().requires_grad_()
    logp, logq = torch.log_softmax(p, -1), torch.log_softmax(ref.double(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1) * mask
    return kl, p


@pytest.mark.parametrize("dtype,V", [(torch.float32, V_TAIL), (torch.bfloat16, V_TAIL), (torch.float32, 20_000)])
def test_kl_div_forward_backward_against_float64(dtype, V, path):
    policy, ref = _pair(6, V, dtype, 4)
    mask = torch.tensor([True, False, True, True, False, True])
    policy[1, 7] = float("nan")  # masked rows are never read
    upstream = torch.randn(6, generator=torch.Generator().manual_seed(5))
    x = policy.clone().requires_grad_()
    kl = K.kl_div(x, ref, mask)
    (kl * upstream).sum().backward()
    want, p64 = _kl_float64(policy.nan_to_num(), ref, mask)
    (want * upstream.double()).sum().backward()
    assert kl.dtype == torch.float32 and x.grad.dtype == dtype
    torch.testing.assert_close(kl.double(), want.detach(), atol=2e-5, rtol=1e-4)
    assert _rel_err(x.grad, p64.grad) < (1e-4 if dtype == torch.float32 else 1e-2)
    assert (kl[~mask] == 0).all() and (x.grad[~mask] == 0).all()


def test_kl_div_without_mask_and_ref_gets_no_grad(path):
    policy, ref = _pair(3, V_TAIL, torch.float32, 6)
    x, r = policy.clone().requires_grad_(), ref.clone().requires_grad_()
    K.kl_div(x, r).sum().backward()
    want, p64 = _kl_float64(policy, ref, torch.ones(3))
    want.sum().backward()
    assert r.grad is None
    assert _rel_err(x.grad, p64.grad) < 1e-4


def test_kl_div_zero_for_identical(path):
    logits, _ = _pair(3, V_TAIL, torch.bfloat16, 7)
    x = logits.clone().requires_grad_()
    kl = K.kl_div(x, logits)
    kl.sum().backward()
    assert kl.abs().max() < 1e-6
    assert x.grad.float().abs().max() < 1e-7


def test_kl_div_reference_function_against_float64():
    policy, ref = _pair(4, 3000, torch.float32, 8)
    mask = torch.tensor([True, True, False, True])
    x = policy.clone().requires_grad_()
    kl = K.kl_div_reference(x, ref, mask)
    kl.sum().backward()
    want, p64 = _kl_float64(policy, ref, mask)
    want.sum().backward()
    torch.testing.assert_close(kl.double(), want.detach(), atol=1e-5, rtol=1e-4)
    assert _rel_err(x.grad, p64.grad) < 1e-4


# A constant added to a row changes no probability, so KL must not move. fp32 holds 1e4 only to
# ~1e-3, so a formula that subtracts two ~1e4 log-sum-exps (lse_p - lse_q) to reach a KL of 5e-5 is
# off by many times the KL: before the fix, Triton kl_div's KL was off by 1.0x at offset 1e3 and 21x
# at 1e4, the fused op's by 0.22x / 11x (Triton) and 0.22x / 5.7x (PyTorch). BLOCK_V = 256 splits
# V = 1500 into 5 blocks + a 220-column tail, so the online rescaling across blocks is exercised.
OFFSETS = [0.0, 30.0, 1e3, 1e4]
SMALL_BLOCK = 256
SHIFT_KL_RTOL = 2e-2     # of a KL of ~5e-5 (per row, or the sum): fp32's floor there is ~1e-2
SHIFT_GRAD_RTOL = 2e-4   # _rel_err of the gradient


def _shifted_pair(offset, n=5, v=1500, seed=17):
    """Reference logits and a copy perturbed by ~1e-2 (KL ~ 5e-5), both + offset, in fp32. Values
    are multiples of 2^-10 below 2^14 in magnitude, so fp32 holds them exactly at every offset:
    each offset sees the same distributions, and only the offset differs."""
    g = torch.Generator().manual_seed(seed)
    grid = lambda x: (x * 1024).round() / 1024  # noqa: E731
    ref = grid(2.0 * torch.randn(n, v, generator=g, dtype=torch.float64))
    cur = ref + grid(1e-2 * torch.randn(n, v, generator=g, dtype=torch.float64))
    order = ref[0].argsort()  # row 0 ascending: both running maxima move in every block
    ref[0], cur[0] = ref[0, order], cur[0, order]
    cur, ref = cur + offset, ref + offset
    assert torch.equal(cur.float().double(), cur) and torch.equal(ref.float().double(), ref)
    return cur.float(), ref.float()


@pytest.mark.parametrize("offset", OFFSETS)
def test_kl_div_invariant_to_a_large_logit_offset(offset, path, monkeypatch):
    monkeypatch.setattr(K, "BLOCK_V", SMALL_BLOCK)
    policy, ref = _shifted_pair(offset)
    upstream = torch.tensor([1.0, -0.5, 2.0, 0.3, 1.5])
    x = policy.clone().requires_grad_()
    kl = K.kl_div(x, ref)
    (kl * upstream).sum().backward()
    want, p64 = _kl_float64(policy, ref, torch.ones(5))  # float64 on the same fp32 values
    (want * upstream.double()).sum().backward()
    want = want.detach()
    assert ((want > 2e-5) & (want < 1e-4)).all(), want  # a regulariser's small KL
    kl_err, grad_err = ((kl.double() - want).abs() / want).max().item(), _rel_err(x.grad, p64.grad)
    assert kl_err < SHIFT_KL_RTOL and grad_err < SHIFT_GRAD_RTOL, f"KL {kl_err:.2e}, gradient {grad_err:.2e}"


# ------------------------------------------------------------------ fused lm_head + CE + KL (Eq. 1)
def _fused_inputs(N, H, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(V, H, generator=g) / math.sqrt(H) * 3).to(dtype)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    ref_hidden = (hidden.float() + 0.3 * torch.randn(N, H, generator=g)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[torch.rand(N, generator=g) < 0.3] = -100
    kl_mask = torch.rand(N, generator=g) < 0.7
    return hidden, ref_hidden, weight, labels, kl_mask


def _fused_float64(hidden, ref_hidden, weight, labels, kl_mask, ce_weight, kl_weight):
    h = hidden.detach().double().requires_grad_()
    W = weight.double()
    logits = h @ W.T
    ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    loss = ce_weight * ce
    kl = torch.zeros((), dtype=torch.float64)
    if ref_hidden is not None:
        logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(ref_hidden.double() @ W.T, -1)
        kl = ((logp.exp() * (logp - logq)).sum(-1) * kl_mask).sum()
        loss = loss + kl_weight * kl
    loss.backward()
    return loss.detach(), ce.detach(), kl.detach(), h.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_ce_kl_against_float64(dtype, path):
    hidden, ref_hidden, weight, labels, kl_mask = _fused_inputs(37, 48, V_TAIL, dtype, 9)
    ce_w, kl_w = 1 / 29, 0.1 / 23
    h = hidden.clone().requires_grad_()
    out = K.fused_linear_ce_kl(h, ref_hidden, weight, labels, kl_mask, ce_w, kl_w, chunk_tokens=8)
    out.loss.backward()
    loss, ce, kl, grad = _fused_float64(hidden, ref_hidden, weight, labels, kl_mask, ce_w, kl_w)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.loss.double(), loss, **tol)
    assert out.ce_sum == pytest.approx(ce.item(), rel=1e-5)
    assert out.kl_sum == pytest.approx(kl.item(), rel=1e-4, abs=1e-6)
    assert (out.n_ce, out.n_kl) == (int((labels != -100).sum()), int(kl_mask.sum()))
    assert h.grad.dtype == dtype
    assert _rel_err(h.grad, grad) < (1e-5 if dtype == torch.float32 else 2e-2)
    assert (h.grad[(labels == -100) & ~kl_mask] == 0).all()


def test_fused_linear_ce_only(path):
    hidden, ref_hidden, weight, labels, _ = _fused_inputs(20, 32, 3000, torch.float32, 10)
    _, ce, _, grad = _fused_float64(hidden, None, weight, labels, None, 0.5, 0.0)
    for ref_h, kl_w in ((None, 0.3), (ref_hidden, 0.0)):
        h = hidden.clone().requires_grad_()
        out = K.fused_linear_ce_kl(h, ref_h, weight, labels, None, 0.5, kl_w)
        out.loss.backward()
        assert out.n_kl == 0 and out.kl_sum == 0.0
        assert out.ce_sum == pytest.approx(ce.item(), rel=1e-5)
        assert _rel_err(h.grad, grad) < 1e-5


def test_fused_gradient_accumulation_is_exact(path):
    # Two micro-batches with the effective batch's weights == one batch (the training loop's use).
    hidden, ref_hidden, weight, labels, kl_mask = _fused_inputs(24, 32, 3000, torch.float32, 11)
    ce_w, kl_w = 1 / int((labels != -100).sum()), 0.03 / int(kl_mask.sum())
    h_whole = hidden.clone().requires_grad_()
    whole = K.fused_linear_ce_kl(h_whole, ref_hidden, weight, labels, kl_mask, ce_w, kl_w)
    whole.loss.backward()
    h_split = hidden.clone().requires_grad_()
    total = 0.0
    for part in (slice(0, 10), slice(10, 24)):
        out = K.fused_linear_ce_kl(h_split[part], ref_hidden[part], weight, labels[part], kl_mask[part], ce_w, kl_w)
        out.loss.backward()
        total += out.loss.item()
    assert total == pytest.approx(whole.loss.item(), rel=1e-6)
    torch.testing.assert_close(h_split.grad, h_whole.grad, atol=1e-7, rtol=1e-5)


def test_fused_forward_only_and_budget_chunking(path):
    hidden, ref_hidden, weight, labels, kl_mask = _fused_inputs(30, 32, 3000, torch.float32, 12)
    with torch.no_grad():
        a = K.fused_linear_ce_kl(hidden, ref_hidden, weight, labels, kl_mask, 1.0, 1.0, chunk_tokens=30)
    # A budget that fits 4 tokens of logits at a time gives the same numbers.
    budget = 4 * 3000 * K.BYTES_PER_LOGIT[path]
    assert K.chunk_tokens_for_budget(3000, budget, path) == 4
    b = K.fused_linear_ce_kl(hidden, ref_hidden, weight, labels, kl_mask, 1.0, 1.0, memory_budget_bytes=budget)
    assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-6)
    assert K.chunk_tokens_for_budget(152_064, 1 << 30, "triton") == 706


def test_fused_ignores_autocast(path):
    # Under autocast the GEMMs would silently become bf16-output ones; the op pins its own dtypes.
    hidden, ref_hidden, weight, labels, kl_mask = _fused_inputs(12, 32, 3000, torch.float32, 16)
    plain = K.fused_linear_ce_kl(hidden, ref_hidden, weight, labels, kl_mask, 1.0, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = K.fused_linear_ce_kl(hidden, ref_hidden, weight, labels, kl_mask, 1.0, 1.0)
    assert cast.loss.dtype == torch.float32 and cast.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)


def _offset_fused_inputs(offset, n=7, H=16, V=1500, seed=18):
    """Hidden unit 0 carries the offset and its lm_head column is all ones, so every logit of a row
    gets + offset. Values are multiples of 1/64 and 1/16 (products of 1/1024): every fp32 partial
    sum below 2^14 is exact, so the logits the op computes are exactly the float64 ones."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randint(-16, 17, (V, H), generator=g) / 16
    weight[:, 0] = 1.0
    hidden = torch.randint(-64, 65, (n, H), generator=g) / 64
    hidden[:, 0] = offset
    ref_hidden = hidden.clone()  # the reference differs by +-1/64 in one unit: KL ~ 5e-5
    unit, sign = torch.randint(1, H, (n,), generator=g), torch.randint(0, 2, (n,), generator=g) * 2 - 1
    ref_hidden[torch.arange(n), unit] += sign / 64
    labels = torch.randint(0, V, (n,), generator=g)
    labels[3] = -100
    kl_mask = torch.tensor([True, True, False, True, True, True, True])
    return hidden, ref_hidden, weight, labels, kl_mask


@pytest.mark.parametrize("offset", OFFSETS)
def test_fused_kl_invariant_to_a_large_logit_offset(offset, path, monkeypatch):
    monkeypatch.setattr(K, "BLOCK_V", SMALL_BLOCK)
    hidden, ref_hidden, weight, labels, kl_mask = _offset_fused_inputs(offset)
    assert torch.equal((hidden @ weight.T).double(), hidden.double() @ weight.double().T)  # exact logits
    h = hidden.clone().requires_grad_()
    # ce_weight 0: the gradient is the KL's alone (CE's is 100x larger and would hide its error).
    out = K.fused_linear_ce_kl(h, ref_hidden, weight, labels, kl_mask, 0.0, 1.0, chunk_tokens=3)
    out.loss.backward()
    _, ce, kl, grad = _fused_float64(hidden, ref_hidden, weight, labels, kl_mask, 0.0, 1.0)
    assert 2e-5 < kl.item() / out.n_kl < 1e-4, kl.item() / out.n_kl
    kl_err, grad_err = abs(out.kl_sum - kl.item()) / kl.item(), _rel_err(h.grad, grad)
    ce_err = abs(out.ce_sum - ce.item()) / ce.item()
    assert kl_err < SHIFT_KL_RTOL and grad_err < SHIFT_GRAD_RTOL and ce_err < 1e-7, \
        f"KL {kl_err:.2e}, gradient {grad_err:.2e}, CE {ce_err:.2e}"


@pytest.mark.parametrize("upstream", [2.7, -1.3])
def test_fused_backward_scales_by_the_upstream_gradient(upstream, path):
    # The gradient is made in the forward; backward must multiply it by d(outer loss)/d(loss).
    hidden, ref_hidden, weight, labels, kl_mask = _fused_inputs(20, 32, 3000, torch.float32, 19)
    ce_w, kl_w = 1 / 13, 0.5 / 11
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = K.fused_linear_ce_kl(h, ref_hidden, w, labels, kl_mask, ce_w, kl_w, chunk_tokens=6)
    (upstream * out.loss).backward()
    loss, _, _, grad = _fused_float64(hidden, ref_hidden, weight, labels, kl_mask, ce_w, kl_w)
    assert out.loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert _rel_err(h.grad, upstream * grad) < 1e-5
    assert w.grad is None  # the lm_head is frozen: no gradient, rather than a wrong one


# ------------------------------------------------------------------ bad input -> one-line ValueError
def _bad_calls():
    cur, ref = _pair(2, 50, torch.float32, 13)
    ids, lq = K.reference_topk(ref, 5)
    nan_logits = cur.clone()
    nan_logits[1, 3] = float("nan")
    inf_logits = cur.clone()
    inf_logits[0, 0] = float("inf")
    two_nan_logits = nan_logits.clone()  # an even count must still name the policy, not the reference
    two_nan_logits[1, 4] = float("nan")
    hidden, ref_hidden, weight, labels, kl_mask = _fused_inputs(6, 8, 50, torch.float32, 14)
    nan_hidden = hidden.clone()
    nan_hidden[2, 1] = float("nan")
    fused = lambda **kw: K.fused_linear_ce_kl(**{**dict(policy_hidden=hidden, ref_hidden=ref_hidden,  # noqa: E731
                                                        lm_head_weight=weight, labels=labels, kl_mask=kl_mask,
                                                        ce_weight=1.0, kl_weight=1.0), **kw})
    return {
        "k_gt_vocab": ("k", lambda: K.reference_topk(ref, 51)),
        "ids_k_gt_vocab": ("ref_ids", lambda: K.topk_js(cur, torch.arange(51).repeat(2, 1), torch.zeros(2, 51))),
        "ids_rows": ("ref_ids", lambda: K.topk_js(cur, ids[:1], lq[:1])),
        "ids_dtype": ("ref_ids", lambda: K.topk_js(cur, ids.float(), lq)),
        "ids_range": ("ref_ids", lambda: K.topk_js(cur, ids + 50, lq)),
        "ids_duplicate": ("ref_ids", lambda: K.topk_js(cur, ids[:, [0, 0, 1, 2, 3]], lq)),
        "logprobs_shape": ("ref_logprobs", lambda: K.topk_js(cur, ids, lq[:, :4])),
        "variant": ("variant", lambda: K.topk_js(cur, ids, lq, "full")),
        "js_nan": ("logits", lambda: K.topk_js(nan_logits, ids, lq)),
        "js_inf": ("logits", lambda: K.topk_js(inf_logits, ids, lq)),
        "kl_shape": ("ref_logits", lambda: K.kl_div(cur, ref[:, :40])),
        "kl_dtype": ("ref_logits", lambda: K.kl_div(cur, ref.double())),
        "kl_mask_dtype": ("mask", lambda: K.kl_div(cur, ref, torch.ones(2))),
        "kl_nan_policy": ("policy_logits", lambda: K.kl_div(nan_logits, ref)),
        "kl_two_nan_policy": ("policy_logits", lambda: K.kl_div(two_nan_logits, ref)),
        "kl_inf_ref": ("ref_logits", lambda: K.kl_div(cur, inf_logits)),
        "fused_weight_shape": ("lm_head_weight", lambda: fused(lm_head_weight=weight[:, :7])),
        "fused_weight_dtype": ("lm_head_weight", lambda: fused(lm_head_weight=weight.double())),
        "fused_ref_shape": ("ref_hidden", lambda: fused(ref_hidden=ref_hidden[:5])),
        "fused_labels_range": ("labels", lambda: fused(labels=labels.clamp_min(0) + 50)),
        "fused_labels_dtype": ("labels", lambda: fused(labels=labels.float())),
        "fused_kl_mask_dtype": ("kl_mask", lambda: fused(kl_mask=kl_mask.long())),
        "fused_kl_mask_missing": ("kl_mask", lambda: fused(kl_mask=None)),
        "fused_nan_hidden": ("policy_hidden", lambda: fused(policy_hidden=nan_hidden)),
        "fused_chunk": ("chunk_tokens", lambda: fused(chunk_tokens=0)),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_input_raises_one_line_value_error(case, path):
    name, call = _bad_calls()[case]
    with pytest.raises(ValueError) as err:
        call()
    message = str(err.value)
    assert message.startswith(name + ":") and "\n" not in message, message


def test_masked_rows_with_non_finite_values_are_accepted(path):
    cur, ref = _pair(2, 50, torch.float32, 15)
    cur[1, 0] = float("inf")
    kl = K.kl_div(cur, ref, torch.tensor([True, False]))
    assert torch.isfinite(kl).all() and kl[1] == 0


# Compiled (GPU) mode without a GPU: every kernel compiled for sm_80 / sm_90 / sm_100 and its resources
# checked, in tests/test_compile.py.
