"""paged_kernels.py and logprobs.py: the torch references against the plain definitions (in this process), and
the Triton kernels against the references. Triton reads TRITON_INTERPRET when paged_kernels.py is imported, so on a
machine without a GPU the kernel tests (test_kernel_*) run in a subprocess with TRITON_INTERPRET=1
(test_kernels_under_interpreter); with a GPU, or with TRITON_INTERPRET=1 already set, they run here.
"""
import os
import subprocess
import sys

import pytest
import torch

import paged_kernels
import logprobs
import step_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_KERNELS = paged_kernels.HAS_TRITON and (paged_kernels.INTERPRET or torch.cuda.is_available())
DEVICE = "cuda" if torch.cuda.is_available() and not paged_kernels.INTERPRET else "cpu"
# bf16 results of the norm and SiLU kernels: a rounding step or two from torch's (a sum's order, the
# GPU's approximate exp and rsqrt); the CPU interpreter also truncates float32 -> bf16 where a GPU
# rounds to nearest, so there the rotary kernel is as far off, where on a GPU it is exact
BF16_TOL = 2e-2
needs_triton = pytest.mark.skipif(not RUN_KERNELS, reason="runs in the TRITON_INTERPRET=1 subprocess")


# ---------------------------------------------------------------- plain definitions (float64)

