"""parallel.py, distributed sft and the distributed PPO update: 2 CPU processes (gloo, launched by
torchrun) against 1 process.

This file is also the torchrun worker: `python -m torch.distributed.run ... tests/test_parallel.py OUT`
runs the checks below on each rank and rank 0 writes the trained weights to OUT.
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import parallel  # noqa: E402
import ppo  # noqa: E402
import sft  # noqa: E402
from model import ModelConfig, Transformer, ValueModel, autocast  # noqa: E402

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
EXAMPLES = [([1 + i % 7, 2, 3 + i % 5], [4 + i % 11, 10 + i % 3, 2][:1 + i % 3]) for i in range(24)]
PAIRS = [([1, 2, 3 + i % 3], [7, 8 + i % 2], [9, 9, 9][:1 + i % 3]) for i in range(10)]
# one optimizer step on the same global batch; "one_row": every micro-batch has a single row, so
# rank 1 has no data at all (it must still join every collective)
RUNS = {
    "sft": (dict(lr=1e-3, max_steps=1, batch_tokens=24, row_len=8, grad_accum=2, warmup_frac=0.0), EXAMPLES),
    "one_row": (dict(lr=1e-3, max_steps=1, batch_tokens=8, row_len=8, grad_accum=2, warmup_frac=0.0), EXAMPLES),
    "orm": (dict(lr=1e-3, max_steps=1, batch_tokens=36, row_len=12, grad_accum=1, warmup_frac=0.0), PAIRS),
}


# PPO: one optimizer step (minibatch = the global batch) of policy and critic; each rank holds a
# contiguous half of the rows, as it would after sampling its share of the prompts
# run -> (loss_agg, ExPO term): None; "all": EXPO's rows split unevenly (rank 0 the first, rank 1
# the other three), each rank's term weighted by ppo.rank_weight; "rank0": only rank 0 has any (the
# first two), the others pass None. Either way the one-process run holds the same rows and term.
PPO_RUNS = {"token_mean": ("token_mean", None), "seq_mean": ("seq_mean", None),
            "seq_sum_norm": ("seq_sum_norm", "all"), "expo_all": ("token_mean", "all"),
            "expo_seq_mean": ("seq_mean", "all"), "expo_rank0": ("token_mean", "rank0")}
PPO_B = 8
EXPO = ([[1, 2], [3], [4, 5], [6]], [[7, 8, 9], [10], [11, 12], [13, 14]])
# plain SGD: the step is linear in the gradient, so a wrong scale shows; AdamW's first step is about
# lr * sign(grad), blind to scale and turning float noise on a near-zero gradient into a full step
PPO_LR = 0.1


def ppo_batch(policy):
    """The global rollout batch (ragged, one empty response), the same in every process."""
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 64, (2 + i % 4,), generator=g).tolist() for i in range(PPO_B)]
    resp = [torch.randint(1, 64, (i * 3 % 7,), generator=g).tolist() for i in range(PPO_B)]
    r = ppo.make_rollouts(prompts, resp, pad_id=0)
    with torch.no_grad():
        r.old_logp = ppo.response_logprobs(policy, r) + 0.2 * torch.randn(r.mask.shape, generator=g) * r.mask
    r.ref_logp = r.old_logp - 0.1 * r.mask
    return r, torch.randn(PPO_B, generator=g), torch.arange(PPO_B) % 3 > 0


def rows(r, lo, hi):
    """Rows lo:hi of every field (not trimmed, unlike Rollouts.select)."""
    return ppo.Rollouts(*(None if x is None else x[lo:hi] for x in (getattr(r, f.name) for f in dataclasses.fields(r))))


def expo_term(which, agg, max_len):
    """The extra_loss of a PPO_RUNS entry on this rank (None: no term here), weighted as rl.py does."""
    if which is None:
        return None
    # this rank's EXPO rows [lo, hi): in one process, on rank 0, on rank 1
    split = {"all": [(0, 4), (0, 1), (1, 4)], "rank0": [(0, 2), (0, 2), (0, 0)]}[which]
    lo, hi = split[0 if parallel.world() == 1 else 1 + parallel.rank()]
    er = ppo.make_rollouts(EXPO[0][lo:hi], EXPO[1][lo:hi], 0) if hi > lo else None
    weight = ppo.rank_weight(None if er is None else er.mask, agg, torch.device("cpu"))   # every rank calls it
    return None if er is None else (lambda m: ppo.expo_loss(m, er, 0.5, 1.0, agg, max_len, weight))


def ppo_step(run, shard=False, dtype=torch.float32):
    """(policy, critic, whitened advantages of the global batch [B, T], metrics) after one ppo_update
    in this process on its contiguous share of the rows; shard: policy and critic under FSDP2
    (gathered in dtype); dtype: the forwards' autocast."""
    agg, expo = PPO_RUNS[run]
    torch.manual_seed(0)
    policy, critic = Transformer(CFG), ValueModel(CFG)
    with torch.no_grad():
        critic.score.weight.normal_(std=0.1)        # a non-zero head, so the trunk gets gradients too
    r, seq_r, finished = ppo_batch(policy)
    if shard:
        for m in (policy, critic):
            parallel.shard_model(m, None if dtype == torch.float32 else dtype)
    lo, hi = parallel.rank() * PPO_B // parallel.world(), (parallel.rank() + 1) * PPO_B // parallel.world()
    mine = rows(r, lo, hi)
    # grad_clip off: clipping to a norm would hide a wrong gradient scale
    cfg = ppo.PPOConfig(loss_agg=agg, max_len=10, minibatch_size=PPO_B, kl_loss_coef=0.1, kl_estimator="k3",
                        ent_coef=0.01, grad_clip=1e9)
    opt = torch.optim.SGD(policy.parameters(), lr=PPO_LR)     # before any forward, as in rl_train: FSDP2
    copt = torch.optim.SGD(critic.parameters(), lr=PPO_LR)    # keeps the root's whole weights after one
    with autocast(torch.device("cpu"), dtype):
        ppo.set_advantages(mine, cfg, seq_r[lo:hi], finished[lo:hi], critic)       # whitened over all ranks
        adv = torch.tensor(parallel.gather(mine.advantages.tolist()))
        info = ppo.ppo_update(policy, opt, mine, cfg, critic, copt, micro_batch_size=3,
                              generator=torch.Generator().manual_seed(1), extra_loss=expo_term(expo, agg, cfg.max_len))
    sd = lambda m: {k: v.detach().clone() for k, v in parallel.full_state_dict(m).items() if k != "lm_head.weight"}
    return sd(policy), sd(critic), adv, info


