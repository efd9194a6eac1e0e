"""Triton kernels that fuse the small operators of the sampler's step, each with its torch reference:
on a GPU a decode step of a small model is hundreds of tiny operators, each a kernel of its own
(replayed one by one from a CUDA graph too).

    step_kernels.rms_norm(x, weight, eps)                                      # model.RMSNorm
    step_kernels.rope_store(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)  # rotary + K/V store -> rotated q
    step_kernels.silu_mul(gate, up)                                            # F.silu(gate) * up
    step_kernels.sample(logits, temperature, u)                                # rollout.sample, top_p 1

model.py and rollout.py call them in inference mode (the sampler) where `fused` says so; training
and no-grad forwards keep torch's operators, whose results transformers' match bit for bit. Each
kernel rounds where torch's operators round (to the tensors' dtype after every operator): the rotary
kernel equals its reference bit for bit on a GPU; the norm and SiLU kernels differ by a sum's order
and the GPU's approximate exp and rsqrt, a rounding step or two in bf16; the sampler's float32
log-probabilities differ from torch's by a rounding or two (another summation order, the GPU's
approximate exp and division), which moves a token only where u falls that close to a CDF step.
Dispatch and fallback are paged_kernels.py's (NANOSATORI_KERNELS).
"""
import torch
import torch.nn.functional as F

import paged_kernels
from paged_kernels import tl, triton

FUSED = True      # off: the sampler runs torch's operators (bench.py gpu times both)


def fused(x, name):
    """Whether an inference-mode forward (the sampler's) runs `name` as one Triton kernel; training
    and no-grad forwards keep torch's operators, whose results transformers' match bit for bit."""
    return FUSED and torch.is_inference_mode_enabled() and paged_kernels.use_triton(x, name)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, o_ptr, stride_x, stride_o, H, eps, BLOCK: tl.constexpr):
    # One program per row: w * (x / rms(x)), normalised in fp32 and rounded to x's dtype first.
    i = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    m = c < H
    x = tl.load(x_ptr + i * stride_x + c, mask=m, other=0.0).to(tl.float32)
    y = (x * tl.rsqrt(tl.sum(x * x, 0) / H + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + i * stride_o + c, (w * y).to(o_ptr.dtype.element_ty), mask=m)


def rms_norm(x, weight, eps):
    """weight * F.rms_norm(x.float()).to(x.dtype) over the last dim of x [..., H], as model.RMSNorm."""
    if not paged_kernels.use_triton(x, "rms_norm") or x.numel() == 0:
        return rms_norm_ref(x, weight, eps)
    H = x.shape[-1]
    x2 = x.reshape(-1, H)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    out = torch.empty(x2.shape, device=x.device, dtype=torch.promote_types(weight.dtype, x.dtype))
    launch = lambda: _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, x2.stride(0), out.stride(0), H, float(eps),
                                                      BLOCK=paged_kernels._next_pow2(H), num_warps=4)
    paged_kernels.run_kernel("rms_norm", launch, lambda: out.copy_(rms_norm_ref(x2, weight, eps)))
    return out.view(x.shape)


def rms_norm_ref(x, weight, eps):
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


