"""`python bench.py gpu`: everything that needs one H100/H200, in <= 8 minutes. Each part runs in its own
process with its own time limit, so one that crashes or hangs leaves the others; --smoke runs every
part at tiny shapes on the CPU (a test does).

    python bench.py gpu                      # all parts; raw JSON to $OUT/bench_gpu.json (or ./bench_gpu.json)
    python bench.py gpu --parts=decode,sft   # some of them
    python bench_gpu.py decode               # one part in this process, its JSON on the last line

Parts: sampler (ours with and without the fused kernels vs transformers' generate at the Qwen2.5-0.5B
shape, and the kernels that take the most time in a prefill and in decode steps), decode (paged decode and
prefill attention vs SDPA), logprob (fused log-prob vs log_softmax + gather), kernels (the kernel and
sampler tests compiled for the GPU), sft (one SFT step: tokens/s and MFU).
"""
import json
import os
import subprocess
import sys
import time

import torch

import paged_kernels
import step_kernels
from memory_plan import qwen25
from model import ModelConfig, Transformer, num_params
from rollout import Sampler

SMOKE = os.environ.get("BENCH_SMOKE") == "1"
PEAK_BF16 = 989e12        # H100/H200 SXM dense bf16, nominal


def _dev():
    return torch.device("cuda" if torch.cuda.is_available() and not SMOKE else "cpu")


def _sync():
    if _dev().type == "cuda":
        torch.cuda.synchronize()


def _qwen05():
    if SMOKE:
        return ModelConfig(vocab_size=512, hidden_size=112, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096)
    return qwen25("0.5b", max_position_embeddings=4096)


def _best(fn, repeat=10):
    """Seconds per call of fn, over `repeat` back-to-back calls after a warm-up (the GPU kept busy:
    a sync after every call would add its launch latency to kernels of tens of microseconds)."""
    fn()
    _sync()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync()
    return (time.perf_counter() - t) / repeat


def gpu_sampler():
    """The 0.5B shape, random bf16 weights, 256 prompts U[100, 1024], budgets U[256, 512], T 1: ours
    (decode steps as CUDA graphs) with and without the fused kernels vs transformers' generate on the
    same weights (one run, capped)."""
    dev, cfg = _dev(), _qwen05()
    n = 4 if SMOKE else 256
    g = torch.Generator().manual_seed(0)
    plens = torch.randint(5, 12, (n,), generator=g).tolist() if SMOKE else torch.randint(100, 1025, (n,), generator=g).tolist()
    olens = torch.randint(3, 7, (n,), generator=g).tolist() if SMOKE else torch.randint(256, 513, (n,), generator=g).tolist()
    prompts = [torch.randint(0, cfg.vocab_size, (p,), generator=g).tolist() for p in plens]
    torch.manual_seed(0)
    with torch.device(dev):
        model = Transformer(cfg).to(torch.bfloat16).eval()
    res = {"prompts": n, "output_tokens": sum(olens)}
    # graphs and eager agree (greedy, 8 short prompts)
    short = [p[:64] for p in prompts[:8]]
    eager = Sampler(model, max_batch=8, max_seq_len=96, cuda_graphs=False).generate(short, 16, temperature=0)
    graphed = Sampler(model, max_batch=8, max_seq_len=96).generate(short, 16, temperature=0)
    res["greedy_graphs_equal_eager"] = [o.tokens for o in eager] == [o.tokens for o in graphed]
    res.update(_time_sampler(model, prompts, plens, olens))
    step_kernels.FUSED = False          # norms, rotary + store, SiLU * up and sampling as torch's operators
    res.update({k + "_unfused": v for k, v in _time_sampler(model, prompts, plens, olens).items()})
    step_kernels.FUSED = True
    res["fused_speedup"] = res["ours_s_unfused"] / res["ours_s"]
    res["kernels"] = _kernel_profile(model, prompts[:64])
    res.update(_hf_generate(model, cfg, prompts, olens, 5 if SMOKE else 40))
    res["speedup_vs_hf"] = res["ours_tok_s"] / res["hf_tok_s"]
    return res


