"""Benchmarks against peers measured in the same run; prints each figure and the ratio.

    python bench.py sampler --workload=rl   # RL rollouts of the shipped base: 16 questions x 8 samples, ours vs generate
    python bench.py sampler                 # ours vs transformers' generate (CPU: ~3M-param model, fixed lengths)
    python bench.py sampler --gpu-shape     # Qwen2.5-0.5B's shape in bf16, 256 ragged prompts (CUDA)
    python bench.py logprob                 # fused log-prob vs log_softmax + gather: time and peak memory
    python bench.py gpu                     # everything that needs one H100/H200, in <= 8 min (--smoke: tiny, on CPU)
    python bench.py memory --model=7b --act_ckpt   # GiB per GPU of every stage under FSDP2 on 8 x 80 GB: a plan, no GPU
    python bench.py shard                   # 2 CPU processes, full copy vs FSDP2: peak memory of SFT steps, and of loading

Every run writes its raw figures as JSON (--json PATH; `gpu`: $OUT/bench_gpu.json when $OUT is set;
`memory` prints them as its last line, and writes a file only with --json or $OUT/bench_memory.json).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from model import ModelConfig, Transformer, num_params
import memory_plan
from memory_plan import bench_memory, qwen25, SATORI_MICRO_BATCH, SATORI_SEQ_LEN
from rollout import Sampler

def machine():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _timed(fn, device, repeat):
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _sampler_case(args):
    """(model config, dtype, prompt lengths, output lengths, prompts) of a sampler benchmark."""
    if args.gpu_shape:
        cfg = qwen25("0.5b", max_position_embeddings=4096)
        dtype = torch.bfloat16
    else:                # ~3M parameters
        cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
        dtype = torch.float32
    g = torch.Generator().manual_seed(0)
    if args.gpu_shape:   # prompt and output lengths uniform in [100, 1024]
        plens = torch.randint(100, 1025, (args.prompts,), generator=g).tolist()
        olens = torch.randint(100, 1025, (args.prompts,), generator=g).tolist()
    else:
        plens, olens = [args.prompt_len] * args.prompts, [args.new_tokens] * args.prompts
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in plens]
    return cfg, dtype, plens, olens, prompts


def bench_sampler(args):
    """Output tokens/s of our sampler and of transformers' generate on the same random-weight model,
    the same prompts and the same number of new tokens (sampling at temperature 1, EOS ignored)."""
    import transformers
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg, dtype, plens, olens, prompts = _sampler_case(args)
    torch.manual_seed(0)
    ours = Transformer(cfg).to(device=device, dtype=dtype).eval()
    hf_cfg = transformers.Qwen2Config(**{k: v for k, v in cfg.to_hf().items() if k not in ("architectures", "torch_dtype")})
    hf = transformers.Qwen2ForCausalLM(hf_cfg).to(device=device, dtype=dtype).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)   # same weights (lm_head is tied)
    sampler = Sampler(ours, max_batch=args.prompts, max_seq_len=max(p + o for p, o in zip(plens, olens)))

    def run_ours():
        outs = sampler.generate(prompts, olens, temperature=1.0, seed=0)
        assert sum(len(o.tokens) for o in outs) == sum(olens)

    # transformers has one length per batch: equal-length rows when they are equal, else one
    # prompt at a time would be unfair, so it runs left-padded batches of the same prompts
    # with max_new_tokens = the longest output, and only the requested tokens are counted.
    width = max(plens)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    hf_batch = args.hf_batch or args.prompts

    def run_hf():
        for i in range(0, args.prompts, hf_batch):
            out = hf.generate(ids[i:i + hf_batch], attention_mask=attn[i:i + hf_batch], do_sample=True,
                              temperature=1.0, top_k=0, max_new_tokens=max(olens), min_new_tokens=max(olens),
                              eos_token_id=None, pad_token_id=0)
            assert out.shape[1] == width + max(olens)

    with torch.inference_mode():
        run_ours(), run_hf()   # warm-up
        t_ours = _timed(run_ours, device, args.repeat)
        t_hf = _timed(run_hf, device, args.repeat)
    n_tok = sum(olens)
    res = {"bench": "sampler", "machine": machine(), "device": device.type, "dtype": str(dtype),
           "model": cfg.to_hf(), "params": sum(p.numel() for p in ours.parameters()), "prompts": args.prompts,
           "prompt_lens": [min(plens), max(plens)], "output_lens": [min(olens), max(olens)], "output_tokens": n_tok,
           "ours_s": t_ours, "hf_s": t_hf, "ours_tok_s": n_tok / t_ours, "hf_tok_s": n_tok / t_hf,
           "ratio": t_hf / t_ours, "torch": torch.__version__, "transformers": transformers.__version__}
    print(f"sampler on {res['machine']}: {res['params'] / 1e6:.1f}M params, {args.prompts} prompts, {n_tok} output tokens")
    print(f"  ours             {res['ours_tok_s']:10.0f} tok/s  ({t_ours:.2f} s)")
    print(f"  HF generate      {res['hf_tok_s']:10.0f} tok/s  ({t_hf:.2f} s)")
    print(f"  ratio            {res['ratio']:10.2f}x")
    return res


def bench_rl_rollouts(args):
    """The workload the sampler exists for: the shipped base model answers 16 built-in task
    questions 8 times each (temperature 1, at most 128 new tokens, stop at the end token), ours vs
    transformers' generate on the same weights in one left-padded batch. Tokens are counted up to
    and including each answer's stop token."""
    import transformers
    import data
    from tokenizer import Tokenizer
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "base")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = Tokenizer.from_pretrained(path)
    questions = data.builtin_split(data.TaskConfig(n_steps=3, min_steps=2, max_operand=20, mul_max=5, max_value=99),
                                   0, 16, seed=0)[1]
    prompts = [tok.encode_prompt(q["question"]) for q in questions for _ in range(8)]
    ours = Transformer.from_pretrained(path, device=device).eval()
    hf = transformers.Qwen2ForCausalLM.from_pretrained(path).to(device).eval()
    sampler = Sampler(ours, max_batch=len(prompts), max_seq_len=max(map(len, prompts)) + 128)
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    stop = tok.stop_ids
    counts = {}

    def run_ours():
        counts["ours"] = sum(len(o.tokens) for o in sampler.generate(prompts, 128, temperature=1.0, stop_ids=stop, seed=0))

    def run_hf():
        out = hf.generate(ids, attention_mask=attn, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=128,
                          eos_token_id=stop, pad_token_id=tok.pad_id)[:, width:].tolist()
        counts["hf"] = sum(next((i + 1 for i, t in enumerate(row) if t in stop), len(row)) for row in out)

    with torch.inference_mode():
        run_ours(), run_hf()   # warm-up
        t_ours = _timed(run_ours, device, args.repeat)
        t_hf = _timed(run_hf, device, args.repeat)
    res = {"bench": "sampler_rl", "machine": machine(), "device": device.type, "prompts": len(prompts),
           "ours_s": t_ours, "hf_s": t_hf, "ours_tokens": counts["ours"], "hf_tokens": counts["hf"],
           "ours_tok_s": counts["ours"] / t_ours, "hf_tok_s": counts["hf"] / t_hf,
           "ratio": (counts["ours"] / t_ours) / (counts["hf"] / t_hf),
           "torch": torch.__version__, "transformers": transformers.__version__}
    print(f"RL rollouts on {res['machine']}: shipped base, 16 questions x 8 samples, <= 128 new tokens")
    print(f"  ours             {res['ours_tok_s']:10.0f} tok/s  ({t_ours:.2f} s, {counts['ours']} tokens)")
    print(f"  HF generate      {res['hf_tok_s']:10.0f} tok/s  ({t_hf:.2f} s, {counts['hf']} tokens)")
    print(f"  ratio            {res['ratio']:10.2f}x")
    return res


