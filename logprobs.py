"""The fused linear -> log-prob of the trainer: log softmax(hidden @ weight.T / T)[target] (and the
entropy) without the [N, V] logits, a Triton kernel with a plain-torch reference.

    logprobs.token_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False)
    logprobs.token_logprobs_ref(...)                 # the same in plain torch: what the tests compare against

Which one runs is paged_kernels.py's dispatch (NANOSATORI_KERNELS, TRITON_INTERPRET=1 for CPU).
"""
import torch

import paged_kernels
from paged_kernels import dot_mode, mma, num_sms, tl, triton

# Forward (Triton): grid (row tiles, vocab splits). Each program streams its vocabulary slice in
# [BM, BV] logit tiles (a K-loop over the hidden size) and keeps, per row, an online max m, sum of
# exp s = sum exp(z - m), t = sum exp(z - m) * (z - m) for the entropy, and the target's logit;
# torch merges the splits: lse = M + log S, entropy = log S - T / S (relative to the merged max M,
# so no large logits cancel). Memory: O(N * splits).
# Backward: for chunks of tokens, dz = d loss / d logits is recomputed tile by tile from the saved
# lse (Triton, or torch on CPU) into a [chunk, V] buffer, then two matmuls give the chunk's grad of
# hidden (dz @ W) and add its grad of weight (dz.T @ h). With z = logits / T, p = softmax(z):
#   d logp_target / dz = onehot(target) - p,     d entropy / dz = -p * (log p + entropy).

@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w,
                 BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr):
    """hidden[rows] @ weight[cols].T as a [BM, BV] fp32 tile; rows/cols are int64."""
    acc = tl.zeros([BM, BV], tl.float32)
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < H
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)             # [BM, BK]
        b = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None],
                    mask=cmask[None, :] & kmask[:, None], other=0.0)             # [BK, BV]
        acc = mma(a, b, acc, DOT)
    return acc


@triton.jit
def _logprob_fwd_kernel(h_ptr, w_ptr, tgt_ptr, m_ptr, s_ptr, t_ptr, zt_ptr, N, V, H, split_len,
                        inv_temp, stride_h, stride_w,
                        BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr):
    pid_m, pid_s = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM).to(tl.int64)
    rmask = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-1)
    v_lo = pid_s * split_len
    v_hi = tl.minimum(v_lo + split_len, V)
    # m starts finite so that s * (m - m_new) below is 0, not 0 * -inf, on the first tile.
    m = tl.full([BM], -1e30, tl.float32)
    s = tl.zeros([BM], tl.float32)
    t = tl.zeros([BM], tl.float32)
    zt = tl.zeros([BM], tl.float32)
    for v0 in range(v_lo, v_hi, BV):
        cols = v0 + tl.arange(0, BV).to(tl.int64)
        cmask = cols < v_hi
        z = _logits_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w,
                         BM, BV, BK, DOT) * inv_temp
        z = tl.where(cmask[None, :], z, float("-inf"))                           # [BM, BV]
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])                                          # 0 where masked
        dz = tl.where(cmask[None, :], z - m_new[:, None], 0.0)
        # exp(z - m_new) * (z - m_new) = alpha * exp(z - m) * ((z - m) + (m - m_new))
        t = alpha * (t + s * (m - m_new)) + tl.sum(p * dz, 1)
        s = s * alpha + tl.sum(p, 1)
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), 1)
        m = m_new
    out = rows * tl.num_programs(1) + pid_s                                      # partials [N, S]
    tl.store(m_ptr + out, m, mask=rmask)
    tl.store(s_ptr + out, s, mask=rmask)
    tl.store(t_ptr + out, t, mask=rmask)
    tl.store(zt_ptr + out, zt, mask=rmask)


