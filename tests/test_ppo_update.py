"""The PPO update over real model forwards: log-probs, accumulation, and learning on an easy reward."""
import math

import pytest
import torch

import ppo
from model import ModelConfig, Transformer, ValueModel
from rollout import Sampler

CFG = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def rollouts(seed=0, B=6):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 32, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist() for _ in range(B)]
    resp = [torch.randint(0, 32, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(B)]
    return ppo.make_rollouts(prompts, resp, pad_id=0), prompts, resp


def test_response_logprobs_and_values_match_full_forward():
    torch.manual_seed(0)
    m, v = Transformer(CFG), ValueModel(CFG)
    torch.nn.init.normal_(v.score.weight)
    r, prompts, resp = rollouts()
    lp, ent = ppo.response_logprobs(m, r, temperature=0.8, with_entropy=True)
    vals = ppo.response_values(v, r)
    for b, (p, s) in enumerate(zip(prompts, resp)):
        logits = m(torch.tensor([p + s]))[0, len(p) - 1:-1] / 0.8
        ref = torch.log_softmax(logits, -1)
        assert torch.allclose(lp[b, :len(s)], ref.gather(-1, torch.tensor(s)[:, None])[:, 0], atol=1e-5)
        assert torch.allclose(ent[b, :len(s)], -(ref.exp() * ref).sum(-1), atol=1e-5)
        assert torch.allclose(vals[b, :len(s)], v(torch.tensor([p + s]))[0, len(p) - 1:-1], atol=1e-5)
        assert torch.all(lp[b, len(s):] == 0) and torch.all(vals[b, len(s):] == 0)


def grads_after_update(micro, agg, **over):
    torch.manual_seed(0)
    m = Transformer(CFG)
    r, _, _ = rollouts(seed=1, B=8)
    with torch.no_grad():
        r.old_logp = ppo.response_logprobs(m, r) + 0.1 * torch.randn_like(r.mask) * r.mask
    r.advantages = torch.randn_like(r.mask) * r.mask
    r.ref_logp = r.old_logp - 0.1 * r.mask
    cfg = ppo.PPOConfig(minibatch_size=8, loss_agg=agg, max_len=10, **over)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)   # lr 0: keep the grads, leave the weights
    info = ppo.ppo_update(m, opt, r, cfg, micro_batch_size=micro)
    return torch.cat([p.grad.flatten() for p in m.parameters()]), info


def test_micro_batch_accumulation_equals_one_batch():
    for agg in ("token_mean", "seq_mean", "seq_sum_norm"):
        g1, i1 = grads_after_update(8, agg)
        g3, i3 = grads_after_update(3, agg)
        assert torch.allclose(g1, g3, atol=1e-6), agg
        assert abs(i1["policy_loss"] - i3["policy_loss"]) < 1e-6 and abs(i1["clipfrac"] - i3["clipfrac"]) < 1e-6


def test_micro_batches_group_rows_of_like_length():
    """Each micro-batch is cut to its longest row, so the update groups rows by length: the forwards
    see the sorted lengths in consecutive chunks, the least padding a split can have."""
    torch.manual_seed(0)
    m = Transformer(CFG)
    r, prompts, resp = rollouts(seed=1, B=8)
    with torch.no_grad():
        r.old_logp = ppo.response_logprobs(m, r)
    r.advantages = torch.randn_like(r.mask) * r.mask
    widths, hidden = [], m.hidden
    m.hidden = lambda ids: widths.append(ids.shape[1]) or hidden(ids)
    ppo.ppo_update(m, torch.optim.SGD(m.parameters(), lr=0.0), r, ppo.PPOConfig(minibatch_size=8), micro_batch_size=3)
    lengths = sorted(len(p) + len(s) for p, s in zip(prompts, resp))
    assert widths == [max(lengths[i:i + 3]) for i in range(0, 8, 3)]


def test_entropy_bonus_and_kl_loss_accumulate_exactly():
    """The entropy bonus has a gradient, and it and the KL term are aggregated like the loss, so
    gradients and metrics do not depend on the micro-batch size for any aggregation."""
    over = dict(ent_coef=0.05, kl_loss_coef=0.1, kl_estimator="k3")
    for agg in ("token_mean", "seq_mean", "seq_sum_norm"):
        g1, i1 = grads_after_update(8, agg, **over)
        g3, i3 = grads_after_update(3, agg, **over)
        assert torch.allclose(g1, g3, atol=1e-6), agg
        assert all(abs(i1[k] - i3[k]) < 1e-6 for k in ("policy_loss", "kl_loss", "entropy")), (agg, i1, i3)
        g0, _ = grads_after_update(8, agg, kl_loss_coef=0.1, kl_estimator="k3")
        assert not torch.allclose(g0, g1, atol=1e-4), agg