@triton.jit
def _rotate(x_ptr, rows, d, mask, HALF: tl.constexpr, c1, c2, s1, s2):
    """Rotate-half rotary embedding of rows [R] (their element offsets) at halves d [HALF_PAD]: x * cos +
    cat(-x2, x1) * sin, each product and the sum rounded to x's dtype as torch's operators round."""
    dt = x_ptr.dtype.element_ty
    x1 = tl.load(x_ptr + rows[:, None] + d[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + rows[:, None] + HALF + d[None, :], mask=mask, other=0.0).to(tl.float32)
    o1 = (x1 * c1[None, :]).to(dt).to(tl.float32) + (-x2 * s1[None, :]).to(dt).to(tl.float32)
    o2 = (x2 * c2[None, :]).to(dt).to(tl.float32) + (x1 * s2[None, :]).to(dt).to(tl.float32)
    return o1, o2


@triton.jit
def _rope_store_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, qo_ptr, kc_ptr, vc_ptr, slot_ptr,
                       stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_cs,
                       stride_slot, N_HEADS: tl.constexpr, N_KV: tl.constexpr, H_PAD: tl.constexpr,
                       HEAD_DIM: tl.constexpr, HALF_PAD: tl.constexpr):
    # One program per token: rotate its q heads into qo, rotate its k heads and store them and its v
    # heads into its cache slot (slot -1: q only).
    i = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HALF_PAD)
    dmask = d < HALF
    c1 = tl.load(cos_ptr + i * stride_cs + d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + i * stride_cs + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + i * stride_cs + d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + i * stride_cs + HALF + d, mask=dmask, other=0.0).to(tl.float32)
    h = tl.arange(0, H_PAD)
    qmask = (h < N_HEADS)[:, None] & dmask[None, :]
    o1, o2 = _rotate(q_ptr, i * stride_qn + h * stride_qh, d, qmask, HALF, c1, c2, s1, s2)
    qo = qo_ptr + (i * N_HEADS + h[:, None]) * HEAD_DIM + d[None, :]          # qo [N, heads, hd], contiguous
    tl.store(qo, o1.to(qo_ptr.dtype.element_ty), mask=qmask)
    tl.store(qo + HALF, o2.to(qo_ptr.dtype.element_ty), mask=qmask)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    if slot >= 0:
        kmask = (h < N_KV)[:, None] & dmask[None, :]
        o1, o2 = _rotate(k_ptr, i * stride_kn + h * stride_kh, d, kmask, HALF, c1, c2, s1, s2)
        dst = slot * stride_slot + h[:, None] * HEAD_DIM + d[None, :]         # a slot is [n_kv, hd], contiguous
        tl.store(kc_ptr + dst, o1.to(kc_ptr.dtype.element_ty), mask=kmask)
        tl.store(kc_ptr + dst + HALF, o2.to(kc_ptr.dtype.element_ty), mask=kmask)
        vrow = v_ptr + i * stride_vn + h[:, None] * stride_vh + d[None, :]
        tl.store(vc_ptr + dst, tl.load(vrow, mask=kmask).to(vc_ptr.dtype.element_ty), mask=kmask)
        tl.store(vc_ptr + dst + HALF, tl.load(vrow + HALF, mask=kmask).to(vc_ptr.dtype.element_ty), mask=kmask)