@triton.jit
def _logprob_dz_kernel(h_ptr, w_ptr, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dz_ptr, N, V, H,
                       inv_temp, stride_h, stride_w, stride_dz, HAS_GENT: tl.constexpr,
                       BM: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr):
    # Grid (row tiles, vocab tiles) over one chunk of tokens: dz [chunk, V] = d loss / d logits.
    pid_m, pid_v = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM).to(tl.int64)
    cols = pid_v * BV + tl.arange(0, BV).to(tl.int64)
    rmask, cmask = rows < N, cols < V
    z = _logits_tile(h_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_h, stride_w,
                     BM, BV, BK, DOT) * inv_temp
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-1)
    glp = tl.load(glp_ptr + rows, mask=rmask, other=0.0)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    dz = tl.where(cols[None, :] == tgt[:, None], glp[:, None], 0.0) - glp[:, None] * p
    if HAS_GENT:
        ent = tl.load(ent_ptr + rows, mask=rmask, other=0.0)
        gent = tl.load(gent_ptr + rows, mask=rmask, other=0.0)
        dz -= gent[:, None] * p * (logp + ent[:, None])
    tl.store(dz_ptr + rows[:, None] * stride_dz + cols[None, :], dz * inv_temp,
             mask=rmask[:, None] & cmask[None, :])


def _lp_blocks(x):
    # BM, BV, BK. On sm_90 a 64 x 128 fp32 tile with 8 warps compiles without register spills.
    return (64, 128, 64) if x.is_cuda else (16, 64, 32)       # small tiles for the interpreter


def _lp_forward_triton(hidden, weight, targets, inv_temp):
    N, H = hidden.shape
    V = weight.shape[0]
    BM, BV, BK = _lp_blocks(hidden)
    row_tiles, v_tiles = triton.cdiv(N, BM), triton.cdiv(V, BV)
    # Split the vocabulary when there are few row tiles (the sampler's batch): fill the GPU.
    splits = min(v_tiles, triton.cdiv(2 * num_sms(hidden.device), row_tiles))
    split_len = triton.cdiv(v_tiles, splits) * BV
    splits = triton.cdiv(V, split_len)
    m, s, t, zt = (torch.empty(N, splits, device=hidden.device, dtype=torch.float32) for _ in range(4))
    _logprob_fwd_kernel[(row_tiles, splits)](hidden, weight, targets, m, s, t, zt, N, V, H, split_len,
                                             inv_temp, hidden.stride(0), weight.stride(0),
                                             BM=BM, BV=BV, BK=BK, DOT=dot_mode(hidden), num_warps=8)
    M = m.amax(1, keepdim=True)
    w = torch.exp(m - M)
    S = (s * w).sum(1)
    T = (w * (t + s * (m - M))).sum(1)
    lse = M[:, 0] + torch.log(S)
    return zt.sum(1) - lse, torch.log(S) - T / S, lse


def _lp_dz_triton(h, weight, targets, lse, ent, glp, gent, inv_temp):
    N, H = h.shape
    V = weight.shape[0]
    BM, BV, BK = _lp_blocks(h)
    dz = torch.empty(N, V, device=h.device, dtype=h.dtype)
    _logprob_dz_kernel[(triton.cdiv(N, BM), triton.cdiv(V, BV))](
        h, weight, targets, lse, ent, glp, gent if gent is not None else glp, dz, N, V, H, inv_temp,
        h.stride(0), weight.stride(0), dz.stride(0), HAS_GENT=gent is not None,
        BM=BM, BV=BV, BK=BK, DOT=dot_mode(h), num_warps=8)
    return dz


def _lp_forward_torch(hidden, weight, targets, inv_temp):
    # Chunks of tokens: at most ~2 [chunk, V] fp32 buffers live at a time.
    w = weight.float()
    logp_t, ent, lse_all = (torch.empty(hidden.shape[0], device=hidden.device) for _ in range(3))
    for sl in _chunks(hidden, weight.shape[0], 4):
        z = (hidden[sl].float() @ w.T).mul_(inv_temp)                           # [c, V]
        lse = torch.logsumexp(z, -1)
        logp = z.sub_(lse[:, None])                                            # log-softmax, in place
        logp_t[sl] = logp.gather(1, targets[sl, None])[:, 0]
        ent[sl] = -(logp.exp().mul_(logp)).sum(-1)
        lse_all[sl] = lse
    return logp_t, ent, lse_all


