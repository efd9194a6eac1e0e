import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ppo  # noqa: E402

D = torch.float64


def t(x):
    return torch.tensor(x, dtype=D)


# -----------------------------------------------------------------------------
# GAE

def gae_bruteforce(rewards, values, lengths, gamma, lam):
    """Per-row python loop over the real prefix; V after the last real token = 0."""
    B, T = rewards.shape
    adv, ret = torch.zeros(B, T, dtype=D), torch.zeros(B, T, dtype=D)
    for b in range(B):
        L = lengths[b]
        for i in range(L):
            a = 0.0
            for k in range(i, L):  # A_i = sum_k (gamma lam)^(k-i) delta_k
                v_next = values[b, k + 1].item() if k + 1 < L else 0.0
                delta = rewards[b, k].item() + gamma * v_next - values[b, k].item()
                a += (gamma * lam) ** (k - i) * delta
            adv[b, i] = a
            ret[b, i] = a + values[b, i].item()
    return adv, ret


def test_gae_hand_example_3_tokens_with_padding():
    # r = [0, 0, 1], V = [.5, .6, .7], gamma 1, lam .95; 4th slot is padding with garbage
    rewards = t([[0.0, 0.0, 1.0, 100.0]])
    values = t([[0.5, 0.6, 0.7, 50.0]])
    mask = t([[1, 1, 1, 0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # delta2 = 1 - .7 = .3; delta1 = .7 - .6 = .1; delta0 = .6 - .5 = .1
    # A2 = .3; A1 = .1 + .95*.3 = .385; A0 = .1 + .95*.385 = .46575
    torch.testing.assert_close(adv, t([[0.46575, 0.385, 0.3, 0.0]]))
    torch.testing.assert_close(ret, t([[0.96575, 0.985, 1.0, 0.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.5, 0.0)])
def test_gae_matches_bruteforce_ragged(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 6, 9
    lengths = [9, 5, 1, 0, 7, 3]
    mask = torch.zeros(B, T, dtype=D)
    for b, L in enumerate(lengths):
        mask[b, :L] = 1
    rewards = torch.randn(B, T, generator=g, dtype=D)
    values = torch.randn(B, T, generator=g, dtype=D)  # garbage on padding too
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    adv_ref, ret_ref = gae_bruteforce(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(adv, adv_ref)
    torch.testing.assert_close(ret, ret_ref)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_gae_lam1_returns_are_discounted_reward_to_go():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(3, 6, generator=g, dtype=D)
    values = torch.randn(3, 6, generator=g, dtype=D)
    mask = t([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    gamma = 0.9
    _, ret = ppo.gae(rewards, values, mask, gamma=gamma, lam=1.0)
    for b, L in enumerate([6, 3, 1]):
        for i in range(L):
            rtg = sum(gamma ** (k - i) * rewards[b, k].item() for k in range(i, L))
            assert ret[b, i].item() == pytest.approx(rtg)


def test_gae_lam0_is_one_step_td():
    rewards = t([[1.0, 2.0, 3.0]])
    values = t([[0.5, 0.25, 1.0]])
    adv, _ = ppo.gae(rewards, values, torch.ones(1, 3, dtype=D), gamma=0.5, lam=0.0)
    # delta_t = r_t + .5 V_{t+1} - V_t, V_3 = 0
    torch.testing.assert_close(adv, t([[1.0 + 0.125 - 0.5, 2.0 + 0.5 - 0.25, 3.0 - 1.0]]))


def test_gae_bool_mask_and_float32():
    rewards = torch.tensor([[0.0, 1.0, 7.0]])
    values = torch.tensor([[0.2, 0.4, 9.0]])
    adv, ret = ppo.gae(rewards, values, torch.tensor([[True, True, False]]), 1.0, 1.0)
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[0.8, 0.6, 0.0]]))


# -----------------------------------------------------------------------------
# masked statistics

def test_masked_mean_and_empty():
    x = t([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    m = t([[1, 1, 0], [1, 0, 0]])
    assert ppo.masked_mean(x, m).item() == pytest.approx(2.0)
    torch.testing.assert_close(ppo.masked_mean(x, m, dim=1), t([1.5, 3.0]))
    assert ppo.masked_mean(x, torch.zeros_like(m)).item() == 0.0


def test_masked_whiten_ignores_padding():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 7, generator=g, dtype=D) * 3 + 5
    m = (torch.rand(4, 7, generator=g) > 0.3).to(D)
    w = ppo.masked_whiten(x, m)
    vals = w[m == 1]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-9)
    assert vals.std(unbiased=True).item() == pytest.approx(1.0, abs=1e-6)
    assert (w[m == 0] == 0).all()
    x2 = x.clone()
    x2[m == 0] = 1e6  # padding values must not matter
    torch.testing.assert_close(ppo.masked_whiten(x2, m), w)


def test_masked_whiten_hand():
    x = t([[1.0, 3.0, -50.0]])
    w = ppo.masked_whiten(x, t([[1, 1, 0]]))
    # mean 2, unbiased var 2 -> (+-1)/sqrt(2)
    torch.testing.assert_close(w, t([[-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]]))


# -----------------------------------------------------------------------------
# rewards

def test_kl_estimators():
    logp, ref = t([0.0, -1.0]), t([math.log(2.0), -1.0])
    torch.testing.assert_close(ppo.kl_penalty(logp, ref, "k1"), t([-math.log(2.0), 0.0]))
    # k3 = exp(ref - logp) - (ref - logp) - 1 = 2 - ln2 - 1
    torch.testing.assert_close(ppo.kl_penalty(logp, ref, "k3"), t([1.0 - math.log(2.0), 0.0]))
    assert (ppo.kl_penalty(torch.randn(50, dtype=D), torch.randn(50, dtype=D), "k3") >= 0).all()
    with pytest.raises(ValueError):
        ppo.kl_penalty(logp, ref, "k9")


def test_token_rewards_placement_clip_noeos_empty_row():
    mask = t([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])
    seq = t([1.0, 20.0, 5.0, -0.5])
    finished = torch.tensor([True, False, True, False])
    r = ppo.token_rewards(seq, mask, finished=finished, no_eos_penalty=-1.0, reward_clip=10.0)
    expected = t([[0, 0, 1.0, 0], [10.0 - 1.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, -1.5]])
    torch.testing.assert_close(r, expected)
    # no finished flags -> no penalty; no clip
    r = ppo.token_rewards(seq, mask, reward_clip=None)
    torch.testing.assert_close(r, t([[0, 0, 1.0, 0], [20.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, -0.5]]))


def test_token_rewards_kl_on_every_real_token():
    mask = t([[1, 1, 1], [1, 1, 0]])
    logp = t([[-1.0, -2.0, -0.5], [-1.0, -1.0, -9.0]])
    ref = t([[-1.5, -1.0, -0.5], [-2.0, -1.0, 3.0]])
    r = ppo.token_rewards(t([1.0, 0.0]), mask, logp, ref, kl_coef=0.1, estimator="k1")
    expected = t([[-0.05, 0.1, 1.0], [-0.1, 0.0, 0.0]])
    torch.testing.assert_close(r, expected)
    r3 = ppo.token_rewards(t([0.0, 0.0]), mask, logp, ref, kl_coef=0.1, estimator="k3")
    torch.testing.assert_close(r3, -0.1 * ppo.kl_penalty(logp, ref, "k3") * mask)


def test_dapo_overlong_boundaries():
    lengths = torch.tensor([50, 80, 81, 90, 100, 120])
    p = ppo.dapo_overlong_penalty(lengths, max_len=100, buffer_len=20)
    torch.testing.assert_close(p, torch.tensor([0.0, 0.0, -0.05, -0.5, -1.0, -1.0]))


# -----------------------------------------------------------------------------
# group advantages

def test_group_advantages_grpo_and_drgrpo():
    r = t([1, 0, 0, 1, 1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0, 0, 0, 0])
    a = ppo.group_advantages(r, 4)
    s = 0.5 / math.sqrt(1 / 3)  # unbiased std of {1,0,0,1} = sqrt(1/3)
    torch.testing.assert_close(a[:4], t([s, -s, -s, s]), atol=1e-5, rtol=1e-5)
    assert (a[4:] == 0).all()  # identical rewards -> exactly 0, even 0.1 with float noise
    a = ppo.group_advantages(r, 4, normalize_std=False)
    torch.testing.assert_close(a[:4], t([0.5, -0.5, -0.5, 0.5]))
    assert (a[4:] == 0).all()


def test_group_advantages_identical_rewards_exact_zero_float32():
    # float32 mean of eight 0.1s is not exactly 0.1; (r - mean) / (std + eps) would give ~7e-3
    for G in (3, 7, 8):
        for dt in (torch.float32, torch.float64):
            a = ppo.group_advantages(torch.full((2 * G,), 0.1, dtype=dt), G)
            assert (a == 0).all(), (G, dt, a)


def test_group_advantages_hand_group_of_3():
    a = ppo.group_advantages(torch.tensor([3.0, 0.0, 0.0]), 3, eps=0.0)
    # mean 1, unbiased std sqrt((4 + 1 + 1) / 2) = sqrt(3)
    torch.testing.assert_close(a, torch.tensor([2.0, -1.0, -1.0]) / math.sqrt(3.0))


def test_group_advantages_group_size_1_and_bad_shape():
    a = ppo.group_advantages(torch.tensor([1.0, 0.0, 5.0]), 1)
    assert torch.equal(a, torch.zeros(3)) and not torch.isnan(a).any()
    with pytest.raises(ValueError):
        ppo.group_advantages(torch.tensor([1.0, 0.0, 5.0]), 2)


def test_dynamic_sampling_keep():
    keep = ppo.dynamic_sampling_keep(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.2]), 2)
    assert keep.tolist() == [True, True, False, False, False, False, True, True]


# -----------------------------------------------------------------------------
# losses

def test_policy_loss_clip_cases():
    ratio = t([[1.5, 1.1, 0.5, 0.9, 0.5, 1.5, 50.0]])
    adv = t([[1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 1.0]])
    mask = t([[1, 1, 1, 1, 1, 1, 0]])  # last token is padding with a wild ratio
    old = t([[-1.0] * 7])
    logp = (old + ratio.log()).requires_grad_(True)
    loss, m = ppo.policy_loss(logp, old, adv, mask, clip_low=0.2)
    # per token: -1.2 (clipped, A>0 r>1.2), -1.1, 0.8 (clipped, A<0 r<0.8), 0.9,
    #            -0.5 (A>0 r<0.8: unclipped, pessimistic), 1.5 (A<0 r>1.2: unclipped)
    assert loss.item() == pytest.approx((-1.2 - 1.1 + 0.8 + 0.9 - 0.5 + 1.5) / 6)
    assert m["clipfrac"].item() == pytest.approx(2 / 6)
    r = ratio[0, :6]
    assert m["approx_kl"].item() == pytest.approx((r - 1 - r.log()).mean().item())
    loss.backward()
    g = logp.grad[0]
    # clipped tokens and padding get no gradient; others d/dlogp(-A r)/6 = -A r / 6
    assert g[0].item() == 0 and g[2].item() == 0 and g[6].item() == 0
    assert g[1].item() == pytest.approx(-1.1 / 6)
    assert g[4].item() == pytest.approx(-0.5 / 6)
    assert g[5].item() == pytest.approx(1.5 / 6)


def test_policy_loss_asymmetric_clip_high():
    old = t([[0.0, 0.0, 0.0]])
    logp = t([[math.log(1.25), math.log(1.5), math.log(0.7)]])
    adv = t([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3, dtype=D)
    loss_sym, m_sym = ppo.policy_loss(logp, old, adv, mask, 0.2)
    loss_dapo, m_dapo = ppo.policy_loss(logp, old, adv, mask, 0.2, clip_high=0.28)
    # symmetric: -1.2, -1.2, 0.8 (all clipped); DAPO: -1.25 (inside 1.28), -1.28, 0.8
    assert loss_sym.item() == pytest.approx((-1.2 - 1.2 + 0.8) / 3)
    assert m_sym["clipfrac"].item() == pytest.approx(1.0)
    assert loss_dapo.item() == pytest.approx((-1.25 - 1.28 + 0.8) / 3)
    assert m_dapo["clipfrac"].item() == pytest.approx(2 / 3)


def test_aggregate_loss_modes():
    lt = t([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = t([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert ppo.aggregate_loss(lt, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert ppo.aggregate_loss(lt, mask, "seq_mean").item() == pytest.approx((2 + 4) / 2)
    assert ppo.aggregate_loss(lt, mask, "seq_sum_norm", max_len=5).item() == pytest.approx(10 / 15)
    assert ppo.aggregate_loss(lt, mask, "seq_sum_norm").item() == pytest.approx(10 / 9)
    with pytest.raises(ValueError):
        ppo.aggregate_loss(lt, mask, "nope")


def test_value_loss_clip_cases():
    values = t([[1.0, 0.6, 0.0, 1.5, 0.0, 1.0, 99.0]])
    old = t([[0.5, 0.5, 0.5, 1.0, 1.0, 0.0, 0.0]])
    ret = t([[1.0, 1.0, 1.0, 0.0, 0.5, 2.0, 0.0]])
    mask = t([[1, 1, 1, 1, 1, 1, 0]])
    loss, m = ppo.value_loss(values, old, ret, mask, value_clip=0.2)
    # 0.5*max(err, err_clip): (0, .09)->.045 clipped; .16->.08; (1,.49)->.5; (2.25,1.44)->1.125;
    # (.25,.09)->.125; (1, 3.24)->1.62 clipped
    assert loss.item() == pytest.approx((0.045 + 0.08 + 0.5 + 1.125 + 0.125 + 1.62) / 6)
    assert m["vf_clipfrac"].item() == pytest.approx(2 / 6)
    loss, m = ppo.value_loss(values, old, ret, mask, value_clip=None)
    assert loss.item() == pytest.approx(0.5 * (0 + 0.16 + 1 + 2.25 + 0.25 + 1) / 6)
    assert m["vf_clipfrac"].item() == 0.0
