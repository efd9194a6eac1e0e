"""What every stage of the pipeline would hold on each GPU of one node under FSDP2, computed from the
modules' shapes (built on the meta device: no memory, no GPU): a plan, not a measurement. And one
measurement the CPU allows: the peak memory per process of FSDP2 against a full copy per process.

    python bench.py memory --model=7b --act_ckpt      # GiB per GPU of every stage on 8 x 80 GB
    python bench.py shard                             # peak RSS per process, 2 CPU processes
"""
import json
import os
import subprocess
import sys

import torch

from model import ModelConfig, Transformer, ValueModel, num_params

QWEN25 = {   # the published Qwen2.5 config.json shapes (all: rope_theta 1e6, rms_norm_eps 1e-6)
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}


def qwen25(size, max_position_embeddings=32768):
    return ModelConfig(**QWEN25[size], max_position_embeddings=max_position_embeddings, rope_theta=1e6,
                       torch_dtype="bfloat16")



GIB = 2 ** 30
# Satori's 7B PPO on one node of 8 GPUs (its examples/satori/train.sh): micro_train_batch_size 1,
# prompt_max_len 1024 + generate_max_len 3072; config.py's micro_batch 16 x rl_max_new_tokens 128 is toy-sized
SATORI_MICRO_BATCH, SATORI_SEQ_LEN = 1, 1024 + 3072


def _plan_config(spec):
    """(ModelConfig, name) of 0.5b | 1.5b | 7b, or of a config.json (or the directory holding one)."""
    if spec.lower() in QWEN25:
        return qwen25(spec.lower()), f"Qwen2.5-{spec.upper()}"
    path = os.path.join(spec, "config.json") if os.path.isdir(spec) else spec
    try:
        with open(path) as fh:
            return ModelConfig.from_hf(json.load(fh), path), path
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model={spec}: {e}") from None


def _layer_act_bytes(block):
    """Bytes per token that autograd saves in one decoder block with bf16 activations and a
    flash-style attention (no [T, T] scores), from the block's shapes: each RMSNorm its fp32 input,
    1/rms and the bf16 normed x; q/k/v's input; the rotated q and k, v, the attention's output and
    fp32 log-sum-exp per head; the MLP's input, gate, silu(gate), up and their product. The rotary
    rows are shared by all blocks. (A test checks this against what a CPU forward saves.)"""
    a, m = block.self_attn, block.mlp
    h, q, kv, inter = a.q_proj.in_features, a.q_proj.out_features, a.k_proj.out_features, m.gate_proj.out_features
    norms = 2 * (4 * h + 4 + 2 * h)
    attn = 2 * h + 2 * q + 2 * kv + 2 * kv + 2 * q + 4 * a.n_heads
    return norms + attn + 2 * h + 4 * 2 * inter