def ppo_refuses_uneven_splits():
    """A split that would give the ranks different numbers of steps is refused on every rank (no hang)."""
    torch.manual_seed(0)
    policy = Transformer(CFG)
    r = ppo_batch(policy)[0]
    r.advantages = r.mask.clone()
    for n_rows, mb, msg in ((4, 7, "minibatch_size=7"), (4 - parallel.rank(), 8, "different numbers of rollout rows")):
        try:
            ppo.ppo_update(policy, torch.optim.SGD(policy.parameters(), lr=0.0), rows(r, 0, n_rows),
                           ppo.PPOConfig(minibatch_size=mb))
            raise AssertionError("ppo_update accepted an uneven split")
        except ValueError as e:
            assert msg in str(e) and ("world size 2" in str(e) or mb == 8), e


def train(kind, **extra):
    """The model after one step of `kind`, in this process (whatever the world size); extra:
    SFTConfig fields (shard=True: FSDP2 over the processes; dtype)."""
    cfg, data = RUNS[kind]
    cfg = {**cfg, **extra}
    torch.manual_seed(0)
    model = Transformer(CFG)
    quiet = dict(log=lambda s: None)
    if kind == "orm":
        model = ValueModel.from_policy(model)
        with torch.no_grad():
            model.score.weight.normal_(std=0.1)     # a non-zero head, so the trunk gets gradients too
        sft.orm_train(model, data, sft.SFTConfig(**cfg), margin=1.0, **quiet)
    else:
        sft.sft_train(model, data, sft.SFTConfig(**cfg), **quiet)
    return {k: v.detach().clone() for k, v in parallel.full_state_dict(model).items() if k != "lm_head.weight"}


def sft_grads(shard=False, dtype=torch.float32):
    """The gradients of one SFT micro-batch of 4 rows (this rank's share of them), summed over the
    processes (FSDP2 reduce-scatters them; gathered whole here). AdamW and clipping are blind to a
    gradient's scale, so the steps above would not show a mean taken instead of the sum: this does."""
    torch.manual_seed(0)
    model = Transformer(CFG)
    if shard:
        parallel.shard_model(model, None if dtype == torch.float32 else dtype)
    units = [[(p + r, len(p), None)] for p, r in EXAMPLES[:8]]
    rows = [[[0, 1], [2, 3], [4, 5], [6, 7]][parallel.rank()::parallel.world()]]
    win = {"extra": {}, "n": 0}
    sft._accumulate(model, rows, units, sft.sft_loss, "tokens", torch.device("cpu"), dtype, win, shard)
    grads = {n: p.grad for n, p in model.named_parameters()}
    return {n: (g.full_tensor() if shard else g).clone() for n, g in grads.items()}