def _lp_dz_torch(h, weight, targets, lse, ent, glp, gent, inv_temp):
    logp = (h.float() @ weight.float().T).mul_(inv_temp).sub_(lse[:, None])    # [c, V]
    p = logp.exp()
    dz = p * -glp[:, None]
    if gent is not None:
        dz -= logp.add_(ent[:, None]).mul_(p).mul_(gent[:, None])              # p * (log p + H) * g
    dz[torch.arange(h.shape[0], device=h.device), targets] += glp
    return dz.mul_(inv_temp)


LOGPROB_CHUNK_BYTES = 64 << 20   # size of one [chunk, V] buffer on CPU; 16x that on GPU


def _chunks(hidden, V, elem_bytes):
    # Token chunks whose [chunk, V] buffers stay ~64 MB on CPU (~1 GB on GPU).
    budget = LOGPROB_CHUNK_BYTES * (16 if hidden.is_cuda else 1)
    c = max(1, budget // (V * elem_bytes))
    return [slice(i, min(i + c, hidden.shape[0])) for i in range(0, hidden.shape[0], c)]


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp, use_triton):
        torch_fwd = lambda: _lp_forward_torch(hidden, weight, targets, inv_temp)
        triton_fwd = lambda: _lp_forward_triton(hidden, weight, targets, inv_temp)
        fwd = (lambda: paged_kernels.run_kernel("token_logprobs", triton_fwd, torch_fwd)) if use_triton else torch_fwd
        logp, ent, lse = fwd()
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.inv_temp, ctx.use_triton = inv_temp, use_triton
        ctx.set_materialize_grads(False)               # unused entropy -> g_ent None -> cheaper dz
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()
        g_ent = None if g_ent is None else g_ent.float().contiguous()
        def dz_fn(*a):
            if not ctx.use_triton:
                return _lp_dz_torch(*a)
            return paged_kernels.run_kernel("token_logprobs_backward", lambda: _lp_dz_triton(*a), lambda: _lp_dz_torch(*a))
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        for sl in _chunks(hidden, weight.shape[0], hidden.element_size()):
            h = hidden[sl]
            dz = dz_fn(h, weight, targets[sl], lse[sl], ent[sl], g_lp[sl],
                       None if g_ent is None else g_ent[sl], ctx.inv_temp).to(hidden.dtype)
            if need_h:
                gh[sl] = dz @ weight
            if need_w and gw.dtype == h.dtype:
                gw.addmm_(dz.T, h)
            elif need_w:                                # bf16 matmul, fp32 accumulation over chunks
                gw += (dz.T @ h).float()
        return gh, None if gw is None else gw.to(weight.dtype), None, None, None


def token_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False):
    """log softmax(hidden @ weight.T / temperature)[targets] without materialising the logits.
    hidden [N, H] (or [..., H]), weight [V, H], targets [N] (or [...]) int64 in [0, V) -> logprobs
    fp32 [N]; with return_entropy, also the entropy of each row's distribution, fp32 [N]. Both are
    differentiable w.r.t. hidden and weight (hidden is cast to weight's dtype). Under autocast both
    are cast to its dtype: the head runs in bf16 on tensor cores, the log-softmax accumulates in fp32."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dt), weight.to(dt)
    use = paged_kernels.use_triton(hidden, "token_logprobs") and targets.numel() > 0     # no rows: nothing to launch
    return _token_logprobs(hidden, weight, targets, temperature, return_entropy, use)


def token_logprobs_ref(hidden, weight, targets, temperature=1.0, return_entropy=False):
    """The chunked torch path of token_logprobs (what runs off CUDA), whatever the dispatch says."""
    return _token_logprobs(hidden, weight, targets, temperature, return_entropy, False)


def _token_logprobs(hidden, weight, targets, temperature, return_entropy, use_triton):
    assert temperature > 0, "temperature 0 (greedy) has no log-probs: use 1.0"
    lead = targets.shape
    hidden = hidden.to(weight.dtype).reshape(-1, hidden.shape[-1])
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    targets = targets.reshape(-1).long().contiguous()
    logp, ent = _TokenLogprobs.apply(hidden, weight, targets, 1.0 / temperature, use_triton)
    logp, ent = logp.view(lead), ent.view(lead)
    return (logp, ent) if return_entropy else logp