def _train_bytes(model, tokens, act_ckpt):
    """The unsharded working set of training one model on a micro-batch of `tokens` under FSDP2 (a
    unit per decoder block, the rest in the root unit, which FSDP2 keeps unsharded from its forward
    to the end of its backward) -> bytes of (gathered bf16 parameters, saved activations,
    temporaries at the backward's worst moment beyond the saved activations)."""
    import logprobs
    blocks, h = model.model.layers, model.cfg.hidden_size
    blk = max(num_params(b) for b in blocks)
    root = num_params(model) - sum(num_params(b) for b in blocks)
    head = model.lm_head.weight if isinstance(model, Transformer) else model.score.weight
    layer = _layer_act_bytes(blocks[0]) * tokens
    gathered = 2 * root + 2 * 2 * blk                      # the root, a block and the next one (prefetch)
    # outside the blocks: token ids, rotary rows, the final norm, the head's input, log-prob and entropy
    outside = (8 + 4 * model.cfg.head_dim + 4 * h + 4 + 2 * h + 2 * h + 8) * tokens
    saved = len(blocks) * (2 * h * tokens if act_ckpt else layer) + outside
    V, H = head.shape
    head_tmp = 0
    if isinstance(model, Transformer):
        # logprobs' backward on GPU: a [chunk, V] bf16 dz (chunks of LOGPROB_CHUNK_BYTES x 16), the
        # weight's grad accumulated in fp32 from a bf16 partial and its fp32 copy, the hidden's grad
        chunk = min(tokens, logprobs.LOGPROB_CHUNK_BYTES * 16 // (V * 2)) * V * 2
        head_tmp = chunk + (4 + 2 + 4) * V * H + 4 * h * tokens
    # a block's backward: the head's bf16 grad held by the root, two blocks' bf16 grads and one fp32
    # reduce-scatter copy (reduce_dtype), the grads of its activations (taken as big as its saved
    # tensors) and, with checkpointing, the block recomputed
    block_tmp = 2 * head.numel() + 8 * blk + layer * (2 if act_ckpt else 1)
    end_tmp = 6 * root - saved           # at the end, activations freed: the root's grad and its fp32 copy
    return gathered, saved, max(head_tmp, block_tmp, end_tmp)


KIND = {"policy": "policy", "reference": "policy", "critic": "value", "orm": "value"}   # Transformer | ValueModel


def _plan_stages(cfg):
    """(stage, trained, frozen, sampler) as train.py builds them: models by role (KIND); sampler
    "apart" (it is freed before the model trains: stage orm, and the RL stages under FSDP2, whose
    sampler each step decodes from the policy gathered whole and is dropped before the update) or
    None."""
    import dataclasses
    from rl import algo_config

    def rl_models(algo, group):
        p = algo_config(dataclasses.replace(cfg, algo=algo), group)
        trained = ["policy"] + (["critic"] if p.adv_estimator == "gae" else [])
        frozen = ((["orm"] if cfg.orm and cfg.orm_reward else [])
                  + (["reference"] if p.kl_coef or p.kl_loss_coef else []))
        return trained, frozen, "apart"
    return [("pretrain,sft,distill", ["policy"], [], None), ("orm", ["orm"], ["policy"], "apart"),
            ("rl,rl2 (ppo)", *rl_models("ppo", cfg.rl_group)), ("rl (grpo)", *rl_models("grpo", cfg.grpo_group))]


def memory_plan(mcfg, world, micro_batch, seq_len, rl_batch, act_ckpt, cfg=None):
    """Bytes per rank of every stage trained with FSDP2 over `world` GPUs: fp32 master weights, their
    gradients and AdamW's two moments sharded; frozen models sharded in bf16; the working set of a
    micro-batch of micro_batch x seq_len tokens (_train_bytes); the sampler's gathered bf16 policy
    and paged KV cache for its share of rl_batch sequences of seq_len tokens. Sharded sizes are
    numel / world (FSDP2 pads dim 0 to a multiple of world: a few rows)."""
    from config import Config
    with torch.device("meta"):
        models = {"policy": Transformer(mcfg), "value": ValueModel(mcfg)}
    n = {k: num_params(m) for k, m in models.items()}
    work = {k: _train_bytes(m, micro_batch * seq_len, act_ckpt) for k, m in models.items()}
    kv_row = 2 * models["policy"].model.layers[0].self_attn.k_proj.out_features * 2 * mcfg.num_hidden_layers
    kv = max(1, rl_batch // world) * seq_len * kv_row
    rows = []
    for stage, trained, frozen, sampler in _plan_stages(cfg or Config()):
        p = sum(n[KIND[k]] for k in trained)
        g, a, t = max((work[KIND[k]] for k in trained), key=sum)      # the models train one after another
        r = {"stage": stage, "trained": trained, "frozen_models": frozen, "weights": 4 * p / world,
             "grads": 4 * p / world, "optimizer": 8 * p / world,
             "frozen": 2 * sum(n[KIND[k]] for k in frozen) / world, "gathered": g, "activations": a,
             "temporaries": t, "sampler": 2 * n["policy"] + kv if sampler else 0}
        held = r["weights"] + r["grads"] + r["optimizer"] + r["frozen"]
        r["total"] = held + max(g + a + t, r["sampler"])      # the sampler is freed before training
        rows.append(r)
    return {"params": n, "kv_cache": kv, "sampler_seqs": max(1, rl_batch // world), "stages": rows}


PLAN_COLS = {"weights": "weights", "grads": "grads", "optimizer": "optim", "frozen": "frozen", "gathered": "gathered",
             "activations": "activ", "temporaries": "temp", "sampler": "sampler", "total": "total"}


def bench_memory(args):
    """memory_plan's table for --model, and which stages fit under --gpu_gb less --margin (the CUDA
    context, NCCL's buffers, the allocator's fragmentation and whatever the plan leaves out)."""
    from config import Config
    cfg = Config()
    rl_batch = args.rl_batch or cfg.rl_batch
    mcfg, name = _plan_config(args.model)
    plan = memory_plan(mcfg, args.world, args.micro_batch, args.seq_len, rl_batch, args.act_ckpt, cfg)
    limit, n = args.gpu_gb * (1 - args.margin), plan["params"]
    satori = (args.micro_batch, args.seq_len) == (SATORI_MICRO_BATCH, SATORI_SEQ_LEN)
    print(f"memory plan, GiB per rank: {name} ({n['policy'] / 1e9:.2f}B parameters, {n['value'] / 1e9:.2f}B as "
          f"a value model), FSDP2 over {args.world} GPUs of {args.gpu_gb:g} GiB; a plan from the modules' shapes, "
          "not a measurement")
    print(f"  micro-batch {args.micro_batch} x {args.seq_len} tokens"
          + (" (Satori's 7B PPO on 8 GPUs: micro_train_batch_size 1, prompt 1024 + response 3072; config.py's "
             "micro_batch 16 x rl_max_new_tokens 128 is toy-sized)" if satori else "")
          + f", activation checkpointing {'on' if args.act_ckpt else 'off'}")
    print(f"  sampler: rl_batch {rl_batch}{' (config.py; Satori: 1024)' if not args.rl_batch else ''} / "
          f"{args.world} ranks = {plan['sampler_seqs']} sequences x {args.seq_len} tokens of KV cache "
          f"({plan['kv_cache'] / GIB:.2f} GiB) + the policy gathered in bf16; kl_coef {cfg.kl_coef:g}, "
          f"grpo_kl {cfg.grpo_kl:g}, orm_reward {cfg.orm_reward} (config.py)")
    print(f"  {'stage':21s}" + "".join(f"{c:>9s}" for c in PLAN_COLS.values()) + "  fits")
    res = {"bench": "memory", "model": name, "config": mcfg.to_hf(), "world": args.world, "gpu_gib": args.gpu_gb,
           "margin": args.margin, "limit_gib": round(limit, 3), "micro_batch": args.micro_batch,
           "seq_len": args.seq_len, "rl_batch": rl_batch, "act_ckpt": args.act_ckpt, "params": n, "stages": []}
    for r in plan["stages"]:
        gib = {k: round(r[k] / GIB, 3) for k in PLAN_COLS}
        fits = r["total"] / GIB <= limit
        spare = f"yes, {limit - r['total'] / GIB:.1f} spare" if fits else f"NO, {r['total'] / GIB - limit:.1f} over"
        print(f"  {r['stage']:21s}" + "".join(f"{v:9.2f}" for v in gib.values()) + f"  {spare}")
        res["stages"].append({"stage": r["stage"], "trained": r["trained"], "frozen_models": r["frozen_models"],
                              **gib, "fits": fits})
    for r in plan["stages"]:
        print(f"  {r['stage']}: trains {' + '.join(r['trained'])}; frozen: {' + '.join(r['frozen_models']) or '-'}")
    print(f"  fits: total <= {limit:.1f} GiB ({args.gpu_gb:g} GiB less a {args.margin:.0%} margin). Every "
          "sampler is freed before its stage trains (RL under FSDP2: each step), so a total is the larger phase.")
    return res


# -----------------------------------------------------------------------------
# bench.py shard: per-process peak memory of SFT steps of a ~50M-parameter model on 2 CPU processes,
# a full copy per process (--shard=none) vs FSDP2 (--shard=fsdp)

SHARD_CFG = ModelConfig(vocab_size=8000, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)


LOAD_CFG = ModelConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                       num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=512)


def load_part(how, path):
    """One torchrun process: the checkpoint at path loaded and sharded, whole first (how="whole") or
    straight into this process's shards (how="meta"); the growth of its peak resident memory (MiB)
    on rank 0's stdout, gathered."""
    import resource
    import parallel
    import torch.distributed.fsdp
    parallel.init()
    assert torch.distributed.fsdp      # imported now, as shard_model would: not a cost of loading
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if how == "meta":
        model = Transformer.from_pretrained(path, shard=parallel.shard_model)
    else:
        model = parallel.shard_model(Transformer.from_pretrained(path))
    peak = parallel.gather([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before])
    if parallel.is_main():
        print(json.dumps({"params": num_params(model), "load_peak_mib": peak}), flush=True)
    parallel.shutdown()
    os._exit(0)     # FSDP2 leaves gloo threads running, which can abort a normal interpreter exit


def shard_part(shard):
    """One torchrun process: two SFT steps (weights, gradients and AdamW state all live), then this
    process's peak resident memory (MiB) on rank 0's stdout, gathered."""
    import math
    import random
    import resource
    import parallel
    import sft
    from model import _init_weights
    parallel.init()
    torch.manual_seed(0)
    if shard == "fsdp":     # built on the meta device, sharded, then only this process's shards made
        with torch.device("meta"):
            model = Transformer(SHARD_CFG)
        parallel.shard_model(model).to_empty(device="cpu").apply(_init_weights)
    else:
        model = Transformer(SHARD_CFG)
    rng = random.Random(0)
    data = [([rng.randrange(8000) for _ in range(64)], [rng.randrange(8000) for _ in range(192)]) for _ in range(16)]
    cfg = sft.SFTConfig(lr=1e-4, max_steps=2, batch_tokens=2048, row_len=256, shard=shard == "fsdp")
    m = sft.sft_train(model, data, cfg, log=lambda s: None)
    assert m["skipped_steps"] == 0 and math.isfinite(m["loss"]), m     # both steps taken: AdamW's state exists
    peak = parallel.gather([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024])
    if parallel.is_main():
        print(json.dumps({"params": num_params(model), "peak_mib": peak}), flush=True)
    parallel.shutdown()
    os._exit(0)     # FSDP2 leaves gloo threads running, which can abort a normal interpreter exit


def ppo_part(shard):
    """One torchrun process: two PPO optimizer steps of a policy and a critic of SHARD_CFG on random
    rollouts (8 rows of 64 prompt + 192 response tokens a process), then its peak resident memory."""
    import resource
    import parallel
    import ppo
    from model import ValueModel
    parallel.init()
    torch.manual_seed(0)
    policy, critic = Transformer(SHARD_CFG), ValueModel(SHARD_CFG)
    if shard == "fsdp":
        for m in (policy, critic):
            parallel.shard_model(m)
    g = torch.Generator().manual_seed(parallel.rank())
    r = ppo.make_rollouts(torch.randint(8000, (8, 64), generator=g).tolist(),
                          torch.randint(8000, (8, 192), generator=g).tolist(), 0)
    r.old_logp, r.values = -9.0 * r.mask, torch.zeros_like(r.mask)
    r.advantages, r.returns = torch.randn(r.mask.shape, generator=g) * r.mask, torch.randn(r.mask.shape, generator=g)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (policy, critic)]
    info = ppo.ppo_update(policy, opts[0], r, ppo.PPOConfig(minibatch_size=8), critic, opts[1], micro_batch_size=4)
    assert info["optimizer_steps"] == 2 and info["skipped_steps"] == 0, info
    peak = parallel.gather([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024])
    if parallel.is_main():
        print(json.dumps({"params": num_params(policy) + num_params(critic), "peak_mib": peak}), flush=True)
    parallel.shutdown()
    os._exit(0)     # FSDP2 leaves gloo threads running, which can abort a normal interpreter exit


def _two_processes(*args):
    """bench.py <args> under torchrun on 2 CPU processes -> the JSON its rank 0 printed last."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py"), *args], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise SystemExit(f"bench.py {' '.join(args)}: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_shard(machine):
    import tempfile
    res = {"bench": "shard", "machine": machine, "processes": 2}
    for shard in ("none", "fsdp"):
        res[shard] = _two_processes("shard-part", "--shard", shard)
        print(f"{shard:>5}: {res[shard]['params'] / 1e6:.0f}M parameters, peak RSS per process "
              + ", ".join(f"{m:.0f} MiB" for m in res[shard]["peak_mib"]))
    for shard in ("none", "fsdp"):
        res[f"ppo_{shard}"] = r = _two_processes("shard-part", "--shard", f"ppo-{shard}")
        print(f"ppo, {shard:>5}: policy + critic {r['params'] / 1e6:.0f}M parameters, two PPO steps, peak RSS "
              "per process " + ", ".join(f"{m:.0f} MiB" for m in r["peak_mib"]))
    with tempfile.TemporaryDirectory() as path:
        torch.manual_seed(0)
        Transformer(LOAD_CFG).save_pretrained(path)
        for how in ("whole", "meta"):
            res[f"load_{how}"] = r = _two_processes("shard-part", "--shard", f"load-{how}", "--model", path)
            print(f"load, {how:>5}: {r['params'] / 1e6:.0f}M parameters (fp32), peak RSS growth per process "
                  + ", ".join(f"{m:.0f} MiB" for m in r["load_peak_mib"]))
    return res