def rope_store(q, k, v, cos, sin, k_cache, v_cache, slot_mapping):
    """q [N, heads, hd], k, v [N, n_kv, hd] before the rotary embedding, cos, sin [N, hd] at their
    positions: stores the rotated k and v at slot_mapping as store_kv does -> the rotated q."""
    if not paged_kernels.use_triton(q, "rope_store") or q.shape[0] == 0 or cos.dtype != q.dtype:   # it rounds to q's dtype
        return rope_store_ref(q, k, v, cos, sin, k_cache, v_cache, slot_mapping)
    N, n_heads, hd = q.shape
    assert hd % 2 == 0 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == cos.stride(-1) == sin.stride(-1) == 1
    assert cos.stride(0) == sin.stride(0)
    qo = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    n_kv = k.shape[1]
    launch = lambda: _rope_store_kernel[(N,)](
        q, k, v, cos, sin, qo, k_cache, v_cache, slot_mapping.contiguous(), q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), k_cache.stride(1),
        N_HEADS=n_heads, N_KV=n_kv, H_PAD=paged_kernels._next_pow2(max(n_heads, n_kv)), HEAD_DIM=hd,
        HALF_PAD=paged_kernels._next_pow2(hd // 2), num_warps=4, enable_fp_fusion=False)   # no fma: rounds as torch does
    return paged_kernels.run_kernel("rope_store", lambda: (launch(), qo)[1],
                      lambda: rope_store_ref(q, k, v, cos, sin, k_cache, v_cache, slot_mapping))


def rope_store_ref(q, k, v, cos, sin, k_cache, v_cache, slot_mapping):
    from model import apply_rope    # here, not at the top: model.py imports this module
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    paged_kernels.store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    return q


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    g = tl.load(g_ptr + i, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=m, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(o_ptr.dtype.element_ty).to(tl.float32)    # SiLU, rounded as F.silu's output
    tl.store(o_ptr + i, (s * u).to(o_ptr.dtype.element_ty), mask=m)


def silu_mul(g, u):
    """F.silu(g) * u for g, u of one shape and dtype."""
    if not paged_kernels.use_triton(g, "silu_mul") or g.numel() == 0:
        return silu_mul_ref(g, u)
    g2, u2 = g.contiguous(), u.contiguous()
    out = torch.empty_like(g2)
    launch = lambda: _silu_mul_kernel[(triton.cdiv(g2.numel(), 1024),)](g2, u2, out, g2.numel(), BLOCK=1024,
                                                                       num_warps=4)
    return paged_kernels.run_kernel("silu_mul", lambda: (launch(), out)[1], lambda: silu_mul_ref(g, u))


def silu_mul_ref(g, u):
    return F.silu(g) * u


@triton.jit
def _sample_kernel(logits_ptr, temp_ptr, u_ptr, tok_ptr, lp_ptr, V, stride_l, BLOCK: tl.constexpr):
    # One program per row, three passes over its logits and no [B, V] temporaries: the log-softmax of
    # logits / T in float32 (max and sum online), the float64 sum of the probabilities, and the first
    # token where their running sum reaches u times that total.
    r = tl.program_id(0).to(tl.int64)
    row = logits_ptr + r * stride_l
    t = tl.load(temp_ptr).to(tl.float32)
    c = tl.arange(0, BLOCK)
    m = -3.0e38                                        # finite: a tile of -inf logits adds exp(-inf) = 0
    s = 0.0
    for start in range(0, V, BLOCK):
        x = tl.load(row + start + c, mask=start + c < V, other=float("-inf")).to(tl.float32) / t
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    log_s = tl.log(s)
    total = tl.zeros([1], tl.float64)                  # summed exactly as the scan below sums: it reaches total
    for start in range(0, V, BLOCK):
        x = tl.load(row + start + c, mask=start + c < V, other=float("-inf")).to(tl.float32) / t
        total += tl.max(tl.cumsum(tl.exp(x - m - log_s).to(tl.float64), 0), 0)
    target = tl.load(u_ptr + r) * total
    below = tl.zeros([1], tl.float64)                  # probability of the tokens before this tile
    tok = V - 1                                        # the first token whose CDF reaches target (always
                                                       # one: u < 1; V - 1 as rollout.sample clamps)
    for start in range(0, V, BLOCK):
        idx = start + c
        x = tl.load(row + idx, mask=idx < V, other=float("-inf")).to(tl.float32) / t
        p = tl.exp(x - m - log_s).to(tl.float64)
        cdf = below + tl.cumsum(p, 0)
        tok = tl.minimum(tok, tl.min(tl.where((idx < V) & (cdf >= target), idx, V), 0))
        below = tl.zeros([1], tl.float64) + tl.max(cdf, 0)      # the scan's end: total, at the last tile
    tl.store(tok_ptr + r, tok.to(tl.int64))
    tl.store(lp_ptr + r, tl.load(row + tok).to(tl.float32) / t - m - log_s)


def sample(logits, temperature, u):
    """rollout.sample for top_p 1 (not greedy) as one kernel: logits [B, V], temperature a [1] tensor,
    u [B] float64 -> (tokens [B] int64, log-probs [B] float32)."""
    from rollout import sample as sample_ref    # here, not at the top: rollout.py imports this module
    if logits.shape[0] == 0:
        return (torch.zeros(0, dtype=torch.long, device=logits.device),
                torch.zeros(0, dtype=torch.float32, device=logits.device))
    if not paged_kernels.use_triton(logits, "sample"):
        return sample_ref(logits, temperature, 1.0, u)
    B, V = logits.shape
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    tok = torch.empty(B, device=logits.device, dtype=torch.long)
    lp = torch.empty(B, device=logits.device, dtype=torch.float32)
    launch = lambda: _sample_kernel[(B,)](logits, temperature, u.contiguous(), tok, lp, V, logits.stride(0),
                                          BLOCK=min(4096, paged_kernels._next_pow2(V)), num_warps=8)
    return paged_kernels.run_kernel("sample", lambda: (launch(), (tok, lp))[1],
                                    lambda: sample_ref(logits, temperature, 1.0, u))