def _time_sampler(model, prompts, plens, olens):
    """A fresh sampler (its graphs captured first), the second of two generate calls timed: tok/s,
    where the GPU time goes, and the launches of one eager step."""
    dev, n = _dev(), len(prompts)
    sampler = Sampler(model, max_batch=n, max_seq_len=max(p + o for p, o in zip(plens, olens)))
    t0 = time.perf_counter()
    sampler.capture()
    res = {"capture_s": time.perf_counter() - t0}
    events, calls = [], {"decode": 0, "prefill": 0}
    for name in ("_decode", "_prefill"):
        orig = getattr(sampler, name)

        def timed(*a, _orig=orig, _name=name.strip("_")):
            calls[_name] += 1
            if dev.type == "cuda":
                e = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                e[0].record()
                out = _orig(*a)
                e[1].record()
                events.append((_name, e))
                return out
            return _orig(*a)
        setattr(sampler, name, timed)
    for _ in range(2):     # the first run loads kernels for the prefill's shapes (lazily, as cuBLAS picks them)
        events.clear()
        calls.update(decode=0, prefill=0)
        _sync()
        t0 = time.perf_counter()
        outs = sampler.generate(prompts, olens, temperature=1.0, seed=0)
        _sync()
        t = time.perf_counter() - t0
    assert sum(len(o.tokens) for o in outs) == sum(olens)
    gpu = {k: sum(a.elapsed_time(b) for name, (a, b) in events if name == k) / 1e3 for k in calls} if events else {}
    res.update(ours_s=t, ours_tok_s=sum(olens) / t, decode_calls=calls["decode"], prefill_calls=calls["prefill"],
               gpu_busy_share=(sum(gpu.values()) / t) if gpu else None, decode_gpu_s=gpu.get("decode"),
               prefill_gpu_s=gpu.get("prefill"))
    res["eager_step_ops"], res["eager_step_triton"] = _step_ops(sampler, n)
    return res


def _hf_generate(model, cfg, prompts, olens, cap):
    """transformers' generate on the same weights: one left-padded batch, every row to the longest
    budget (only each row's budget counted), stopped after `cap` seconds."""
    import transformers
    dev = _dev()
    hf_cfg = transformers.Qwen2Config(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "torch_dtype")})
    with torch.device(dev):
        hf = transformers.Qwen2ForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=dev)
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=dev)
    with torch.inference_mode():
        _sync()
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=max(olens),
                          min_new_tokens=max(olens), eos_token_id=None, pad_token_id=0, max_time=cap)
        _sync()
        t = time.perf_counter() - t0
    made = out.shape[1] - width                                          # steps HF took before the cap
    tokens = sum(min(o, made) for o in olens)
    return {"hf_s": t, "hf_tokens": tokens, "hf_tok_s": tokens / t, "hf_capped": made < max(olens),
            "transformers": transformers.__version__}


def _kernel_profile(model, prompts, top=15):
    """Where the device time goes: the kernels that take the most in one prefill of `prompts` and in
    8 eager decode steps of as many sequences, each as [name, calls, total us]."""
    from torch.profiler import ProfilerActivity, profile
    dev = _dev()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sampler = Sampler(model, max_batch=len(prompts), max_seq_len=max(map(len, prompts)) + 16, cuda_graphs=False)
    sampler.generate(prompts[:2], 2, temperature=1.0, seed=1)              # compiles the kernels
    b = len(prompts)

    def table(prof):
        key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
        rows = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))[:top]
        return [[e.key[:80], e.count, round(getattr(e, key), 1)] for e in rows]
    with profile(activities=acts) as prefill:
        sampler.generate(prompts, 1, temperature=1.0, seed=0)              # prefill (and its first token)
        _sync()
    sampler.running[:b], sampler.budget[:b] = True, 1 << 30                # the prefilled lanes, decoding on
    with profile(activities=acts) as decode, torch.inference_mode():     # as generate runs it
        for _ in range(8):
            sampler._step(b, False, 1.0)
        _sync()
    return {"prefill_tokens": sum(map(len, prompts)), "prefill": table(prefill), "decode_steps": 8,
            "decode_batch": b, "decode": table(decode)}