def sharded_resume(out):
    """sft under FSDP2 with checkpoints every 2 of 4 steps, then the same run again after the step-4
    checkpoint was damaged (a shard file cut short): it falls back to step 2 and ends with the same
    weights, bitwise. -> the weights."""
    cfg = sft.SFTConfig(lr=1e-3, max_steps=4, batch_tokens=24, row_len=8, warmup_frac=0.0, shard=True)
    root, weights = os.path.join(out, "ck-sharded"), []
    for attempt in range(2):
        torch.manual_seed(0)
        model = Transformer(CFG)
        if attempt == 1 and parallel.rank() == 0:
            shards = os.path.join(root, "step-00000004", checkpoint.SHARDS)
            with open(os.path.join(shards, sorted(os.listdir(shards))[0]), "r+b") as f:
                f.truncate(100)
        parallel.barrier()
        logs = []
        sft.sft_train(model, EXAMPLES, cfg, log=logs.append, ckpt_dir=root, ckpt_every=2, keep=0)
        if attempt == 1 and parallel.rank() == 0:
            assert "cannot resume from" in logs[0] and "step-00000004" in logs[0], logs
            assert "resumed from" in logs[1] and "step-00000002" in logs[1], logs
        weights.append({k: v.clone() for k, v in parallel.full_state_dict(model).items() if k != "lm_head.weight"})
    if parallel.rank() == 0:
        assert all(weights[0][k].equal(weights[1][k]) for k in weights[0])
        assert sorted(os.listdir(os.path.join(root, "step-00000002", checkpoint.SHARDS)))[0].endswith(".safetensors")
    return weights[0]


