"""Every --algo (PPO, GRPO, Dr. GRPO, DAPO) and the RLSP / ExPO add-ons through rl.py's own phases
(rollouts -> rewards -> ppo.set_advantages -> update) on a tiny model whose reward is learnable in a
few steps: each method's mean reward must rise."""
from types import SimpleNamespace

import pytest
import torch

import ppo
import rlt
import rl
import config
from model import ModelConfig, Transformer, ValueModel
from rae import RestartState
from rollout import Sampler
from tokenizer import CONTINUE

CFG = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
PROMPTS = 8          # prompts per step; the GRPO family samples GROUP of each, PPO one of 4x as many
GROUP = 4
NEW = 6              # max_new_tokens


def sevens(tokens):
    """Share of response tokens equal to 7 (a smooth, learnable reward)."""
    return sum(t == 7 for t in tokens) / max(len(tokens), 1)


CONT = 3   # a token that stands for <|continue|>: RLSP's exploration reward counts the steps it opens


def as_text(tokens):
    return "".join(CONTINUE if t == CONT else f"word{t} is next. " for t in tokens)


def run(algo, reward_fn=sevens, steps=12, lr=3e-3, expo_rows=None, reward_for=None, **over):
    """`steps` RL steps of `algo`; reward_fn(tokens) -> float, or reward_for(policy) -> reward_fn for a
    reward that reads the policy being trained (RLT's teacher log-probs). -> (mean reward per step,
    the last update's metrics)."""
    torch.manual_seed(0)
    cfg = config.Config(algo=algo, minibatch_size=16, ppo_epochs=2, rl_max_new_tokens=NEW, grpo_kl=0.01, **over)
    group = 1 if algo == "ppo" else GROUP
    pcfg = rl.algo_config(cfg, group)
    policy = Transformer(CFG)
    reward_fn = reward_for(policy) if reward_for else reward_fn
    ref = Transformer(CFG).eval().requires_grad_(False)
    ref.load_state_dict(policy.state_dict())
    critic = ValueModel(CFG) if pcfg.adv_estimator == "gae" else None
    opts = {"opt": torch.optim.Adam(policy.parameters(), lr=lr)}
    if critic:
        opts["copt"] = torch.optim.Adam(critic.parameters(), lr=lr)
    tok = SimpleNamespace(pad_id=0, decode=as_text)          # what the phases use of a tokenizer
    states = [RestartState(i, [1, 2, i % 30], 0) for i in range(PROMPTS * GROUP // group)]  # the same samples per step
    sampler = Sampler(policy, max_batch=PROMPTS * GROUP, block_size=8, max_seq_len=32)
    scores = lambda _policy, _states, outs: [reward_fn(o.tokens) for o in outs]
    means, info = [], {}
    for step in range(steps):
        outs = sampler.generate([st.prompt_ids for st in states for _ in range(group)], max_new_tokens=NEW,
                                temperature=1.0, seed=step)
        s = rl.Samples(states, outs, [False] * len(outs), seed=step)
        seq_r = rl.rewards(cfg, tok, s, ppo.make_rollouts([[1]] * len(outs), [o.tokens for o in outs], 0), group,
                           step, steps, reward_fn=scores, policy=policy)
        means.append(float(seq_r.mean()))
        if pcfg.dynamic_sampling:      # DAPO: drop groups whose samples all got the same reward
            keep = ppo.dynamic_sampling_keep(seq_r, group).view(-1, group)[:, 0].tolist()
            if not any(keep):
                continue
            s = rl.Samples([st for st, k in zip(states, keep) if k],
                           [o for i, o in enumerate(outs) if keep[i // group]], [False] * (group * sum(keep)), seed=step)
            seq_r = seq_r[ppo.dynamic_sampling_keep(seq_r, group)]
        r = rl.rollouts(policy, False, ref if pcfg.kl_coef or pcfg.kl_loss_coef else None, tok, s, group, 1.0, "cpu")
        ppo.set_advantages(r, pcfg, seq_r, torch.ones(len(s.outs), dtype=torch.bool), critic, NEW)
        extra = None
        if expo_rows is not None:
            er = ppo.make_rollouts(*expo_rows, pad_id=0)
            extra = lambda m: ppo.expo_loss(m, er, 0.5, 1.0, pcfg.loss_agg, pcfg.max_len)
        info = rl.update(pcfg, policy, critic, opts, r, 1.0, 8, s.seed, extra=extra)
    return means, info


@pytest.mark.parametrize("algo", rl.ALGOS)
def test_each_algo_raises_a_learnable_reward(algo):
    means, info = run(algo)
    assert means[0] < 0.15 and sum(means[-3:]) / 3 > means[0] + 0.25, (algo, means)
    assert ("value_loss" in info) == (algo == "ppo")            # only PPO trains a critic
    assert ("kl_loss" in info) == (algo in ("grpo", "drgrpo"))  # GRPO's k3 KL term; DAPO drops it


def test_algo_configs_differ_in_the_documented_lines():
    c = lambda a: rl.algo_config(config.Config(algo=a), 8)
    assert c("ppo").adv_estimator == "gae" and c("ppo").whiten_advantages and c("ppo").kl_loss_coef == 0
    assert c("grpo").adv_estimator == "grpo" and c("grpo").loss_agg == "seq_mean" and c("grpo").kl_loss_coef == 0.04
    assert c("drgrpo").adv_estimator == "drgrpo" and c("drgrpo").loss_agg == "seq_sum_norm"
    assert c("drgrpo").max_len == config.Config().rl_max_new_tokens
    d = c("dapo")
    assert (d.clip_high, d.loss_agg, d.dynamic_sampling, d.kl_loss_coef) == (0.28, "token_mean", True, 0.0)
    assert d.overlong_buffer == 32 and d.no_eos_penalty == 0.0
    with pytest.raises(SystemExit, match="--algo=sgd"):
        c("sgd")


def test_rlsp_exploration_reward_is_learnable():
    """PPO on RLSP's exploration reward alone (rl.rewards adds it to a zero reward): the policy
    learns to open more distinct steps."""
    means, _ = run("ppo", reward_fn=lambda toks: 0.0, steps=14, rlsp_coef=1.0, rlsp_max_steps=4)
    assert sum(means[-3:]) / 3 > means[0] + 0.12, means


def test_expo_term_teaches_the_explanation():
    """GRPO whose reward starts at ~0 (a response must START with 7): ExPO rows (question, an
    explanation starting with 7) lift it; without them GRPO has no signal in all-zero groups."""
    first7 = lambda toks: float(bool(toks) and toks[0] == 7)
    rows = ([[1, 2, i % 30] for i in range(8)], [[7, 7, 5, 7] for _ in range(8)])
    with_expo, info = run("grpo", reward_fn=first7, steps=10, expo_rows=rows)
    assert "expo_logp" in info
    assert sum(with_expo[-3:]) / 3 > with_expo[0] + 0.3, with_expo


def test_set_advantages_group_rewards_by_hand():
    """GRPO family advantages on hand-made rewards: no-EOS penalty after the clip, overlong penalty,
    identical groups -> 0, Dr. GRPO without the std division."""
    r = ppo.make_rollouts([[1]] * 4, [[5, 6], [5], [5, 6, 7, 8], [5, 6, 7]], pad_id=0)
    seq = torch.tensor([20.0, 0.0, 1.0, 1.0])
    fin = torch.tensor([True, False, True, True])
    cfg = ppo.PPOConfig(adv_estimator="drgrpo", group=2, reward_clip=10.0, no_eos_penalty=-1.0)
    ppo.set_advantages(r, cfg, seq, fin)
    # group 1: rewards 10 (clipped) and 0 - 1 = -1 -> mean 4.5 -> +5.5 / -5.5; group 2: equal -> 0
    assert torch.allclose(r.advantages[:, 0], torch.tensor([5.5, -5.5, 0.0, 0.0]))
    assert torch.equal(r.advantages != 0, (r.mask > 0) & torch.tensor([True, True, False, False])[:, None])
    cfg = ppo.PPOConfig(adv_estimator="grpo", group=2, no_eos_penalty=0.0, overlong_buffer=2)
    ppo.set_advantages(r, cfg, torch.tensor([0.0, 0.0, 1.0, 1.0]), fin, budget=4)
    # overlong: lengths 2, 1 -> 0; lengths 4, 3 of budget 4 with buffer 2 -> -1, -0.5
    pen = torch.tensor([-1.0, -0.5])
    assert torch.allclose(r.advantages[2:, 0], (pen - pen.mean()) / (pen.std() + 1e-6))
    assert torch.all(r.advantages[:2] == 0)
    with pytest.raises(ValueError, match="needs a critic"):
        ppo.set_advantages(r, ppo.PPOConfig(), seq, fin)


def test_rlt_teacher_reward_is_learnable():
    """RLT: a frozen student that has learned 'a 5 in the explanation leads to the solution 9 9';
    the teacher (GRPO, rlt.teacher_reward with lambda 3, its own log-probs conditioned on the
    solution) learns to write explanations that make the solution likely for the student."""
    import random
    torch.manual_seed(1)
    student, rng = Transformer(CFG), random.Random(0)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    for _ in range(150):
        resp = []
        for _ in range(32):
            e = [rng.randrange(10, 30) for _ in range(rng.randrange(1, 6))]
            if rng.random() < 0.5:
                e[rng.randrange(len(e))] = 5
            resp.append(e + ([9, 9] if 5 in e else [3, 3]))
        r = ppo.make_rollouts([[1, 2]] * 32, resp, 0)
        loss = -(ppo.response_logprobs(student, r) * r.mask).sum() / r.mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval().requires_grad_(False)
    sol = [9, 9]

    def reward_for(teacher):
        def r(tokens):
            expl = tokens or [0]
            with torch.no_grad():   # the teacher sees the solution, the student does not
                t = ppo.response_logprobs(teacher, ppo.make_rollouts([[1, 2] + sol], [expl], 0))[0, :len(expl)]
                s = ppo.response_logprobs(student, ppo.make_rollouts([[1, 2]], [expl + sol], 0))[0]
            n = len(expl)
            return rlt.teacher_reward(s[n:n + 2], s[:n], t, lam=3.0, alpha=0.01)
        return r

    means, _ = run("grpo", reward_for=reward_for, steps=12)
    assert sum(means[-3:]) / 3 > means[0] + 2.0, means