def _logprob_inputs(n, vocab, hidden, device, dtype):
    # Filled in place, so that making the inputs leaves no transient peak behind.
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.empty(n, hidden, device=device, dtype=dtype).normal_(generator=g).requires_grad_()
    w = torch.empty(vocab, hidden, device=device, dtype=dtype).normal_(0, hidden ** -0.5, generator=g)
    t = torch.randint(0, vocab, (n,), device=device, generator=g)
    return h, w.requires_grad_(), t


def _logprob_step(variant, h, w, t):
    """Forward + backward of sum(log p(target)); returns (log-probs, grad of hidden)."""
    import logprobs
    h.grad = w.grad = None
    if variant == "naive":     # the [N, V] logits and log-softmax, as most trainers write it
        lp = torch.log_softmax((h @ w.T).float(), dim=-1).gather(1, t[:, None])[:, 0]
    else:
        lp = logprobs.token_logprobs(h, w, t)
    lp.sum().backward()
    return lp.detach(), h.grad


def _logprob_worker(variant, n, vocab, hidden):
    """Runs in a fresh process (CPU): peak RSS of one forward + backward over the inputs' own RSS."""
    import resource
    h, w, t = _logprob_inputs(n, vocab, hidden, torch.device("cpu"), torch.float32)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss       # KiB on Linux
    t0 = time.perf_counter()
    lp, gh = _logprob_step(variant, h, w, t)
    sec = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": variant, "s": sec, "inputs_mb": base / 1024, "peak_mb": (peak - base) / 1024,
                      "logp_sum": lp.double().sum().item(), "grad_hidden_norm": gh.double().norm().item()}))