def nan_rows_update(bad_minibatches, max_bad_steps=5):
    """ppo_update over 3 minibatches of 2 rows, with a nan advantage in the minibatches listed (an SGD
    step each) -> (info, warnings, parameters before, parameters after)."""
    torch.manual_seed(0)
    m, v = Transformer(CFG), ValueModel(CFG)
    r, _, _ = rollouts(seed=1, B=6)
    with torch.no_grad():
        r.old_logp = ppo.response_logprobs(m, r)
        r.values = ppo.response_values(v, r)
    r.advantages, r.returns = torch.randn_like(r.mask) * r.mask, torch.randn_like(r.mask) * r.mask
    order = torch.randperm(6, generator=torch.Generator().manual_seed(3))   # the update's shuffle
    for i in bad_minibatches:
        r.advantages[order[2 * i], 0] = float("nan")
    cfg = ppo.PPOConfig(minibatch_size=2, max_bad_steps=max_bad_steps)
    before = [p.detach().clone() for p in [*m.parameters(), *v.parameters()]]
    said = []
    info = ppo.ppo_update(m, torch.optim.SGD(m.parameters(), lr=0.1), r, cfg, v, torch.optim.SGD(v.parameters(), lr=0.1),
                          generator=torch.Generator().manual_seed(3), log=said.append)
    return info, said, before, [p.detach() for p in [*m.parameters(), *v.parameters()]]


def test_non_finite_steps_are_skipped_and_abort_when_in_a_row():
    info, said, before, after = nan_rows_update([])
    assert info["skipped_steps"] == 0 and not said
    info, said, before, after = nan_rows_update([0, 2], max_bad_steps=2)   # not in a row: no abort
    assert info["skipped_steps"] == 2 and len(said) == 2 and "skipped" in said[0]
    assert all(torch.isfinite(p).all() for p in after) and any(not torch.equal(a, b) for a, b in zip(before, after))
    assert all(math.isfinite(info[k]) for k in ("policy_loss", "value_loss", "grad_norm", "critic_grad_norm"))
    info, said, before, after = nan_rows_update([0, 1, 2])   # every step skipped: weights untouched
    assert info["skipped_steps"] == 3 and math.isnan(info["policy_loss"])
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    with pytest.raises(RuntimeError, match="2 non-finite steps in a row"):
        nan_rows_update([1, 2], max_bad_steps=2)


def test_tiny_rl_run_raises_a_learnable_reward():
    """Reward = share of response tokens equal to 7. PPO with a critic must push it up."""
    torch.manual_seed(0)
    policy, critic = Transformer(CFG), ValueModel(CFG)
    sampler = Sampler(policy, max_batch=32, block_size=8, max_seq_len=32)
    cfg = ppo.PPOConfig(minibatch_size=16, ppo_epochs=2)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    copt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    prompts = [[1, 2, i % 30] for i in range(32)]
    means = []
    for step in range(12):
        outs = sampler.generate(prompts, max_new_tokens=6, temperature=1.0, seed=step)
        r = ppo.make_rollouts(prompts, [o.tokens for o in outs], pad_id=0)
        seq_r = torch.tensor([sum(t == 7 for t in o.tokens) / len(o.tokens) for o in outs])
        means.append(float(seq_r.mean()))
        r.old_logp = ppo.make_rollouts(prompts, [o.logprobs for o in outs], 0).ids.new_zeros(r.mask.shape).float()
        r.old_logp[r.mask.bool()] = torch.tensor([lp for o in outs for lp in o.logprobs])
        with torch.no_grad():
            r.values = ppo.response_values(critic, r)
        rewards = ppo.token_rewards(seq_r, r.mask)
        adv, r.returns = ppo.gae(rewards, r.values, r.mask, cfg.gamma, cfg.lam)
        r.advantages = ppo.masked_whiten(adv, r.mask)
        ppo.ppo_update(policy, opt, r, cfg, critic, copt)
    assert means[0] < 0.15 and sum(means[-3:]) / 3 > means[0] + 0.3, means
