"""Triton kernels of the sampler (the paged KV cache and attention over it), each with a plain-torch
reference, and the dispatch every kernel shares (NANOSATORI_KERNELS, the fallback on compile errors).

    paged_kernels.store_kv(k, v, k_cache, v_cache, slot_mapping)                # write new K/V into paged slots
    paged_kernels.decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    paged_kernels.prefill_attention(q, k_cache, v_cache, block_tables, q_start, q_lens, context_lens, scale)

The fused linear -> log-prob kernel of the trainer is in logprobs.py, and the sampler step's fused
small operators in step_kernels.py, on the dispatch set up here.

Paged cache layout, per layer: k_cache, v_cache [num_blocks, block_size, n_kv_heads, head_dim]; the
slot of a token is block_id * block_size + offset; a sequence's block table lists its block ids.

Not named kernels.py: `kernels` is a PyPI package that transformers imports, and a module of ours
first on the path would shadow it (bench.py and the tests import transformers beside this module).

Dispatch, by the environment variable NANOSATORI_KERNELS (read at import):
  auto (default)  the Triton kernel where it can run: on CUDA tensors, or on any tensor when
                  TRITON_INTERPRET=1 was set before this module was imported (Triton reads it when
                  the kernels are decorated; that is how CI runs them on CPU). A kernel that fails to
                  compile on its first launch falls back to its torch reference, with one warning.
  triton          the same, but a kernel that fails to compile is an error (the tests run so);
  torch           the `*_ref` torch references everywhere (same signatures; what the tests compare
                  the kernels against).
fp32 operands go through TF32 tensor cores when torch.backends.cuda.matmul.allow_tf32 is on (the
trainer turns it on for CUDA), IEEE fp32 otherwise; bf16/fp16 operands always use tensor cores.
"""
import os
import warnings

import torch
import torch.nn.functional as F

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNELS = os.environ.get("NANOSATORI_KERNELS", "auto")
if KERNELS not in ("auto", "triton", "torch"):
    raise ValueError(f"NANOSATORI_KERNELS={KERNELS!r}: expected auto, triton or torch")
try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # a CPU-only install: the kernels below are defined but never launched
    HAS_TRITON = False

    class _NoTriton:
        constexpr = None

        @staticmethod
        def jit(fn):
            return fn
    triton = tl = _NoTriton()

_failed = set()        # kernels that failed to compile (auto): their torch reference runs instead
_ran = set()           # kernels that ran once: a later error propagates


def _compile_errors():
    """What Triton raises when it cannot build a kernel for this GPU; anything else is a bug."""
    if not HAS_TRITON:
        return ()
    import triton.compiler.errors as ce
    import triton.runtime.errors as re_
    found = (getattr(ce, "CompilationError", None), getattr(re_, "OutOfResources", None), getattr(re_, "PTXASError", None))
    return tuple(e for e in found if e is not None)


_COMPILE_ERRORS = _compile_errors()

def use_triton(t, name=""):
    return KERNELS != "torch" and HAS_TRITON and (t.is_cuda or INTERPRET) and name not in _failed


def run_kernel(name, launch, fallback):
    """Run a Triton launch; under NANOSATORI_KERNELS=auto, a first launch that fails to compile is
    reported once and the torch reference runs from then on."""
    if name in _ran or KERNELS == "triton":
        return launch()
    try:
        out = launch()
    except _COMPILE_ERRORS as e:
        _failed.add(name)
        warnings.warn(f"kernels: the Triton {name} kernel failed ({type(e).__name__}: {str(e)[:200]}); "
                      f"using its torch reference from now on (NANOSATORI_KERNELS=triton makes this an error)")
        return fallback()
    _ran.add(name)
    return out


def num_sms(device):
    # How many programs fill the machine; in the CPU interpreter every program runs in turn, so few.
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _next_pow2(n):
    return 1 << max(0, (n - 1).bit_length())