def bench_logprob(args):
    """Log-probs of N tokens over a V vocabulary (hidden H), forward + backward (grads of hidden and
    weight): naive log_softmax(hidden @ weight.T).gather vs logprobs.token_logprobs. On CPU (fp32, the
    chunked torch path) each variant runs in its own process and its peak is the growth of max RSS
    beyond the inputs; on CUDA (bf16, the Triton kernels) torch.cuda.max_memory_allocated beyond the
    inputs, timed with CUDA events (median of --repeat after a warm-up)."""
    import subprocess
    import sys
    n, vocab, hidden = args.n, args.vocab, args.hidden
    res = {"bench": "logprob", "machine": machine(), "n": n, "vocab": vocab, "hidden": hidden,
           "torch": torch.__version__, "grads": "hidden and weight"}
    if torch.cuda.is_available():
        device = torch.device("cuda")
        res.update(device="cuda", dtype="torch.bfloat16")
        h, w, t = _logprob_inputs(n, vocab, hidden, device, torch.bfloat16)
        for variant in ("naive", "ours"):
            _logprob_step(variant, h, w, t)                            # warm-up (and Triton compile)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            times = []
            for _ in range(args.repeat):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                lp, gh = _logprob_step(variant, h, w, t)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            res[variant] = {"s": statistics.median(times), "peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20,
                            "logp_sum": lp.double().sum().item(), "grad_hidden_norm": gh.double().norm().item()}
            del lp, gh
            h.grad = w.grad = None
    else:
        res.update(device="cpu", dtype="torch.float32", threads=torch.get_num_threads())
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # the torch path
        here = os.path.dirname(os.path.abspath(__file__))
        for variant in ("naive", "ours"):
            code = f"import bench; bench._logprob_worker({variant!r}, {n}, {vocab}, {hidden})"
            r = subprocess.run([sys.executable, "-c", code], cwd=here, env=env, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"logprob bench, {variant}: exit {r.returncode} (out of memory?)\n{r.stderr[-2000:]}")
            res[variant] = json.loads(r.stdout.strip().splitlines()[-1])
    naive, ours = res["naive"], res["ours"]
    res["peak_ratio"] = ours["peak_mb"] / naive["peak_mb"]
    res["time_ratio"] = ours["s"] / naive["s"]
    print(f"logprob fwd+bwd on {res['machine']} ({res['device']}, {res['dtype']}): N={n} V={vocab} H={hidden}")
    print(f"  naive log_softmax+gather  peak {naive['peak_mb']:9.0f} MB  {naive['s']:8.3f} s")
    print(f"  logprobs.token_logprobs    peak {ours['peak_mb']:9.0f} MB  {ours['s']:8.3f} s")
    print(f"  ours / naive              peak {res['peak_ratio']:9.3f}     time {res['time_ratio']:6.2f}x")
    print(f"  agreement: sum log p {naive['logp_sum']:.6g} vs {ours['logp_sum']:.6g}, "
          f"|grad hidden| {naive['grad_hidden_norm']:.6g} vs {ours['grad_hidden_norm']:.6g}")
    return res

