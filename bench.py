"""Benchmarks against peers measured in the same run; prints each figure and the ratio.

    python bench.py sampler --workload=rl   # RL rollouts of the shipped base: 16 questions x 8 samples, ours vs generate
    python bench.py sampler                 # ours vs transformers' generate (CPU: ~3M-param model, fixed lengths)
    python bench.py sampler --gpu-shape     # Qwen2.5-0.5B's shape in bf16, 256 ragged prompts (CUDA)
    python bench.py logprob                 # fused log-prob vs log_softmax + gather: time and peak memory
    python bench.py gpu                     # everything that needs one H100/H200, in <= 8 min (bench_gpu.py; --smoke: tiny, on CPU)
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

from model import ModelConfig, Transformer
import memory_plan
from memory_plan import bench_memory, qwen25, SATORI_MICRO_BATCH, SATORI_SEQ_LEN
from rollout import Sampler
import bench_gpu


def machine():
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _timed(fns, device, repeat):
    """Median seconds of each of fns, called in turn `repeat` times: interleaved, so that a slow
    spell of the machine (a VM's speed drifts by tens of percent) weighs on both sides alike."""
    times = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


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
        t_ours, t_hf = _timed((run_ours, run_hf), device, args.repeat)
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
        t_ours, t_hf = _timed((run_ours, run_hf), device, args.repeat)
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

def _out_json(what):
    name = f"bench_{what}.json"
    return os.path.join(os.environ["OUT"], name) if os.environ.get("OUT") else name

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["sampler", "logprob", "gpu", "memory", "shard", "shard-part"])
    ap.add_argument("--shard", default="fsdp", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true", help="gpu: every part at tiny shapes on the CPU")
    ap.add_argument("--parts", default=",".join(bench_gpu.GPU_PARTS), help="gpu: which parts, in order")
    ap.add_argument("--json", default=None, help="where to write the raw figures (default bench_<what>.json)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--workload", choices=["fixed", "rl"], default="fixed", help="sampler: fixed lengths or RL rollouts")
    ap.add_argument("--gpu-shape", action="store_true", help="Qwen2.5-0.5B shape, bf16, ragged [100, 1024] lengths")
    ap.add_argument("--hf-batch", type=int, default=0, help="transformers' batch size (default: all prompts)")
    ap.add_argument("--repeat", type=int, default=5)
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
    if args.repeat < 1:                          # before any model is built
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.what == "shard-part":                # a torchrun child of `shard`
        if args.shard.startswith("ppo-"):
            return memory_plan.ppo_part(args.shard.removeprefix("ppo-"))
        if args.shard.startswith("load-"):
            return memory_plan.load_part(args.shard.removeprefix("load-"), args.model)
        return memory_plan.shard_part(args.shard)
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
        parts = args.parts.split(",")
        if unknown := [p for p in parts if p not in bench_gpu.GPU_PARTS]:
            raise SystemExit(f"gpu: unknown --parts {','.join(unknown)}; expected some of {','.join(bench_gpu.GPU_PARTS)}")
        res = bench_gpu.run(parts, args.smoke, args.json or _out_json("gpu"), machine())
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
