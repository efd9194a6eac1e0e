"""bench.py: the GPU benchmark's every part runs at tiny shapes on the CPU (--smoke), so that the
one prepared run on a GPU does not fail on a typo; the memory plan counts what the modules hold."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_benchmark_smoke(tmp_path):
    out = tmp_path / "bench_gpu.json"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    r = subprocess.run([sys.executable, "bench.py", "gpu", "--smoke", "--json", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    for part in ("sampler", "decode", "logprob", "sft"):
        assert "error" not in res[part], (part, res[part])
    s = res["sampler"]
    assert s["greedy_graphs_equal_eager"] and s["output_tokens"] > 0
    assert s["ours_tok_s"] > 0 and s["hf_tok_s"] > 0 and s["eager_step_ops"] > 0
    assert s["ours_tok_s_unfused"] > 0 and s["fused_speedup"] > 0
    k = s["kernels"]
    assert k["prefill"] and k["decode"] and all(calls > 0 and us >= 0 for _, calls, us in k["prefill"] + k["decode"])
    assert res["decode"]["max_abs_err_ours_vs_ref"] < 1e-2 and res["decode"]["prefill"]["max_abs_err"] < 1e-2


# ------------------------------------------------------------------------------------------------
# memory_plan.py (bench.py memory): the per-rank memory plan, from modules built on the meta device

def _tiny(tied):
    from model import ModelConfig
    return ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)


def _numel(cls, cfg):
    import torch
    with torch.device("meta"):
        m = cls(cfg)
    return sum(p.numel() for p in m.parameters())        # a tied weight is one parameter


def _rows(plan):
    return {r["stage"]: r for r in plan["stages"]}


def test_memory_plan_shards_are_the_modules_counted():
    import memory_plan
    from model import Transformer, ValueModel
    for tied in (True, False):
        cfg, world = _tiny(tied), 4
        pol, val = _numel(Transformer, cfg), _numel(ValueModel, cfg)
        rows = _rows(memory_plan.memory_plan(cfg, world, micro_batch=2, seq_len=16, rl_batch=8, act_ckpt=False))
        # (trained, frozen) parameters: critic and ORM are value models, the reference a policy
        want = {"pretrain,sft,distill": (pol, 0), "orm": (val, pol), "rl,rl2 (ppo)": (pol + val, val),
                "rl (grpo)": (pol, val + pol)}
        assert set(rows) == set(want)
        for stage, (trained, frozen) in want.items():
            r = rows[stage]
            assert (r["weights"], r["grads"], r["optimizer"]) == (trained * 4 / world, trained * 4 / world,
                                                                   trained * 8 / world), (tied, stage)
            assert r["frozen"] == frozen * 2 / world, (tied, stage)


def test_memory_plan_doubling_the_ranks_halves_the_sharded_parts():
    import memory_plan
    cfg = memory_plan.qwen25("0.5b")
    a, b = (_rows(memory_plan.memory_plan(cfg, w, 1, 4096, 64, True)) for w in (8, 16))
    for stage in a:
        for k in ("weights", "grads", "optimizer", "frozen"):
            assert b[stage][k] * 2 == a[stage][k], (stage, k)
        for k in ("gathered", "activations", "temporaries"):    # unsharded: the same on every rank count
            assert b[stage][k] == a[stage][k], (stage, k)
        assert b[stage]["total"] < a[stage]["total"]


def test_memory_plan_activation_checkpointing_lowers_activations():
    import memory_plan
    for size in ("0.5b", "7b"):
        off, on = (_rows(memory_plan.memory_plan(memory_plan.qwen25(size), 8, 1, 4096, 64, ckpt)) for ckpt in (False, True))
        for stage in off:
            assert on[stage]["activations"] < off[stage]["activations"] / 10, (size, stage)
            assert on[stage]["total"] < off[stage]["total"], (size, stage)


def test_memory_plan_layer_activations_are_what_autograd_saves():
    """_layer_act_bytes against the tensors a bf16 forward of one block saves on the CPU (where
    SDPA's flash kernel, as on CUDA, keeps no [T, T] scores): distinct storages, parameters, the
    block's input and the shared rotary rows left out."""
    import torch
    import memory_plan
    from model import Transformer
    torch.manual_seed(0)
    model = Transformer(_tiny(True)).to(torch.bfloat16)
    T = 24
    x = torch.randn(1, T, 32, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = (t[torch.arange(T)[None]] for t in model.model.rope(T, x.device, x.dtype))
    skip = {p.data_ptr() for p in model.parameters()} | {x.data_ptr(), cos.data_ptr(), sin.data_ptr()}
    saved = {}

    def pack(t):
        if t.data_ptr() not in skip:
            saved[t.data_ptr()] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model.layers[0](x, cos, sin)
    assert sum(saved.values()) == memory_plan._layer_act_bytes(model.model.layers[0]) * T


def test_memory_command_prints_every_stage_quickly():
    import time
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    t = time.time()
    r = subprocess.run([sys.executable, "bench.py", "memory", "--model=0.5b", "--world=8"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    took = time.time() - t
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert took < 15, f"bench.py memory took {took:.1f} s"
    lines = r.stdout.splitlines()
    res = json.loads(lines[-1])
    for stage in ("pretrain,sft,distill", "orm", "rl,rl2 (ppo)", "rl (grpo)"):
        row = next(line for line in lines if line.strip().startswith(stage + " "))
        assert len(row.split()) >= 10 and ("yes" in row or "NO" in row), row
    assert [s["stage"] for s in res["stages"]] == ["pretrain,sft,distill", "orm", "rl,rl2 (ppo)", "rl (grpo)"]
    assert res["micro_batch"] == 1 and res["seq_len"] == 4096 and all(s["fits"] for s in res["stages"])
    assert not os.path.exists(os.path.join(ROOT, "bench_memory.json"))    # a file only with --json or $OUT