# ------------------------------------------------------------------------------------------------
# bench.py gpu: each part in its own process with its own time limit, so one that crashes or hangs
# leaves the others; --smoke runs every part at tiny shapes on the CPU (a test does).

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
    (decode steps as CUDA graphs) vs transformers' generate on the same weights (one run, capped)."""
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
    sampler = Sampler(model, max_batch=n, max_seq_len=max(p + o for p, o in zip(plens, olens)))
    t0 = time.perf_counter()
    sampler.capture()
    res["capture_s"] = time.perf_counter() - t0
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
    sampler.generate(prompts[:8], 4, temperature=1.0, seed=1)            # warm-up (prefill kernels)
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
    res["eager_step_ops"] = _step_ops(sampler, n)
    del sampler
    res.update(_hf_generate(model, cfg, prompts, olens, 5 if SMOKE else 40))
    res["speedup_vs_hf"] = res["ours_tok_s"] / res["hf_tok_s"]
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


def _step_ops(sampler, b):
    """Operators an eager decode step of bucket b dispatches (the launches a CUDA graph replaces)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))
    with torch.inference_mode(), Count():
        sampler._step(b, False, 1.0)
    return Count.n


def gpu_decode():
    """Paged decode attention (B 256, 14/2 heads, hd 64, contexts U[356, 1536], bf16) vs its torch
    reference vs SDPA on a padded cache; and the batched prefill kernel vs its reference."""
    import paged_kernels
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
             "kernels": (gpu_kernels, 90), "sft": (gpu_sft, 50)}


def bench_gpu(args):
    """Every part in its own process with its own time limit -> {part: figures or error}."""
    env = dict(os.environ, BENCH_SMOKE="1" if args.smoke else "0")
    env.pop("TRITON_INTERPRET", None)
    res = {"bench": "gpu", "machine": machine() if not args.smoke else "smoke (CPU)", "torch": torch.__version__}
    for name in args.parts.split(","):
        if args.smoke and name == "kernels":
            continue
        fn, limit = GPU_PARTS[name]
        t = time.time()
        try:
            r = subprocess.run([sys.executable, os.path.abspath(__file__), "gpu-part", "--part", name], env=env,
                               capture_output=True, text=True, timeout=limit)
            line = r.stdout.strip().splitlines()[-1] if r.returncode == 0 and r.stdout.strip() else ""
            res[name] = json.loads(line) if line else {"error": f"exit {r.returncode}: {r.stderr[-1500:]}"}
        except subprocess.TimeoutExpired:
            res[name] = {"error": f"timed out after {limit} s"}
        res[name]["wall_s"] = round(time.time() - t, 1)
        print(f"{name:8s} {json.dumps(res[name])[:600]}", flush=True)
        with open(args.json or _out_json("gpu"), "w") as fh:   # after every part: a cut-off run keeps what it measured
            json.dump(res, fh, indent=2)
    return res


def _out_json(what):
    name = f"bench_{what}.json"
    return os.path.join(os.environ["OUT"], name) if os.environ.get("OUT") else name

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["sampler", "logprob", "gpu", "gpu-part", "memory", "shard", "shard-part"])
    ap.add_argument("--shard", default="fsdp", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="gpu: every part at tiny shapes on the CPU")
    ap.add_argument("--parts", default=",".join(GPU_PARTS), help="gpu: which parts, in order")
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="where to write the raw figures (default bench_<what>.json)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--workload", choices=["fixed", "rl"], default="fixed", help="sampler: fixed lengths or RL rollouts")
    ap.add_argument("--gpu-shape", action="store_true", help="Qwen2.5-0.5B shape, bf16, ragged [100, 1024] lengths")
    ap.add_argument("--hf-batch", type=int, default=0, help="transformers' batch size (default: all prompts)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--n", type=int, default=8192, help="logprob: tokens")
    ap.add_argument("--vocab", type=int, default=151936, help="logprob: vocabulary")
    ap.add_argument("--hidden", type=int, default=896, help="logprob: hidden size")
    ap.add_argument("--model", default="7b", help="memory: 0.5b | 1.5b | 7b (Qwen2.5 shapes) or a config.json")
    ap.add_argument("--world", type=int, default=8, help="memory: GPUs FSDP2 shards over")
    ap.add_argument("--gpu_gb", type=float, default=80.0, help="memory: GiB of one GPU")
    ap.add_argument("--margin", type=float, default=0.06, help="memory: share of --gpu_gb kept free")
    ap.add_argument("--act_ckpt", action="store_true", help="memory: activation checkpointing per decoder block")
    ap.add_argument("--micro_batch", type=int, default=SATORI_MICRO_BATCH, help="memory: sequences per forward")
    ap.add_argument("--seq_len", type=int, default=SATORI_SEQ_LEN, help="memory: tokens a sequence (prompt + response)")
    ap.add_argument("--rl_batch", type=int, default=0, help="memory: sampled sequences per RL step (0: config.py's)")
    args = ap.parse_args()
    if args.what == "shard-part":                # a torchrun child of `shard`
        if args.shard.startswith("ppo-"):
            return memory_plan.ppo_part(args.shard.removeprefix("ppo-"))
        if args.shard.startswith("load-"):
            return memory_plan.load_part(args.shard.removeprefix("load-"), args.model)
        return memory_plan.shard_part(args.shard)
    if args.what == "gpu-part":                  # a child of `gpu`: one part, its JSON on the last line
        print(json.dumps(GPU_PARTS[args.part][0]()))
        return
    if args.what == "memory":                    # a JSON line; a file with --json or $OUT only (it is cheap)
        if min(args.world, args.micro_batch, args.seq_len) < 1 or args.rl_batch < 0 or not 0 <= args.margin < 1:
            raise SystemExit("memory: expected --world, --micro_batch, --seq_len >= 1, --rl_batch >= 0, "
                             "--margin in [0, 1)")
        res = bench_memory(args)
        print(json.dumps(res))
        if args.json or os.environ.get("OUT"):
            with open(args.json or _out_json("memory"), "w") as fh:
                json.dump(res, fh, indent=2)
        return
    if args.what == "sampler" and args.workload == "rl":
        res = bench_rl_rollouts(args)
    elif args.what == "gpu":
        res = bench_gpu(args)
    elif args.what == "shard":
        res = memory_plan.bench_shard(machine())
    else:
        res = {"sampler": bench_sampler, "logprob": bench_logprob}[args.what](args)
    default = _out_json("gpu") if args.what == "gpu" else f"bench_{args.what}.json"
    with open(args.json or default, "w") as fh:
        json.dump(res, fh, indent=2)
    print("wrote", args.json or default)


if __name__ == "__main__":
    main()