def store_kv_def(k, v, k_cache, v_cache, slot_mapping):
    bs = k_cache.shape[1]
    for i, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_cache[slot // bs, slot % bs] = k[i]
            v_cache[slot // bs, slot % bs] = v[i]


def decode_attention_def(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Per sequence: gather its tokens' K/V through the block table, repeat each KV head for its
    group of query heads, dense softmax attention."""
    B, n_heads, hd = q.shape
    bs, n_kv = k_cache.shape[1], k_cache.shape[2]
    out = []
    for b in range(B):
        n = int(context_lens[b])
        blocks = [int(block_tables[b, t // bs]) for t in range(n)]
        k = torch.stack([k_cache[blocks[t], t % bs] for t in range(n)]).double()   # [n, n_kv, hd]
        v = torch.stack([v_cache[blocks[t], t % bs] for t in range(n)]).double()
        k = k.repeat_interleave(n_heads // n_kv, dim=1)                             # [n, heads, hd]
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
        att = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale
        out.append(torch.einsum("hn,nhd->hd", att.softmax(-1), v))
    return torch.stack(out)


def prefill_attention_def(q, k_cache, v_cache, block_tables, q_start, q_lens, context_lens, scale):
    """Per sequence, per query token: gather the keys up to its own position through the block
    table, repeat each KV head for its group, dense softmax attention."""
    n_heads, hd = q.shape[1:]
    bs, n_kv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for s in range(block_tables.shape[0]):
        ctx, n = int(context_lens[s]), int(q_lens[s])
        for i in range(n):
            p = ctx - n + i                                                     # the query's position
            blocks = [int(block_tables[s, t // bs]) for t in range(p + 1)]
            k = torch.stack([k_cache[blocks[t], t % bs] for t in range(p + 1)]).double().repeat_interleave(n_heads // n_kv, 1)
            v = torch.stack([v_cache[blocks[t], t % bs] for t in range(p + 1)]).double().repeat_interleave(n_heads // n_kv, 1)
            row = int(q_start[s]) + i
            att = torch.einsum("hd,thd->ht", q[row].double(), k) * scale
            out[row] = torch.einsum("ht,thd->hd", att.softmax(-1), v)
    return out


def logprobs_def(hidden, weight, targets, temperature=1.0):
    """The naive way: full logits, log_softmax, gather; entropy = -sum p log p."""
    logp = torch.log_softmax((hidden @ weight.T) / temperature, dim=-1)
    return logp.gather(-1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------- shared cases

def _cache(num_blocks, bs, n_kv, hd, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(num_blocks, bs, n_kv, hd, generator=g).to(DEVICE, dtype)
    vc = torch.randn(num_blocks, bs, n_kv, hd, generator=g).to(DEVICE, dtype)
    return kc, vc


def _decode_case(group, dtype, hd=32, bs=8, n_kv=2, q_scale=1.0):
    """Ragged lengths 1, bs - 1, bs, 3 * bs + 3; sequences 0 and 1 share their first block (a common
    prompt prefix); unused table entries are 0; blocks are out of order."""
    kc, vc = _cache(12, bs, n_kv, hd, dtype)
    bt = torch.tensor([[5, 2, 9, 7, 0],
                       [5, 0, 0, 0, 0],
                       [3, 0, 0, 0, 0],
                       [11, 1, 4, 6, 10]], dtype=torch.int32, device=DEVICE)
    lens = torch.tensor([bs - 1, 1, bs, 3 * bs + 3], dtype=torch.int32, device=DEVICE)
    q = (torch.randn(4, n_kv * group, hd, generator=torch.Generator().manual_seed(1)) * q_scale)
    return q.to(DEVICE, dtype), kc, vc, bt, lens, hd ** -0.5


def _prefill_case(group, dtype, hd=64, bs=8, n_kv=2):
    """Three sequences: one whose whole prompt is new (it crosses blocks), one with the first
    3 blocks cached (shared with the first: only its last 5 tokens are queries), one of a single
    token; GQA group `group`, head_dim 64 (the sampler's shape), blocks out of order."""
    kc, vc = _cache(16, bs, n_kv, hd, dtype)
    bt = torch.tensor([[9, 4, 12, 1, 0, 0],
                       [9, 4, 12, 7, 3, 0],
                       [14, 0, 0, 0, 0, 0]], dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor([3 * bs + 2, 4 * bs + 5 - bs, 1], dtype=torch.int32, device=DEVICE)
    q_lens = torch.tensor([3 * bs + 2, 5, 1], dtype=torch.int32, device=DEVICE)
    q_start = (q_lens.cumsum(0) - q_lens).int()
    q = torch.randn(int(q_lens.sum()), n_kv * group, hd, generator=torch.Generator().manual_seed(3))
    return q.to(DEVICE, dtype), kc, vc, bt, q_start, q_lens, ctx, hd ** -0.5


def _lp_case(N=37, H=40, V=200, dtype=torch.float32, scale=1.0, seed=0):
    # N, H, V are not multiples of the kernel tiles (16, 32, 64 on CPU; 64, 64, 128 on GPU).
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * scale).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(DEVICE, dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    return hidden, weight, targets


def _grads(fn, hidden, weight, targets, temperature, g_lp, g_ent):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    lp, ent = fn(h, w, targets, temperature)
    loss = (lp * g_lp).sum() + (0 if g_ent is None else (ent * g_ent).sum())
    loss.backward()
    return lp.detach(), ent.detach(), h.grad, w.grad


def _close(a, b, tol, atol=None):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=tol, atol=tol if atol is None else atol)


# ---------------------------------------------------------------- references vs definitions

def test_store_kv_ref_matches_definition():
    kc, vc = _cache(4, 4, 2, 8, torch.float32)
    k, v = torch.randn(6, 2, 8).to(DEVICE), torch.randn(6, 2, 8).to(DEVICE)
    slots = torch.tensor([0, 15, -1, 6, 7, -1], device=DEVICE)
    kc2, vc2 = kc.clone(), vc.clone()
    paged_kernels.store_kv_ref(k, v, kc, vc, slots)
    store_kv_def(k, v, kc2, vc2, slots)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


@pytest.mark.parametrize("group", [1, 2, 7])
def test_decode_attention_ref_matches_definition(group):
    q, kc, vc, bt, lens, scale = _decode_case(group, torch.float32)
    out = paged_kernels.decode_attention_ref(q, kc, vc, bt, lens, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    _close(out, decode_attention_def(q, kc, vc, bt, lens, scale), 1e-5)


@pytest.mark.parametrize("group", [1, 7])
def test_prefill_attention_ref_matches_definition(group):
    case = _prefill_case(group, torch.float32)
    want = prefill_attention_def(*case)
    _close(paged_kernels.prefill_attention_ref(*case), want, 1e-5)
    q, kc, vc, bt, q_start, q_lens, ctx, scale = case
    # the sequences one at a time (rows of one sequence only): the same rows
    for i in range(3):
        lo, n = int(q_start[i]), int(q_lens[i])
        one = paged_kernels.prefill_attention_ref(q[lo:lo + n], kc, vc, bt[i:i + 1], q_start[:1] * 0, q_lens[i:i + 1],
                                            ctx[i:i + 1], scale)
        _close(one, want[lo:lo + n], 1e-5)


def rope_def(x, cos, sin):
    """Rotary embedding as a rotation: the pair (x[j], x[j + hd/2]) turned by the angle whose cos and
    sin are cos[j], sin[j] (the table repeats them in both halves), in float64."""
    h = x.shape[-1] // 2
    a, b = x[..., :h].double(), x[..., h:].double()
    c, s = cos[:, None, :h].double(), sin[:, None, :h].double()
    return torch.cat([a * c - b * s, b * c + a * s], -1)


def _rope_case(n_heads, n_kv, hd, dtype, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, n_heads + 2 * n_kv, hd, generator=g)        # views of one projection's output
    ang = torch.rand(n, hd // 2, generator=g) * 6.3
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    q, k, v = qkv.to(DEVICE, dtype).split([n_heads, n_kv, n_kv], 1)
    return q, k, v, cos.to(DEVICE, dtype), sin.to(DEVICE, dtype)


def test_rope_store_ref_matches_definition():
    q, k, v, cos, sin = _rope_case(7, 1, 64, torch.float64)
    kc, vc = (c.double() for c in _cache(4, 4, 1, 64, torch.float32))
    slots = torch.tensor([0, 15, -1, 6, 7], device=DEVICE)
    kc2, vc2 = kc.clone(), vc.clone()
    qo = step_kernels.rope_store_ref(q, k, v, cos, sin, kc, vc, slots)
    store_kv_def(rope_def(k, cos, sin), v, kc2, vc2, slots)
    _close(qo, rope_def(q, cos, sin), 1e-12)
    _close(kc, kc2, 1e-12)
    _close(vc, vc2, 1e-12)


def test_rms_norm_and_silu_mul_refs_match_definitions():
    x, w = torch.randn(3, 5, 24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    _close(step_kernels.rms_norm_ref(x, w, 1e-6), w * x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt(),
           1e-6)   # normalised in float32, as the model does
    g, u = torch.randn(2, 7, dtype=torch.float64), torch.randn(2, 7, dtype=torch.float64)
    _close(step_kernels.silu_mul_ref(g, u), g / (1 + torch.exp(-g)) * u, 1e-12)


def test_token_logprobs_with_no_rows():
    w = torch.randn(10, 8, device=DEVICE, requires_grad=True)
    lp, ent = logprobs.token_logprobs(torch.zeros(0, 8, device=DEVICE), w, torch.zeros(0, dtype=torch.long,
                                                                                      device=DEVICE), return_entropy=True)
    assert lp.shape == ent.shape == (0,)
    lp.sum().backward()
    assert w.grad is not None and not w.grad.any()


def test_kernel_choice_from_the_environment():
    code = ("import torch, paged_kernels\n"
            "assert not paged_kernels.use_triton(torch.zeros(1, device='cuda' if torch.cuda.is_available() else 'cpu'))\n"
            "print('ok')")
    env = dict(os.environ, NANOSATORI_KERNELS="torch", TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    env["NANOSATORI_KERNELS"] = "cuda"
    r = subprocess.run([sys.executable, "-c", "import paged_kernels"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "NANOSATORI_KERNELS='cuda': expected auto, triton or torch" in r.stderr


def test_a_kernel_that_fails_falls_back_once(monkeypatch):
    """NANOSATORI_KERNELS=auto: a first launch that raises (a compile error) warns once and runs the
    reference from then on; =triton: the error propagates."""
    monkeypatch.setattr(paged_kernels, "KERNELS", "auto")      # bench.py gpu runs the tests with =triton
    monkeypatch.setattr(paged_kernels, "_failed", set())
    monkeypatch.setattr(paged_kernels, "_ran", set())
    calls = []

    class CompileError(Exception):
        pass
    monkeypatch.setattr(paged_kernels, "_COMPILE_ERRORS", (CompileError,))

    def broken():
        calls.append(1)
        raise CompileError("PTX assembly failed")

    def buggy():
        raise TypeError("a wrong launch argument")
    with pytest.warns(UserWarning, match="the Triton toy kernel failed"):
        assert paged_kernels.run_kernel("toy", broken, lambda: "ref") == "ref"
    assert "toy" in paged_kernels._failed and not paged_kernels.use_triton(torch.zeros(1), "toy")
    with pytest.raises(TypeError):                 # not a compile failure: a bug, never hidden
        paged_kernels.run_kernel("buggy", buggy, lambda: "ref")
    monkeypatch.setattr(paged_kernels, "KERNELS", "triton")
    with pytest.raises(CompileError, match="PTX"):
        paged_kernels.run_kernel("other", broken, lambda: "ref")


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_logprobs_ref_matches_definition(temperature, monkeypatch):
    monkeypatch.setattr(logprobs, "LOGPROB_CHUNK_BYTES", 200 * 4 * 8)    # chunks of 8 tokens
    hidden, weight, targets = _lp_case()
    g_lp, g_ent = torch.randn(37).to(DEVICE), torch.randn(37).to(DEVICE)
    ref = lambda h, w, t, T: logprobs.token_logprobs_ref(h, w, t, T, return_entropy=True)
    got = _grads(ref, hidden, weight, targets, temperature, g_lp, g_ent)
    want = _grads(logprobs_def, hidden.double(), weight.double(), targets, temperature, g_lp, g_ent)
    for a, b in zip(got, want):
        _close(a, b, 1e-5)
    # log-probs only (the entropy output unused): its gradient must not leak in
    got = _grads(ref, hidden, weight, targets, temperature, g_lp, None)
    want = _grads(logprobs_def, hidden.double(), weight.double(), targets, temperature, g_lp, None)
    for a, b in zip(got[2:], want[2:]):
        _close(a, b, 1e-5)


def test_token_logprobs_ref_extreme_logits_and_shapes():
    hidden, weight, targets = _lp_case(scale=1e3)        # logits ~ 1e3: naive exp would overflow
    lp, ent = logprobs.token_logprobs_ref(hidden, weight, targets, return_entropy=True)
    want_lp, want_ent = logprobs_def(hidden.double(), weight.double(), targets)
    _close(lp, want_lp, 1e-3)
    _close(ent, want_ent, 1e-3)
    # [B, T, H] hidden and [B, T] targets keep their leading shape
    lp2 = logprobs.token_logprobs(hidden.view(1, 37, 40), weight, targets.view(1, 37))
    assert lp2.shape == (1, 37)


def test_token_logprobs_ref_bf16():
    hidden, weight, targets = _lp_case(dtype=torch.bfloat16)
    lp = logprobs.token_logprobs_ref(hidden, weight, targets)
    lp.sum().backward()
    assert lp.dtype == torch.float32 and weight.grad.dtype == torch.bfloat16
    _close(lp, logprobs_def(hidden.double(), weight.double(), targets)[0], 2e-2)


def test_dispatch_off_cuda_uses_references():
    if paged_kernels.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1: kernels run on CPU tensors")
    assert not paged_kernels.use_triton(torch.zeros(1))


def test_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
            "import torch, paged_kernels, logprobs\n"
            "assert not paged_kernels.HAS_TRITON\n"
            "h, w = torch.randn(3, 8, requires_grad=True), torch.randn(10, 8)\n"
            "logprobs.token_logprobs(h, w, torch.tensor([1, 2, 3])).sum().backward()\n"
            "from model import ModelConfig, Transformer\n"          # the sampler, through step_kernels
            "from rollout import Sampler\n"
            "cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
            "                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)\n"
            "outs = Sampler(Transformer(cfg), max_batch=2, max_seq_len=16).generate([[1, 2], [3]], 3, seed=0)\n"
            "assert [len(o.tokens) for o in outs] == [3, 3]\n"
            "print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


# ---------------------------------------------------------------- Triton kernels vs references

@pytest.mark.skipif(not paged_kernels.HAS_TRITON or RUN_KERNELS, reason="kernel tests run in this process")
def test_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", NANOSATORI_KERNELS="triton")   # a kernel that fails is a failure
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        os.path.abspath(__file__), "-k", "test_kernel_"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " skipped" not in r.stdout, r.stdout[-2000:]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_store_kv(dtype):
    kc, vc = _cache(4, 4, 2, 8, dtype)
    big = torch.randn(6, 3, 2, 8).to(DEVICE, dtype)
    k, v = big[:, 0], big[:, 1]                             # strided views, as from a fused qkv
    for slots in (torch.tensor([0, 15, -1, 6, 7, -1]), torch.tensor([3, -1, -1, 12, 1, 2], dtype=torch.int32)):
        slots = slots.to(DEVICE)
        kc2, vc2 = kc.clone(), vc.clone()
        paged_kernels.store_kv(k, v, kc, vc, slots)
        paged_kernels.store_kv_ref(k, v, kc2, vc2, slots)
        assert torch.equal(kc, kc2) and torch.equal(vc, vc2)   # slot -1 left the cache as it was


@needs_triton
@pytest.mark.parametrize("group", [1, 2, 7])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_kernel_decode_attention(group, num_splits):
    q, kc, vc, bt, lens, scale = _decode_case(group, torch.float32)
    out = paged_kernels.decode_attention(q, kc, vc, bt, lens, scale, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    _close(out, paged_kernels.decode_attention_ref(q, kc, vc, bt, lens, scale), 1e-4)


@needs_triton
@pytest.mark.parametrize("group", [1, 7])
@pytest.mark.parametrize("bs", [8, 16])
def test_kernel_prefill_attention(group, bs):
    case = _prefill_case(group, torch.float32, bs=bs)
    out = paged_kernels.prefill_attention(*case)
    assert out.shape == case[0].shape and out.dtype == case[0].dtype
    _close(out, paged_kernels.prefill_attention_ref(*case), 1e-4)


@needs_triton
def test_kernel_prefill_attention_bf16():
    case = _prefill_case(7, torch.bfloat16)
    _close(paged_kernels.prefill_attention(*case), prefill_attention_def(*case), 3e-2)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_decode_attention_half(dtype):
    q, kc, vc, bt, lens, scale = _decode_case(7, dtype, hd=24, bs=4)   # head_dim not a power of 2
    out = paged_kernels.decode_attention(q, kc, vc, bt, lens, scale, num_splits=2)
    assert out.dtype == dtype
    _close(out, decode_attention_def(q, kc, vc, bt, lens, scale), 3e-2)


@needs_triton
def test_kernel_decode_attention_extreme_scores():
    q, kc, vc, bt, lens, scale = _decode_case(2, torch.float32, q_scale=300.0)
    bt, lens = bt.long(), lens.long()                      # int64 tables work too
    out = paged_kernels.decode_attention(q, kc, vc, bt, lens, scale, num_splits=4)
    _close(out, paged_kernels.decode_attention_ref(q, kc, vc, bt, lens, scale), 1e-4)


@needs_triton
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_kernel_token_logprobs(temperature, monkeypatch):
    monkeypatch.setattr(logprobs, "LOGPROB_CHUNK_BYTES", 200 * 4 * 16)   # backward in 3 chunks
    hidden, weight, targets = _lp_case()
    g = torch.Generator().manual_seed(2)
    g_lp, g_ent = torch.randn(37, generator=g).to(DEVICE), torch.randn(37, generator=g).to(DEVICE)
    fused = lambda h, w, t, T: logprobs.token_logprobs(h, w, t, T, return_entropy=True)
    ref = lambda h, w, t, T: logprobs.token_logprobs_ref(h, w, t, T, return_entropy=True)
    for g_e in (g_ent, None):                              # with and without the entropy's gradient
        got = _grads(fused, hidden, weight, targets, temperature, g_lp, g_e)
        want = _grads(ref, hidden, weight, targets, temperature, g_lp, g_e)
        for a, b in zip(got, want):
            _close(a, b, 1e-4)


@needs_triton
def test_kernel_token_logprobs_extreme_logits():
    hidden, weight, targets = _lp_case(N=20, V=130, scale=1e3)
    got = _grads(lambda h, w, t, T: logprobs.token_logprobs(h, w, t, T, return_entropy=True),
                 hidden, weight, targets, 1.0, torch.ones(20, device=DEVICE), None)
    want = _grads(lambda h, w, t, T: logprobs_def(h, w, t, T),
                  hidden.double(), weight.double(), targets, 1.0, torch.ones(20, device=DEVICE), None)
    for a, b in zip(got, want):      # finite, and right up to the fp32 rounding of logits ~1e3
        _close(a, b, 2e-3, atol=1e-4 * b.abs().max().item())


@needs_triton
def test_kernel_token_logprobs_small_batch():
    hidden, weight, targets = _lp_case(N=1, V=300)         # the sampler's case: splits of the vocab
    _close(logprobs.token_logprobs(hidden, weight, targets),
           logprobs_def(hidden.double(), weight.double(), targets)[0], 1e-4)


@needs_triton
def test_kernel_token_logprobs_bf16():
    hidden, weight, targets = _lp_case(N=20, V=130, dtype=torch.bfloat16)
    lp, ent = logprobs.token_logprobs(hidden, weight, targets, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    want = _grads(lambda h, w, t, T: logprobs_def(h, w, t, T), hidden.double(), weight.double(),
                  targets, 1.0, torch.ones(20, device=DEVICE), torch.ones(20, device=DEVICE))
    for a, b in zip((lp, ent, hidden.grad, weight.grad), want):
        _close(a, b, 5e-2)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(7, 1, 64), (4, 2, 24)])
def test_kernel_rope_store(dtype, heads):
    """GQA 7:1 at head dim 64, and a head dim whose half is no power of two; slot -1 stores nothing."""
    q, k, v, cos, sin = _rope_case(*heads, dtype)
    kc, vc = _cache(4, 4, heads[1], heads[2], dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    slots = torch.tensor([0, 15, -1, 6, 7], device=DEVICE)
    qo = step_kernels.rope_store(q, k, v, cos, sin, kc, vc, slots)
    qo2 = step_kernels.rope_store_ref(q, k, v, cos, sin, kc2, vc2, slots)
    assert qo.dtype == q.dtype and qo.shape == q.shape
    if paged_kernels.INTERPRET:
        tol = 1e-6 if dtype == torch.float32 else BF16_TOL
        _close(qo, qo2, tol)
        _close(kc, kc2, tol)
    else:                                   # rounded where torch rounds, no fma: bit for bit
        assert torch.equal(qo, qo2) and torch.equal(kc, kc2)
    assert torch.equal(vc, vc2)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_rms_norm(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 9, 96, generator=g) * 3).to(DEVICE, dtype)
    for w in (torch.randn(96, generator=g).to(DEVICE), torch.randn(96, generator=g).to(DEVICE, dtype)):
        out, ref = step_kernels.rms_norm(x, w, 1e-6), step_kernels.rms_norm_ref(x, w, 1e-6)
        assert out.dtype == ref.dtype and out.shape == ref.shape
        _close(out, ref, 1e-5 if dtype == torch.float32 else BF16_TOL)   # rounded to x.dtype once


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_silu_mul(dtype):
    g = torch.Generator().manual_seed(0)
    a, b = ((torch.randn(3, 1500, generator=g) * 4).to(DEVICE, dtype) for _ in range(2))   # two programs, one partial
    out = step_kernels.silu_mul(a, b)
    _close(out, step_kernels.silu_mul_ref(a, b), 1e-5 if dtype == torch.float32 else BF16_TOL)


@needs_triton
@pytest.mark.parametrize("dense", [True, False])
def test_kernel_sampler_fused_equals_unfused(dense, monkeypatch):
    """The sampler with the step kernels (norms, rotary + store, SiLU * up, sampling) samples the
    same tokens as with torch's operators, through prefill, shared prefixes and decode."""
    from model import ModelConfig, Transformer
    from rollout import Sampler
    cfg = ModelConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = Transformer(cfg).to(DEVICE).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (3, 11, 17)]
    prompts.append(prompts[2])
    run = lambda: Sampler(model, max_batch=4, block_size=8, max_seq_len=40, dense=dense).generate(
        prompts, 8, temperature=1.0, seed=5)
    launched, real = set(), paged_kernels.run_kernel
    monkeypatch.setattr(paged_kernels, "run_kernel", lambda name, *a: launched.add(name) or real(name, *a))
    fused = run()
    assert {"rms_norm", "rope_store", "silu_mul", "sample"} <= launched
    monkeypatch.setattr(step_kernels, "FUSED", False)
    launched.clear()
    plain = run()
    assert not launched & {"rms_norm", "rope_store", "silu_mul", "sample"}
    for a, b in zip(fused, plain):
        assert a.tokens == b.tokens
        _close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), 1e-4)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_sample(dtype):
    """The one-kernel sampler against rollout.sample: same tokens, same log-probs, over a vocabulary
    of several tiles whose last is partial, uniforms at the extremes included."""
    from rollout import sample as sample_ref
    g = torch.Generator().manual_seed(0)
    B, V = 64, 9000
    logits = (torch.randn(B, V, generator=g) * 4).to(DEVICE, dtype)
    logits[:8, :100] += 30                                  # rows whose mass sits in one tile
    logits[8, :4096] = float("-inf")                        # a first tile of impossible tokens
    u = torch.rand(B, generator=g, dtype=torch.float64)
    u[:3] = torch.tensor([2.0 ** -53, 0.5, 1 - 2.0 ** -30], dtype=torch.float64)   # nearer 1: rounding decides
    u = u.to(DEVICE)
    for t in (1.0, 0.7):
        temp = torch.tensor([t], device=DEVICE)
        tok, lp = step_kernels.sample(logits, temp, u)
        ref_tok, ref_lp = sample_ref(logits, temp, 1.0, u)
        assert tok.dtype == torch.long and lp.dtype == torch.float32
        assert torch.equal(tok, ref_tok)
        _close(lp, ref_lp, 1e-5)