def dot_mode(x):
    # fp32 operands use TF32 tensor cores only when torch would (torch.backends.cuda.matmul.allow_tf32);
    # the CPU interpreter multiplies bf16 as raw uint16 bits, so there every operand is upcast.
    if INTERPRET:
        return "upcast"
    return "tf32" if x.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


@triton.jit
def mma(a, b, acc, DOT: tl.constexpr):
    """acc + a @ b with fp32 accumulation; bf16/fp16 operands go to the tensor cores as they are."""
    if DOT == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT)


def _autotuned(kernel, key):
    """The kernel tuned over warps and pipeline stages on a GPU, once per value of `key`, at its
    first call (which must see a representative workload); as it is under the interpreter."""
    if INTERPRET or not HAS_TRITON:
        return kernel
    configs = [triton.Config({}, num_warps=w, num_stages=st) for w in (4, 8) for st in (1, 2)]
    return triton.autotune(configs, key=key)(kernel)


def _warps(kernel):
    return {} if hasattr(kernel, "configs") else {"num_warps": 4}       # an autotuned kernel picks its own


# ------------------------------------------------------------------------------------------------
# 1. KV-cache store: k, v [N, n_kv, hd] -> cache slots slot_mapping [N] (-1 = skip, e.g. padding)
# ------------------------------------------------------------------------------------------------

@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_k, stride_v, stride_slot,
                     ROW: tl.constexpr, ROW_PAD: tl.constexpr):
    # One program per token: copy its n_kv * hd values of K and of V into its slot.
    i = tl.program_id(0)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    c = tl.arange(0, ROW_PAD)
    mask = (c < ROW) & (slot + tl.zeros([ROW_PAD], tl.int64) >= 0)
    k = tl.load(k_ptr + i * stride_k + c, mask=mask)
    v = tl.load(v_ptr + i * stride_v + c, mask=mask)
    tl.store(kc_ptr + slot * stride_slot + c, k, mask=mask)
    tl.store(vc_ptr + slot * stride_slot + c, v, mask=mask)


def _rows(x):
    """[N, n_kv, hd] -> [N, n_kv * hd] with unit inner stride (a view when possible)."""
    x = x.reshape(x.shape[0], -1)
    return x if x.stride(1) == 1 else x.contiguous()


def store_kv(k, v, k_cache, v_cache, slot_mapping):
    """Write k, v [N, n_kv, hd] into k_cache, v_cache [num_blocks, block_size, n_kv, hd] in place at
    the flat slots slot_mapping [N] (block_id * block_size + offset); slot -1 = skip that token."""
    if not use_triton(k, "store_kv") or k.shape[0] == 0:
        return store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    k2, v2 = _rows(k.to(k_cache.dtype)), _rows(v.to(v_cache.dtype))
    row = k2.shape[1]
    launch = lambda: _store_kv_kernel[(k.shape[0],)](k2, v2, k_cache, v_cache, slot_mapping.contiguous(),
                                                     k2.stride(0), v2.stride(0), k_cache.stride(1),
                                                     ROW=row, ROW_PAD=_next_pow2(row))
    run_kernel("store_kv", launch, lambda: store_kv_ref(k, v, k_cache, v_cache, slot_mapping))
    return None


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping):
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep].to(v_cache.dtype))
    return None


# ------------------------------------------------------------------------------------------------
# 2. Paged attention: decode (one query token per sequence) and prefill (a run of query tokens per
#    sequence, causal), GQA: one program handles all GROUP = n_heads / n_kv query heads of a KV head
# ------------------------------------------------------------------------------------------------
# Decode grid (B, n_kv, splits): a program takes one sequence, one KV head and one slice of the
# context, so each K/V tile is read from memory once per group. Splitting the context gives a batch
# of 4 with 8k tokens of context as many programs as a batch of 256 would; each split writes its
# normalised output and its log-sum-exp, and a second kernel merges the splits (softmax over the
# splits' lse weights the outputs); with one split the first kernel's output is final.