def _step_ops(sampler, b):
    """Operators an eager decode step of bucket b dispatches and Triton kernels it launches (the
    launches a CUDA graph replaces)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))
    triton_calls, real = [], paged_kernels.run_kernel
    paged_kernels.run_kernel = lambda name, *a: triton_calls.append(name) or real(name, *a)
    try:
        with torch.inference_mode(), Count():
            sampler._step(b, False, 1.0)
    finally:
        paged_kernels.run_kernel = real
    return Count.n, len(triton_calls)


def gpu_decode():
    """Paged decode attention (B 256, 14/2 heads, hd 64, contexts U[356, 1536], bf16) vs its torch
    reference vs SDPA on a padded cache; and the batched prefill kernel vs its reference."""
    import torch.nn.functional as F
    dev = _dev()
    B, nh, nkv, hd, bs = (4, 14, 2, 64, 16) if SMOKE else (256, 14, 2, 64, 16)
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(356, 1537, (B,), generator=g)
    nblk = (ctx + bs - 1) // bs
    width, total = int(nblk.max()), int(nblk.sum())
    kc = torch.randn(total + 1, bs, nkv, hd, generator=g).to(dev, torch.bfloat16)
    vc = torch.randn(total + 1, bs, nkv, hd, generator=g).to(dev, torch.bfloat16)
    perm, bt, off = (torch.randperm(total, generator=g) + 1).int(), torch.zeros(B, width, dtype=torch.int32), 0
    for b in range(B):
        bt[b, :int(nblk[b])] = perm[off:off + int(nblk[b])]
        off += int(nblk[b])
    bt, lens = bt.to(dev), ctx.int().to(dev)
    q = torch.randn(B, nh, hd, generator=g).to(dev, torch.bfloat16)
    T = width * bs
    pos = torch.arange(T, device=dev)
    slots = bt.long()[:, pos // bs] * bs + pos % bs
    kp = kc.reshape(-1, nkv, hd)[slots].transpose(1, 2).contiguous()
    vp = vc.reshape(-1, nkv, hd)[slots].transpose(1, 2).contiguous()
    mask = (pos < lens[:, None])[:, None, None, :]
    gb = float(ctx.sum()) * nkv * hd * 2 * 2 / 1e9
    res = {"B": B, "kv_gb_read": gb}
    runs = {"ours": lambda: paged_kernels.decode_attention(q, kc, vc, bt, lens, hd ** -0.5),
            "torch_ref": lambda: paged_kernels.decode_attention_ref(q, kc, vc, bt, lens, hd ** -0.5),
            "sdpa_padded_gqa": lambda: F.scaled_dot_product_attention(q[:, :, None], kp, vp, attn_mask=mask,
                                                                      scale=hd ** -0.5, enable_gqa=True)}
    for name, fn in runs.items():
        s = _best(fn, 20)
        res[name] = {"us": s * 1e6, "gb_s": gb / s}
    res["max_abs_err_ours_vs_ref"] = float((runs["ours"]().float() - runs["torch_ref"]().float()).abs().max())
    res["speedup_vs_sdpa"] = res["sdpa_padded_gqa"]["us"] / res["ours"]["us"]
    # prefill: the first min(ctx, 512) tokens of every sequence as new queries
    ql = ctx.clamp(max=512).int().to(dev)
    qs = (ql.cumsum(0) - ql).int()
    qq = torch.randn(int(ql.sum()), nh, hd, generator=g).to(dev, torch.bfloat16)
    cl = ql.clone()
    pre = {"ours": lambda: paged_kernels.prefill_attention(qq, kc, vc, bt, qs, ql, cl, hd ** -0.5, int(ql.max())),
           "torch_ref": lambda: paged_kernels.prefill_attention_ref(qq, kc, vc, bt, qs, ql, cl, hd ** -0.5)}
    res["prefill"] = {"tokens": int(ql.sum())}
    for name, fn in pre.items():
        res["prefill"][name + "_ms"] = _best(fn, 5) * 1e3
    res["prefill"]["max_abs_err"] = float((pre["ours"]().float() - pre["torch_ref"]().float()).abs().max())
    return res


def gpu_logprob():
    """Fused log-prob forward + backward vs log_softmax + gather, N 8,192, V 151,936, H 896: bf16,
    and fp32 with TF32 (what the trainer passes on CUDA)."""
    dev = _dev()
    N, V, H = (64, 512, 32) if SMOKE else (8192, 151936, 896)
    res = {"N": N, "V": V, "H": H}
    torch.backends.cuda.matmul.allow_tf32 = True
    for name, dtype, naive in (("naive_bf16", torch.bfloat16, True), ("ours_bf16", torch.bfloat16, False),
                               ("ours_fp32_tf32", torch.float32, False), ("naive_fp32_tf32", torch.float32, True)):
        res[name] = _logprob_case(dev, N, V, H, dtype, naive)
    return res


def _logprob_case(dev, N, V, H, dtype, naive):
    import logprobs
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.empty(N, H, device=dev, dtype=dtype).normal_(generator=g).requires_grad_()
    w = torch.empty(V, H, device=dev, dtype=dtype).normal_(0, H ** -0.5, generator=g).requires_grad_()
    t = torch.randint(0, V, (N,), device=dev, generator=g)

    def step():
        h.grad = w.grad = None
        lp = (torch.log_softmax((h @ w.T).float(), -1).gather(1, t[:, None])[:, 0] if naive
              else logprobs.token_logprobs(h, w, t))
        lp.sum().backward()
    s = _best(step, 3)
    peak = None
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {"s": s, "peak_mb": peak}


def gpu_sft():
    """One SFT step at the 0.5B shape as sft.py runs it on CUDA (fp32 weights, bf16 autocast, TF32,
    fused AdamW): packed rows of documents (attention within each), and plain causal rows; tokens/s and MFU."""
    import sft
    dev, cfg = _dev(), _qwen05()
    B, T, doc = (2, 64, 16) if SMOKE else (4, 2048, 512)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    with torch.device(dev):
        model = Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=dev)
    res, flops = {"params": num_params(model), "tokens_per_step": B * T}, 6 * num_params(model) * B * T
    for name, docs, pos in (("packed_docs", [doc] * (B * T // doc), (torch.arange(T, device=dev) % doc).expand(B, T)),
                            ("causal_rows", None, None)):
        batch = sft.Batch(ids, pos, docs, ids.roll(-1, 1), None, [], B * T, B * T)

        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                loss, _ = sft.sft_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        s = _best(step, 3)
        res[name] = {"s": s, "tok_s": B * T / s, "mfu": flops / s / PEAK_BF16}
    return res


def gpu_kernels():
    """The kernel and sampler tests, compiled for the GPU (not the interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["NANOSATORI_KERNELS"] = "triton"           # a kernel that fails to compile fails its test
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_kernels.py", "tests/test_rollout.py"],
                       capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
    return {"rc": r.returncode, "summary": r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "",
            "tail": (r.stdout + r.stderr)[-1500:] if r.returncode else ""}


GPU_PARTS = {"sampler": (gpu_sampler, 170), "decode": (gpu_decode, 50), "logprob": (gpu_logprob, 50),
             "kernels": (gpu_kernels, 120), "sft": (gpu_sft, 50)}


def run(parts, smoke, json_path, machine):
    """Every part in its own process with its own time limit -> {part: figures or error}; the figures
    so far are written to json_path after every part (a cut-off run keeps what it measured)."""
    env = dict(os.environ, BENCH_SMOKE="1" if smoke else "0")
    env.pop("TRITON_INTERPRET", None)
    res = {"bench": "gpu", "machine": machine if not smoke else "smoke (CPU)", "torch": torch.__version__}
    for name in parts:
        if smoke and name == "kernels":
            continue
        fn, limit = GPU_PARTS[name]
        t = time.time()
        try:
            r = subprocess.run([sys.executable, os.path.abspath(__file__), name], env=env,
                               capture_output=True, text=True, timeout=limit)
            line = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else ""
            res[name] = json.loads(line) if line else {"error": f"exit {r.returncode}: {r.stderr[-1500:]}"}
        except subprocess.TimeoutExpired:
            res[name] = {"error": f"timed out after {limit} s"}
        res[name]["wall_s"] = round(time.time() - t, 1)
        print(f"{name:8s} {json.dumps(res[name])[:600]}", flush=True)
        with open(json_path, "w") as fh:
            json.dump(res, fh, indent=2)
    return res


if __name__ == "__main__":            # one part: a child of run(), or by hand
    if len(sys.argv) != 2 or sys.argv[1] not in GPU_PARTS:
        raise SystemExit(f"usage: python bench_gpu.py PART, PART one of {', '.join(GPU_PARTS)}")
    print(json.dumps(GPU_PARTS[sys.argv[1]][0]()))