def rl_step_with_uneven_ranks(shard="none"):
    """One rl_train step (DAPO + ExPO) where the ranks keep different numbers of groups (rank 0 none
    of its two, rank 1 both, dealt out 1 + 1) and only rank 1 has ExPO rows: every rank joins every
    collective (a hang otherwise; under FSDP2 every forward is one), and each graded row stays with
    its own prompt."""
    import data
    import rae
    import rl
    import train as trainer
    from tokenizer import build_task_tokenizer
    rank = parallel.rank()
    cfg = trainer.parse_args(["--n_train=8", "--rl_batch=8", "--minibatch_size=4", "--micro_batch=2", "--algo=dapo",
                              "--grpo_group=2", "--dapo_max_refills=0", "--expo=true", "--rl_max_new_tokens=4",
                              f"--shard={shard}"])
    problems = data.load_problems(cfg)[0]
    tok = build_task_tokenizer([p["question"] for p in problems], vocab_size=300)
    torch.manual_seed(0)
    policy = Transformer(dataclasses.replace(CFG, vocab_size=tok.vocab_size, max_position_embeddings=256))
    real_grade, real_expo = rl.sample_and_grade, rl.expo_rollouts

    def grade(sampler, tok_, probs, prompts, qids, n, *a, **k):
        outs, _ = real_grade(sampler, tok_, probs, prompts, qids, n, *a, **k)
        ok = [rank == 1 and i % n == 0 for i in range(len(outs))]       # rank 1's groups: one right each
        for i, o in enumerate(outs):
            o.tag = (prompts[i // n], ok[i])
        return outs, ok

    def score(policy, states, outs):          # the rows as rl_train pairs them after dealing out
        assert [o.tag[0] for o in outs] == [s.prompt_ids for s in states]
        return [float(o.tag[1]) for o in outs]

    rl.sample_and_grade = grade
    rl.expo_rollouts = lambda *a: None if rank == 0 else ppo.make_rollouts([[1, 2]], [[3, 4]], tok.pad_id)
    try:
        m = rl.rl_train(cfg, policy, tok, problems, rae.plain_states(problems, tok), 1.0, 2, 1, reward_fn=score,
                        log=lambda *a, **k: None)
    finally:
        rl.sample_and_grade, rl.expo_rollouts = real_grade, real_expo
    assert (m["step"], m["prompts"], m["left_out"], m["expo_rows"], m["acc"]) == (1, 2, 0, 1, 0.5), m
    assert parallel.is_sharded(policy) == (shard == "fsdp")


def resume_falls_back_together(out):
    """Rank 1's RNG file of the newest checkpoint is cut short, rank 0's is whole: both ranks must
    fall back to the older checkpoint (one resuming from each would train on diverged states)."""
    root, model = os.path.join(out, "ckpt"), Transformer(CFG)
    for step in (1, 2):
        checkpoint.save(root, f"step-{step}", {"m": model}, {}, {"stage": "t", "step": step, "steps": 3})
    if parallel.rank() == 1:
        with open(os.path.join(root, "step-2", "rng-rank1.safetensors"), "r+b") as f:
            f.truncate(8)
    parallel.barrier()
    logs = []
    assert checkpoint.resume(root, {"m": model}, {}, "t", 3, log=logs.append)["step"] == 1
    assert "cannot resume from" in logs[0] and "step-2" in logs[0], logs


def sharded_loading(out):
    """A checkpoint loaded straight into FSDP2 shards (each rank reads its own rows) holds the same
    weights as a whole load, tied head included; a critic made from the sharded policy is the
    one made from the whole policy."""
    path = os.path.join(out, "whole")
    if parallel.rank() == 0:
        torch.manual_seed(0)
        Transformer(dataclasses.replace(CFG, vocab_size=63)).save_pretrained(path)   # 63 rows: uneven shards
    parallel.barrier()
    whole = Transformer.from_pretrained(path)
    sharded = Transformer.from_pretrained(path, shard=parallel.shard_model)
    assert parallel.is_sharded(sharded)
    assert sharded.lm_head.weight is sharded.model.embed_tokens.weight
    got = parallel.full_state_dict(sharded)
    if parallel.rank() == 0:
        assert all(got[k].equal(v) for k, v in whole.state_dict().items())
    critic = parallel.full_state_dict(ValueModel.from_policy(sharded, parallel.shard_model))
    if parallel.rank() == 0:
        assert all(critic[k].equal(v) for k, v in ValueModel.from_policy(whole).state_dict().items())


def fsdp_worker(out):
    """The FSDP2 runs, in their own processes: DTensor's caches keep the group (and gloo's threads)
    alive after shutdown, which the check at the end of worker() would report; the processes still
    exit cleanly, which torchrun's exit code shows."""
    torch.set_num_threads(1)
    rank = parallel.init()[0]
    results = {f"fsdp_{kind}": train(kind, shard=True) for kind in RUNS}
    results["fsdp_bf16_sft"] = train("sft", shard=True, dtype=torch.bfloat16)
    results["fsdp_act_ckpt_sft"] = train("sft", shard=True, act_ckpt=True)
    results["fsdp_resumed"] = sharded_resume(out)
    results["fsdp_grads"] = sft_grads(shard=True)
    results["fsdp_grads_bf16"] = sft_grads(shard=True, dtype=torch.bfloat16)
    rl_step_with_uneven_ranks(shard="fsdp")
    sharded_loading(out)
    infos = {}
    for run, dtype in [(run, torch.float32) for run in PPO_RUNS] + [("expo_rank0", torch.bfloat16)]:
        key = f"fsdp_ppo_{run}" + ("_bf16" if dtype == torch.bfloat16 else "")
        policy, critic, adv, infos[key] = ppo_step(run, shard=True, dtype=dtype)
        results.update({key: policy, f"{key}_critic": critic})
    torch.manual_seed(0)
    model = parallel.shard_model(Transformer(CFG), torch.bfloat16)        # bf16 gathers, autocast: the
    with autocast(torch.device("cpu"), torch.bfloat16):                   # residual stream stays fp32
        assert model.hidden(torch.tensor([[1, 2, 3]])).dtype == torch.float32
    import train as trainer      # a stage trained under FSDP2 writes a whole HF directory (and ends the group)
    trainer.main([f"--out={os.path.join(out, 'run')}", "--stages=pretrain", "--base=", "--n_train=64", "--n_test=4",
                  "--hidden_size=32", "--intermediate_size=64", "--num_hidden_layers=2", "--vocab_size=300",
                  "--pretrain_steps=2", "--pretrain_batch_tokens=1024"])
    if rank == 0:
        for kind, sd in results.items():
            save_file(sd, os.path.join(out, f"{kind}.safetensors"))
        with open(os.path.join(out, "fsdp_ppo_metrics.json"), "w") as f:
            json.dump(infos, f)
    parallel.barrier()
    parallel.shutdown()


def worker(out):
    torch.set_num_threads(1)
    rank, world = parallel.init()
    assert (rank, world) == (parallel.rank(), parallel.world()) and world == 2
    for n in range(6):                              # fewer, as many and more items than ranks
        items = [f"x{i}" for i in range(n)]
        mine = parallel.shard(items)
        assert len(mine) in (n // 2, (n + 1) // 2) and parallel.gather(mine) == items
    # unequal parts (DAPO keeps a different number of groups on each rank) dealt out evenly, in order
    for parts, want in ((([0, 1, 2], [3]), ([0, 1], [2, 3], 0)), (([0, 1, 2], []), ([0], [1], 1)),
                        (([], []), ([], [], 0)), (([], [0, 1, 2, 3, 4]), ([0, 1], [2, 3], 1))):
        mine, dropped = parallel.rebalance([f"r{rank}-{i}" for i in parts[rank]])
        everything = [f"r{r}-{i}" for r in range(2) for i in parts[r]]
        assert mine == [everything[i] for i in want[rank]] and dropped == want[2], (parts, mine, dropped)
    assert parallel.all_sum(rank + 1) == 3 and isinstance(parallel.all_sum(1), int)
    assert parallel.all_sum([0.5, rank]) == [1.0, 1]
    t = torch.tensor([1.0, rank])
    assert parallel.all_sum(t) is t and t.tolist() == [2.0, 1.0]
    rl_step_with_uneven_ranks()
    resume_falls_back_together(out)
    results = {kind: train(kind) for kind in RUNS}
    ppo_refuses_uneven_splits()
    infos = {}
    for run in PPO_RUNS:
        policy, critic, adv, infos[run] = ppo_step(run)
        results.update({f"ppo_{run}": policy, f"ppo_{run}_critic": critic, f"ppo_{run}_adv": {"adv": adv}})
    parallel.sync_grads = lambda params: None       # without the gradient sum the test must notice
    results["nosync"] = train("sft")
    if rank == 0:
        for kind, sd in results.items():
            save_file(sd, os.path.join(out, f"{kind}.safetensors"))
        with open(os.path.join(out, "ppo_metrics.json"), "w") as f:
            json.dump(infos, f)
    parallel.barrier()
    parallel.shutdown()
    # the group is freed, not only forgotten: gloo threads left running can abort the exit
    # (the optimizers above import torch.distributed.nn, which must not capture the group)
    tasks = "/proc/self/task"        # Linux
    names = [open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)] if os.path.isdir(tasks) else []
    assert not [n for n in names if "gloo" in n], f"rank {rank}: threads still running after shutdown: {names}"


def test_single_process_is_a_no_op():
    assert parallel.init() == (0, 1) and parallel.is_main()
    items = list(range(5))
    assert parallel.shard(items) == items and parallel.gather(items) == items
    assert parallel.rebalance(items) == (items, 0)
    assert parallel.all_sum(2.5) == 2.5
    parallel.barrier()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    parallel.sync_grads([p])
    assert p.grad.tolist() == [2.0] * 3


def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}    # gloo on the CPU, GPU or not
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.abspath(__file__), str(tmp_path)]
    for part in ("dp", "fsdp"):
        p = subprocess.run(cmd + [part], env=env, capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for kind in RUNS:
        want, got = train(kind), load_file(tmp_path / f"{kind}.safetensors")
        assert want.keys() == got.keys()
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6), (kind, k, (got[k] - want[k]).abs().max())
    infos = json.loads((tmp_path / "ppo_metrics.json").read_text())
    for run in PPO_RUNS:
        policy, critic, adv, info = ppo_step(run)
        assert torch.allclose(load_file(tmp_path / f"ppo_{run}_adv.safetensors")["adv"], adv, rtol=0, atol=1e-6), run
        for name, want in ((f"ppo_{run}", policy), (f"ppo_{run}_critic", critic)):
            got = load_file(tmp_path / f"{name}.safetensors")
            assert want.keys() == got.keys()
            for k in want:
                assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6), (name, k, (got[k] - want[k]).abs().max())
        assert infos[run].keys() == info.keys() and info["skipped_steps"] == 0, (run, info)
        for k in info:   # the metrics are global too
            assert abs(infos[run][k] - info[k]) < 1e-5, (run, k, infos[run][k], info[k])
    # FSDP2: the same step as one process holding the whole batch (fp32), or close to it in bf16
    for kind in RUNS:
        want, got = train(kind), load_file(tmp_path / f"fsdp_{kind}.safetensors")
        assert want.keys() == got.keys(), kind
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6), (kind, k, (got[k] - want[k]).abs().max())
    got = load_file(tmp_path / "fsdp_act_ckpt_sft.safetensors")       # recomputing blocks inside FSDP2 units
    assert all(torch.allclose(got[k], v, rtol=1e-5, atol=1e-6) for k, v in train("sft").items())
    want, got = sft_grads(), load_file(tmp_path / "fsdp_grads.safetensors")
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-7), (k, (got[k] - want[k]).abs().max())
    # bf16: weights gathered in bf16 under FSDP2, autocast over fp32 ones in one process; the residual
    # stream is fp32 in both, so the gradients agree to bf16's precision (a bf16 residual would not)
    want, got = sft_grads(dtype=torch.bfloat16), load_file(tmp_path / "fsdp_grads_bf16.safetensors")
    err = (torch.cat([(got[k] - want[k]).flatten() for k in want]).norm() / torch.cat([w.flatten() for w in want.values()]).norm())
    assert err < 6e-3, err
    got, want = load_file(tmp_path / "fsdp_bf16_sft.safetensors"), train("sft", dtype=torch.bfloat16)
    assert got.keys() == want.keys() - {"lm_head.weight"}
    err = torch.cat([(got[k] - want[k]).flatten() for k in got]).norm() / torch.cat([want[k].flatten() for k in got]).norm()
    assert err < 6e-3, err
    # PPO under FSDP2 (the ExPO term on rank 0 only: rank 1 joins the gathers with a stand-in row)
    infos = json.loads((tmp_path / "fsdp_ppo_metrics.json").read_text())
    for run in list(PPO_RUNS) + ["expo_rank0_bf16"]:
        bf16 = run.endswith("_bf16")
        policy, critic, _, info = ppo_step(run.removesuffix("_bf16"), dtype=torch.bfloat16 if bf16 else torch.float32)
        for name, want in ((f"fsdp_ppo_{run}", policy), (f"fsdp_ppo_{run}_critic", critic)):
            got = load_file(tmp_path / f"{name}.safetensors")
            assert want.keys() == got.keys(), name
            if bf16:      # bf16 gathers vs autocast over fp32 weights: the step agrees to bf16's precision
                flat = lambda d: torch.cat([d[k].flatten() for k in want])
                err = (flat(got) - flat(want)).norm() / flat(want).norm()
                assert err < 6e-3, (name, err)
                continue
            for k in want:
                assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6), (name, k, (got[k] - want[k]).abs().max())
        for k in info:
            assert abs(infos[f"fsdp_ppo_{run}"][k] - info[k]) < (1e-2 if bf16 else 1e-5), (run, k, info[k])
    # the stage trained under FSDP2: a whole HF directory, whose logits transformers computes as we do
    from transformers import Qwen2ForCausalLM
    path = tmp_path / "run" / "base"
    ours, hf = Transformer.from_pretrained(str(path)), Qwen2ForCausalLM.from_pretrained(str(path)).eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.allclose(ours(ids), hf(ids).logits, atol=1e-5)
    # a sharded checkpoint of 2 processes resumes in 1: the shards are re-cut, the run completes
    root = tmp_path / "ck-sharded"
    shutil.rmtree(root / "step-00000004")
    torch.manual_seed(0)
    one = Transformer(CFG)
    cfg = sft.SFTConfig(lr=1e-3, max_steps=4, batch_tokens=24, row_len=8, warmup_frac=0.0, shard=True)
    logs = []
    sft.sft_train(one, EXAMPLES, cfg, log=logs.append, ckpt_dir=str(root), ckpt_every=2, keep=0)
    assert any("resharded from 2 processes to 1" in line for line in logs), logs
    two = load_file(tmp_path / "fsdp_resumed.safetensors")
    assert max((one.state_dict()[k] - two[k]).abs().max().item() for k in two) < 1e-5
    # the comparison is sensitive: without summing gradients over ranks, rank 0's step differs
    got, want = load_file(tmp_path / "nosync.safetensors"), train("sft")
    assert max((got[k] - want[k]).abs().max().item() for k in want) > 5e-4


if __name__ == "__main__":
    (worker if sys.argv[2] == "dp" else fsdp_worker)(sys.argv[1])