@triton.jit
def _block_ids(bt_ptr, start, hi, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The cache block of each of the BLOCK_N tokens from `start` (a multiple of BLOCK_SIZE), one
    table read per block; tokens >= hi get block 0."""
    NB: tl.constexpr = BLOCK_N // BLOCK_SIZE
    first = start // BLOCK_SIZE + tl.arange(0, NB)
    blk = tl.load(bt_ptr + first, mask=first * BLOCK_SIZE < hi, other=0).to(tl.int64)
    return tl.reshape(tl.broadcast_to(blk[:, None], [NB, BLOCK_SIZE]), [BLOCK_N])


@triton.jit
def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, o_ptr, lse_ptr, scale, split_len,
                        stride_qb, stride_qh, stride_kb, stride_ks, stride_kh,
                        stride_vb, stride_vs, stride_vh, stride_bt, stride_ob, stride_oh,
                        BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
                        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                        DOT: tl.constexpr, FINAL: tl.constexpr):
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    n_heads = tl.num_programs(1) * GROUP
    num_splits = tl.num_programs(2)
    ctx = tl.load(lens_ptr + b).to(tl.int32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, ctx)             # this program's tokens: [lo, hi)

    g = tl.arange(0, G_PAD)                            # query heads of the group, padded (>= 16 for tl.dot)
    d = tl.arange(0, D_PAD)
    gmask, dmask = g < GROUP, d < HEAD_DIM
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)              # [G_PAD, D_PAD]

    m = tl.full([G_PAD], float("-inf"), tl.float32)   # running max of the scores
    l = tl.zeros([G_PAD], tl.float32)                 # running sum of exp(score - m)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)        # running sum of exp(score - m) * v
    for start in range(lo, hi, BLOCK_N):               # every tile holds >= 1 valid token: m stays finite
        t = start + tl.arange(0, BLOCK_N)
        tmask = t < hi
        blk = _block_ids(bt_ptr + b * stride_bt, start, hi, BLOCK_SIZE, BLOCK_N)
        off = t % BLOCK_SIZE
        kvmask = tmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + blk[:, None] * stride_kb + off[:, None] * stride_ks + kvh * stride_kh
                    + d[None, :], mask=kvmask, other=0.0)                     # [BLOCK_N, D_PAD]
        s = mma(q, tl.trans(k), tl.zeros([G_PAD, BLOCK_N], tl.float32), DOT) * scale
        s = tl.where(tmask[None, :], s, float("-inf"))                        # [G_PAD, BLOCK_N]
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)                      # rescales what was summed under the old max
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vs + kvh * stride_vh
                    + d[None, :], mask=kvmask, other=0.0)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], DOT)
        m = m_new

    # An empty split (lo >= ctx) leaves l = 0: it writes o = 0 and lse = -inf, weight 0 in the merge.
    l_safe = tl.where(l > 0, l, 1.0)
    o = acc / l_safe[:, None]
    omask = gmask[:, None] & dmask[None, :]
    if FINAL:                                          # one split: o is the output
        tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :], o, mask=omask)
    else:
        lse = tl.where(l > 0, m + tl.log(l_safe), float("-inf"))
        row = (b * n_heads + heads) * num_splits + split                     # o_part [B, H, S, D]
        tl.store(o_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=omask)
        tl.store(lse_ptr + row, lse, mask=gmask)


# Not autotuned: the first decode call runs in a CUDA graph's warm-up, where every context has one
# token, and a config chosen there would stay for the real contexts.
_decode_attn = _decode_attn_kernel


@triton.jit
def _merge_splits_kernel(o_part_ptr, lse_ptr, out_ptr, num_splits, stride_ob, stride_oh,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr):
    # One program per (sequence, query head): out = sum_s softmax(lse)_s * o_s.
    b, h = tl.program_id(0), tl.program_id(1)
    row = b * tl.num_programs(1) + h
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, D_PAD)
    smask, dmask = s < num_splits, d < HEAD_DIM
    lse = tl.load(lse_ptr + row * num_splits + s, mask=smask, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, 0))                  # split 0 is never empty (ctx >= 1): max finite
    w = w / tl.sum(w, 0)
    o = tl.load(o_part_ptr + (row * num_splits + s[:, None]) * HEAD_DIM + d[None, :],
                mask=smask[:, None] & dmask[None, :], other=0.0)
    out = tl.sum(w[:, None] * o, 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out, mask=dmask)


def _tile(block_size, cuda):
    """Key tile of the attention kernels: a whole number of cache blocks (power-of-two blocks)."""
    assert block_size & (block_size - 1) == 0, f"block_size {block_size}: expected a power of two"
    return max(64 if cuda else 16, block_size)


def decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, num_splits=None):
    """q [B, n_heads, hd] of one new token per sequence -> [B, n_heads, hd] in q's dtype.
    block_tables [B, max_blocks] int (entries past a sequence's length: any valid id, e.g. 0);
    context_lens [B] int >= 1: cached tokens to attend to, the current one (already stored) included.
    num_splits: context splits per sequence (None: enough programs to fill the GPU). Shapes alone
    decide the launch (no host sync), so a CUDA graph can capture it."""
    if not use_triton(q, "decode_attention"):
        return decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)
    B, n_heads, hd = q.shape
    _, block_size, n_kv, _ = k_cache.shape
    group = n_heads // n_kv
    assert n_heads % n_kv == 0 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables, context_lens = block_tables.contiguous(), context_lens.contiguous()
    BLOCK_N = _tile(block_size, q.is_cuda)
    n_tiles = triton.cdiv(block_tables.shape[1] * block_size, BLOCK_N)
    if num_splits is None:
        num_splits = triton.cdiv(2 * num_sms(q.device), B * n_kv)   # ~2 waves of programs
    tiles_per_split = triton.cdiv(n_tiles, max(1, min(num_splits, n_tiles)))
    num_splits = triton.cdiv(n_tiles, tiles_per_split)
    out = torch.empty_like(q)
    final = num_splits == 1
    o_part = out if final else torch.empty(B, n_heads, num_splits, hd, device=q.device, dtype=torch.float32)
    lse = o_part if final else torch.empty(B, n_heads, num_splits, device=q.device, dtype=torch.float32)
    D_PAD = _next_pow2(max(hd, 16))

    def launch():
        _decode_attn[(B, n_kv, num_splits)](
            q, k_cache, v_cache, block_tables, context_lens, o_part, lse, float(scale),
            tiles_per_split * BLOCK_N, q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
            out.stride(0), out.stride(1), BLOCK_SIZE=block_size, GROUP=group,
            G_PAD=_next_pow2(max(group, 16)), HEAD_DIM=hd, D_PAD=D_PAD, BLOCK_N=BLOCK_N,
            DOT=dot_mode(q), FINAL=final, **_warps(_decode_attn))
        if not final:
            _merge_splits_kernel[(B, n_heads)](o_part, lse, out, num_splits, out.stride(0), out.stride(1),
                                               HEAD_DIM=hd, D_PAD=D_PAD, S_PAD=_next_pow2(num_splits))
        return out
    return run_kernel("decode_attention", launch,
                   lambda: decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale))


def gather_blocks(cache, block_tables):
    """[num_blocks, bs, n_kv, hd] through block tables [B, W] -> [B, W * bs, n_kv, hd]: one index
    per block, not per token."""
    B, W = block_tables.shape
    return cache[block_tables.long()].reshape(B, W * cache.shape[1], *cache.shape[2:])


def decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale):
    # Every sequence's context gathered by blocks [B, T, n_kv, hd]; positions >= context_len masked.
    B, n_heads, hd = q.shape
    k = gather_blocks(k_cache, block_tables).transpose(1, 2).float()                   # [B, n_kv, T, hd]
    v = gather_blocks(v_cache, block_tables).transpose(1, 2).float()
    mask = (torch.arange(k.shape[2], device=q.device) < context_lens.view(B, 1))[:, None, None, :]
    o = F.scaled_dot_product_attention(q.float()[:, :, None], k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[:, :, 0].to(q.dtype)


# Prefill grid (sequences, query tiles, n_kv): a program takes BLOCK_M query tokens of one sequence
# and the GROUP query heads of one KV head (BLOCK_M * G_PAD rows), and walks that sequence's paged
# context up to its last query's position: keys at or before each query's position count (causal),
# including prompt blocks that other sequences share and computed earlier.

@triton.jit
def _prefill_attn_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, qstart_ptr, qlen_ptr, ctx_ptr, o_ptr, scale,
                         stride_qn, stride_qh, stride_kb, stride_ks, stride_kh,
                         stride_vb, stride_vs, stride_vh, stride_bt, stride_on, stride_oh,
                         BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, DOT: tl.constexpr):
    sq, mt, kvh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_len = tl.load(qlen_ptr + sq).to(tl.int32)
    if mt * BLOCK_M < q_len:
        q0 = tl.load(qstart_ptr + sq).to(tl.int64)
        ctx = tl.load(ctx_ptr + sq).to(tl.int32)
        r = tl.arange(0, BLOCK_M * G_PAD)              # row = (query token, head of the group)
        mi, g = mt * BLOCK_M + r // G_PAD, r % G_PAD
        rmask = (mi < q_len) & (g < GROUP)
        heads = kvh * GROUP + g
        qpos = ctx - q_len + mi                         # the query's position in its sequence
        d = tl.arange(0, D_PAD)
        dmask = d < HEAD_DIM
        qrow = (q0 + mi).to(tl.int64)
        q = tl.load(q_ptr + qrow[:, None] * stride_qn + heads[:, None] * stride_qh + d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)          # [R, D_PAD]
        # m starts finite: rows with no key in a tile (padding) then add exp(-inf) = 0, not nan
        m = tl.full([BLOCK_M * G_PAD], -1e30, tl.float32)
        l = tl.zeros([BLOCK_M * G_PAD], tl.float32)
        acc = tl.zeros([BLOCK_M * G_PAD, D_PAD], tl.float32)
        hi = tl.minimum(ctx, ctx - q_len + (mt + 1) * BLOCK_M)                # keys [0, hi)
        bt = bt_ptr + sq * stride_bt
        for start in range(0, hi, BLOCK_N):
            t = start + tl.arange(0, BLOCK_N)
            tmask = t < hi
            blk = _block_ids(bt, start, hi, BLOCK_SIZE, BLOCK_N)
            off = t % BLOCK_SIZE
            kvmask = tmask[:, None] & dmask[None, :]
            k = tl.load(k_ptr + blk[:, None] * stride_kb + off[:, None] * stride_ks + kvh * stride_kh
                        + d[None, :], mask=kvmask, other=0.0)                 # [BLOCK_N, D_PAD]
            s = mma(q, tl.trans(k), tl.zeros([BLOCK_M * G_PAD, BLOCK_N], tl.float32), DOT) * scale
            s = tl.where(tmask[None, :] & (t[None, :] <= qpos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vs + kvh * stride_vh
                        + d[None, :], mask=kvmask, other=0.0)
            acc = mma(p.to(v.dtype), v, acc * alpha[:, None], DOT)
            m = m_new
        o = acc / tl.where(l > 0, l, 1.0)[:, None]    # every real row saw key 0: l > 0
        tl.store(o_ptr + qrow[:, None] * stride_on + heads[:, None] * stride_oh + d[None, :], o,
                 mask=rmask[:, None] & dmask[None, :])


_prefill_attn = _autotuned(_prefill_attn_kernel, ["HEAD_DIM", "GROUP", "BLOCK_SIZE"])


def prefill_attention(q, k_cache, v_cache, block_tables, q_start, q_lens, context_lens, scale, max_q_len=None):
    """Causal attention of packed new tokens over their sequences' paged contexts (their own K/V
    already stored). q [N, n_heads, hd]: sequence i's queries are rows q_start[i] .. q_start[i] +
    q_lens[i] - 1, the last q_lens[i] of its context_lens[i] tokens. block_tables [n, max_blocks].
    max_q_len: the longest q_lens (a host int, so no sync; computed when not given) -> [N, n_heads, hd]."""
    if not use_triton(q, "prefill_attention") or q.shape[0] == 0:
        return prefill_attention_ref(q, k_cache, v_cache, block_tables, q_start, q_lens, context_lens, scale)
    n = block_tables.shape[0]
    _, n_heads, hd = q.shape
    _, block_size, n_kv, _ = k_cache.shape
    group = n_heads // n_kv
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_tables = block_tables.contiguous()
    max_q_len = int(q_lens.max()) if max_q_len is None else max_q_len
    G_PAD = _next_pow2(group)
    BLOCK_M = max(16 // G_PAD, 64 // G_PAD if q.is_cuda else 1, 1)     # >= 16 rows for tl.dot
    out = torch.empty_like(q)

    def launch():
        _prefill_attn[(n, triton.cdiv(max_q_len, BLOCK_M), n_kv)](
            q, k_cache, v_cache, block_tables, q_start, q_lens, context_lens, out, float(scale),
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
            out.stride(0), out.stride(1), BLOCK_SIZE=block_size, GROUP=group, G_PAD=G_PAD, HEAD_DIM=hd,
            D_PAD=_next_pow2(max(hd, 16)), BLOCK_M=BLOCK_M, BLOCK_N=_tile(block_size, q.is_cuda),
            DOT=dot_mode(q), **_warps(_prefill_attn))
        return out
    return run_kernel("prefill_attention", launch, lambda: prefill_attention_ref(
        q, k_cache, v_cache, block_tables, q_start, q_lens, context_lens, scale))


def prefill_attention_ref(q, k_cache, v_cache, block_tables, q_start, q_lens, context_lens, scale):
    # Padded per sequence: queries [c, H, Tq, hd], contexts gathered by blocks [c, n_kv, T, hd], a
    # causal mask by position. Sequences go longest first, in chunks whose shortest is at least half
    # the longest (a few whole prompts do not pad the many that share their prefix) and whose
    # scores stay ~64 M floats. The lengths are read on the host: the CPU's path, and CUDA's fallback.
    N, n_heads, hd = q.shape
    out = torch.empty_like(q)
    if N == 0:
        return out
    T = block_tables.shape[1] * k_cache.shape[1]
    order = torch.argsort(q_lens, descending=True, stable=True)
    lens = q_lens[order].tolist()
    c = 0
    while c < len(lens):
        Tq, e = lens[c], c + 1
        while e < len(lens) and 2 * lens[e] >= Tq and (e + 1 - c) * n_heads * Tq * T <= 64 << 20:
            e += 1
        idx, c = order[c:e], e
        j = torch.arange(Tq, device=q.device)
        rows = q_start[idx, None].long() + j                                           # [c, Tq]
        valid = j < q_lens[idx, None]
        qp = q[rows.clamp(max=N - 1)].float().transpose(1, 2)                         # [c, H, Tq, hd]
        k = gather_blocks(k_cache, block_tables[idx]).float().transpose(1, 2)        # [c, n_kv, T, hd]
        v = gather_blocks(v_cache, block_tables[idx]).float().transpose(1, 2)
        qpos = (context_lens[idx] - q_lens[idx])[:, None] + j                         # [c, Tq]
        allowed = torch.arange(T, device=q.device) <= qpos[:, :, None]               # [c, Tq, T]
        o = F.scaled_dot_product_attention(qp, k, v, attn_mask=allowed[:, None], scale=scale, enable_gqa=True)
        out[rows[valid]] = o.transpose(1, 2)[valid].to(q.dtype)                       # [c, Tq, H, hd] -> rows
    return out
