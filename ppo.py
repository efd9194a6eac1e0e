"""
PPO / GRPO math for RL post-training of reasoning LLMs: plain tensor functions, then the update
that runs the models over a batch of rollouts.

Conventions (every function below):
- Per-token tensors are [B, T] over the RESPONSE tokens only (prompt excluded), right-padded.
- `mask` [B, T] is 1.0 on real response tokens and 0.0 on padding (bool is accepted too).
  Every per-token output is exactly 0 where mask is 0.
- `logp` is log pi(token) of the sampled token, so ratio = exp(logp - old_logp) per token.
- Sequence-level things (rewards, GRPO advantages, lengths) are [B]. For GRPO, B = n_prompts *
  group with the samples of one prompt contiguous.

Sections: config -> masked statistics -> rewards (KL, token rewards, DAPO overlong) -> advantages
(GAE, GRPO / Dr. GRPO, dynamic sampling) -> losses (policy, value, aggregation) -> rollouts and
the update (model forwards, a batch's advantages, minibatches and micro-batches) -> ExPO's term.
"""
from dataclasses import dataclass
from typing import Optional

import torch

import parallel
from sft import skip_if_nonfinite

# -----------------------------------------------------------------------------
# config

@dataclass
class PPOConfig:
    # advantages
    adv_estimator: str = "gae"       # "gae" (PPO with critic) | "grpo" | "drgrpo" (group baselines, no critic)
    gamma: float = 1.0               # discount; 1 = undiscounted episodic return (Satori)
    lam: float = 0.95                # GAE lambda: 1 = Monte-Carlo return, 0 = one-step TD
    whiten_advantages: bool = True   # whiten A over all real tokens of the batch (Satori: yes; GRPO: no)
    group: int = 1                   # samples per prompt (Satori round 1: 1; round 2 / GRPO: 8)
    # rewards
    reward_clip: Optional[float] = 10.0   # clip the sequence reward to +-reward_clip (None = off)
    no_eos_penalty: float = -1.0     # added to the sequence reward of a response that never emitted EOS
    kl_coef: float = 0.0             # beta of the per-token -beta*KL reward (PPO style); Satori uses 0
    kl_loss_coef: float = 0.0        # beta of a KL term added to the loss instead (GRPO style, 0.04)
    kl_estimator: str = "k1"         # "k1" (log-ratio, for the reward) | "k3" (non-negative, for the loss)
    overlong_buffer: int = 0         # DAPO soft overlong penalty over the last N tokens of the budget (0 = off)
    dynamic_sampling: bool = False   # DAPO: drop groups whose rewards are all equal (zero advantage)
    # losses
    clip: float = 0.2                # PPO ratio clip eps (lower side, and upper side unless clip_high)
    clip_high: Optional[float] = None  # upper clip eps (DAPO: 0.28); None = same as clip
    value_clip: Optional[float] = 0.2  # clip V around the rollout-time value (None = off)
    ent_coef: float = 0.0            # weight of the entropy bonus (loss -= ent_coef * entropy, aggregated like the loss)
    loss_agg: str = "token_mean"     # "token_mean" (PPO, DAPO) | "seq_mean" (GRPO) | "seq_sum_norm" (Dr. GRPO)
    max_len: Optional[int] = None    # constant divisor of "seq_sum_norm": the generation budget
    # optimisation
    grad_clip: float = 1.0
    ppo_epochs: int = 1              # passes over each rollout batch
    minibatch_size: int = 128        # sequences per optimizer step over ALL ranks (Satori train batch)
    max_bad_steps: int = 5           # non-finite optimizer steps in a row (each skipped) before ppo_update raises

# -----------------------------------------------------------------------------
# masked statistics

def masked_mean(x, mask, dim=None):
    """Mean of x over entries where mask is 1; 0 (not nan) when the mask is empty."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)

def _masked_moments(x, mask, unbiased, all_ranks):
    """(mean, variance) over the masked entries; all_ranks: over every rank's entries, with two
    all_sums (the global sum and count, then the global sum of squared deviations), so the numbers
    are those of one process holding all the rows. mask is already in x's dtype."""
    s = torch.stack([(x * mask).sum(), mask.sum()])
    total, n = parallel.all_sum(s) if all_ranks else s
    mean = total / n.clamp(min=1.0)
    sq = ((x - mean) ** 2 * mask).sum()
    var = (parallel.all_sum(sq) if all_ranks else sq) / n.clamp(min=1.0)
    if unbiased:
        var = var * n / (n - 1) if n > 1 else torch.zeros_like(var)
    return mean, var

def masked_whiten(x, mask, eps=1e-8, all_ranks=True):
    """(x - mean) / std over the masked entries of the whole batch; padding -> 0.
    std is the unbiased one, so the result has mean 0 and unbiased std 1 over the mask.
    The whole batch is every rank's rows under torchrun (all_ranks, the default: a collective, so
    every rank must call it); in one process all_ranks changes nothing."""
    mask = mask.to(x.dtype)
    mean, var = _masked_moments(x, mask, True, all_ranks)
    return (x - mean) * torch.rsqrt(var + eps) * mask

def last_token_index(mask):
    """[B, T] mask -> ([B] index of the last real token, [B] bool row has any token)."""
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device).expand(mask.shape[0], T)
    last = torch.where(mask > 0, pos, torch.full_like(pos, -1)).max(dim=1).values  # [B]
    return last.clamp(min=0), last >= 0

# -----------------------------------------------------------------------------
# rewards

def kl_penalty(logp, ref_logp, estimator="k1"):
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi, [B, T].
    k1 = log pi - log pi_ref (unbiased, can be negative; the PPO reward term);
    k3 = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1 (unbiased, >= 0; the GRPO loss term)."""
    log_ratio = logp - ref_logp
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.exp(-log_ratio) + log_ratio - 1.0
    raise ValueError(f"unknown kl estimator {estimator!r} (expected 'k1' or 'k3')")

@torch.no_grad()
def token_rewards(seq_rewards, mask, logp=None, ref_logp=None, kl_coef=0.0, estimator="k1",
                  finished=None, no_eos_penalty=-1.0, reward_clip=10.0):
    """Dense per-token rewards [B, T] for GAE.
    Every real token gets -kl_coef * KL(logp, ref_logp); the last real token of each row also gets
    clip(seq_reward, +-reward_clip) + (no_eos_penalty if that row is not `finished`).
    Rows with no real token get all zeros. `finished` [B] bool: True = the response emitted EOS;
    None = all finished. The penalty is added after clipping, so it is never clipped away."""
    B, T = mask.shape
    seq_rewards = seq_rewards.to(torch.promote_types(seq_rewards.dtype, torch.float32))
    mask = mask.to(seq_rewards.dtype)
    rewards = torch.zeros(B, T, dtype=seq_rewards.dtype, device=mask.device)
    if kl_coef != 0.0:
        assert logp is not None and ref_logp is not None, "kl_coef > 0 needs logp and ref_logp"
        rewards = rewards - kl_coef * kl_penalty(logp, ref_logp, estimator).to(rewards.dtype)
    r = seq_rewards if reward_clip is None else seq_rewards.clamp(-reward_clip, reward_clip)  # [B]
    if finished is not None:
        r = r + (~finished.bool()).to(r.dtype) * no_eos_penalty
    last, has = last_token_index(mask)
    end = torch.zeros_like(rewards).scatter_(1, last[:, None], (r * has.to(r.dtype))[:, None])
    return (rewards + end) * mask

def dapo_overlong_penalty(lengths, max_len, buffer_len):
    """DAPO soft overlong punishment, [B]: 0 up to max_len - buffer_len, then linear down to -1 at
    max_len; -1 beyond max_len (the paper's third case). buffer_len <= 0: -1 only past max_len."""
    lengths = lengths.to(torch.float32)
    if buffer_len <= 0:
        return -(lengths > max_len).to(torch.float32)
    start = max_len - buffer_len
    return ((start - lengths) / buffer_len).clamp(min=-1.0, max=0.0)

# -----------------------------------------------------------------------------
# advantages

@torch.no_grad()
def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation over response tokens -> (advantages, returns), [B, T].
    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1};  R_t = A_t + V_t.
    The value after the last real token is 0 (the episode ends there) and padding contributes
    nothing: V_{t+1} and A_{t+1} are taken as 0 where mask[t+1] is 0 (a hole in the mask would act
    as an episode end). Both outputs are 0 where mask is 0. Not whitened here."""
    dt = torch.promote_types(values.dtype, torch.float32)
    rewards, values, mask = rewards.to(dt), values.to(dt), mask.to(dt)
    B, T = mask.shape
    values = values * mask                                   # padding values never leak in
    adv = torch.zeros(B, T, dtype=dt, device=values.device)
    next_value = torch.zeros(B, dtype=dt, device=values.device)
    next_adv = torch.zeros(B, dtype=dt, device=values.device)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv[:, t] = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value, next_adv = values[:, t], adv[:, t]      # both already 0 on padding
    returns = (adv + values) * mask
    return adv, returns

@torch.no_grad()
def group_advantages(rewards, group, normalize_std=True, eps=1e-6):
    """GRPO outcome advantages [B] (broadcast over the tokens of each sample by the caller):
    A_i = (r_i - mean_g) / (std_g + eps), std unbiased (torch.std default, as TRL's GRPO);
    normalize_std=False is Dr. GRPO (A_i = r_i - mean_g). Groups whose rewards are all equal, and
    group 1, give exactly 0 (no nan, no float noise amplified by 1/eps)."""
    B = rewards.shape[0]
    if B % group != 0:
        raise ValueError(f"batch {B} is not a multiple of group {group}")
    r = rewards.to(torch.promote_types(rewards.dtype, torch.float32)).view(-1, group)  # [P, G]
    if group == 1:
        return torch.zeros_like(r).view(B)
    adv = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    same = r.max(dim=1, keepdim=True).values == r.min(dim=1, keepdim=True).values  # [P, 1]
    return adv.masked_fill(same, 0.0).view(B)

def dynamic_sampling_keep(rewards, group):
    """DAPO dynamic sampling: bool [B], True for every sample of a group whose rewards are not all
    equal (all-right / all-wrong groups have zero advantage and only dilute the batch)."""
    r = rewards.view(-1, group)
    varied = r.max(dim=1).values != r.min(dim=1).values   # [P]
    return varied.repeat_interleave(group)

# -----------------------------------------------------------------------------
# losses

def aggregate_loss(loss_tok, mask, agg="token_mean", max_len=None):
    """Reduce per-token losses [B, T] to a scalar.
    token_mean:   sum over all real tokens / their count (every token weighs the same; PPO, DAPO).
    seq_mean:     mean over rows of each row's token mean (GRPO); rows without tokens are skipped.
    seq_sum_norm: sum over all real tokens / (B * max_len) (Dr. GRPO: each row's sum divided by a
                  constant, so long rows are not down-weighted); max_len defaults to T, but pass the
                  generation budget so the scale does not depend on the batch's padding."""
    mask = mask.to(loss_tok.dtype)
    if agg == "token_mean":
        return masked_mean(loss_tok, mask)
    if agg == "seq_mean":
        n = mask.sum(1)                                        # [B]
        row = (loss_tok * mask).sum(1) / n.clamp(min=1.0)      # [B]
        return (row * (n > 0)).sum() / (n > 0).sum().clamp(min=1)
    if agg == "seq_sum_norm":
        L = mask.shape[1] if max_len is None else max_len
        return (loss_tok * mask).sum() / (mask.shape[0] * L)
    raise ValueError(f"unknown loss_agg {agg!r}")

def policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=None,
                agg="token_mean", max_len=None):
    """PPO clipped surrogate: per token max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)).
    ratio = exp(logp - old_logp); clip_high None = clip_low (symmetric).
    Returns (loss scalar, metrics of detached scalars):
      clipfrac:  share of real tokens where the clipped term is the active one (gradient cut);
      approx_kl: k3 estimate of KL(old || new) = mean(ratio - 1 - log ratio), >= 0 (Schulman);
      ratio:     mean ratio (should stay near 1)."""
    clip_high = clip_low if clip_high is None else clip_high
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = aggregate_loss(torch.maximum(pg1, pg2), mask, agg, max_len)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((pg2 > pg1).to(logp.dtype), mask),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, metrics

def value_loss(values, old_values, returns, mask, value_clip=0.2, agg="token_mean", max_len=None):
    """Clipped value loss: per token 0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2).
    value_clip None = plain 0.5 * (V - R)^2. Returns (loss, {"vf_clipfrac": share of real tokens
    where the clipped error is the larger one})."""
    err = (values - returns) ** 2
    if value_clip is None:
        err_max, clipped = err, torch.zeros_like(err)
    else:
        v_clip = old_values + (values - old_values).clamp(-value_clip, value_clip)
        err_clip = (v_clip - returns) ** 2
        err_max, clipped = torch.maximum(err, err_clip), (err_clip > err)
    loss = aggregate_loss(0.5 * err_max, mask, agg, max_len)
    with torch.no_grad():
        metrics = {"vf_clipfrac": masked_mean(clipped.to(values.dtype), mask)}
    return loss, metrics

# -----------------------------------------------------------------------------
# rollouts and the update: model forwards, a batch's advantages, minibatches, micro-batches

@dataclass
class Rollouts:
    """A batch of prompt + response rows, right-padded. Per-token tensors are [B, T] over the
    response tokens, as everywhere in this file; the rest is what the forwards need."""
    ids: torch.Tensor         # [B, L] prompt + response token ids, padded
    prompt_lens: torch.Tensor  # [B]
    resp_lens: torch.Tensor    # [B]
    mask: torch.Tensor         # [B, T] 1.0 on response tokens
    old_logp: torch.Tensor = None    # [B, T] log-probs under the policy that sampled them
    values: torch.Tensor = None      # [B, T] critic values at rollout time
    ref_logp: torch.Tensor = None    # [B, T] reference log-probs (only when a KL term is on)
    advantages: torch.Tensor = None  # [B, T]
    returns: torch.Tensor = None     # [B, T]

    def select(self, idx):
        """The rows idx, trimmed to their longest row."""
        plen, rlen = self.prompt_lens[idx], self.resp_lens[idx]
        L, T = int((plen + rlen).max()), int(rlen.max())
        pick = lambda x: None if x is None else x[idx][:, :T]
        return Rollouts(self.ids[idx][:, :L], plen, rlen, pick(self.mask), pick(self.old_logp), pick(self.values),
                        pick(self.ref_logp), pick(self.advantages), pick(self.returns))


def make_rollouts(prompts, responses, pad_id, device=None):
    """prompts, responses: lists of token-id lists -> Rollouts with ids and masks."""
    plen = torch.tensor([len(p) for p in prompts])
    rlen = torch.tensor([len(r) for r in responses])
    L, T = int((plen + rlen).max()), max(1, int(rlen.max()))
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, :len(p) + len(r)] = torch.tensor(p + r)
    mask = (torch.arange(T)[None] < rlen[:, None]).float()
    return Rollouts(ids.to(device), plen.to(device), rlen.to(device), mask.to(device))


def stand_in(model):
    """One row of one token: what a rank without rows of its own runs through a sharded model, whose
    forward and backward are collectives every rank must join (its loss then counts zero)."""
    return make_rollouts([[0]], [[0]], 0, next(model.parameters()).device)


def _token_positions(r: Rollouts):
    """(rows [N], cols [N], targets [N]) of every response token: the logits predicting token j of
    row b sit at position prompt_len + j - 1. Ordered like r.mask.nonzero()."""
    b, j = r.mask.nonzero(as_tuple=True)
    pos = r.prompt_lens[b] + j
    return b, pos - 1, r.ids[b, pos]


def response_logprobs(model, r: Rollouts, temperature=1.0, with_entropy=False):
    """log pi(token) of every response token, [B, T] (and the entropy, [B, T]), through the fused
    head + log-softmax: the [B, L, V] logits are never built."""
    import logprobs
    rows, cols, targets = _token_positions(r)
    h = model.hidden(r.ids)[rows, cols]                                     # [N, H]
    out = logprobs.token_logprobs(h, model.lm_head.weight, targets, temperature, return_entropy=with_entropy)
    lp, ent = out if with_entropy else (out, None)
    scatter = lambda x: torch.zeros_like(r.mask, dtype=x.dtype).index_put((rows, cols - r.prompt_lens[rows] + 1), x)
    return (scatter(lp), scatter(ent)) if with_entropy else scatter(lp)


def response_values(critic, r: Rollouts):
    """V(state before each response token), [B, T]: the critic at the position that predicts it."""
    rows, cols, _ = _token_positions(r)
    v = critic(r.ids)[rows, cols].float()           # bf16 under autocast: values and their clip in fp32
    return torch.zeros_like(r.mask, dtype=v.dtype).index_put((rows, cols - r.prompt_lens[rows] + 1), v)


@torch.no_grad()
def set_advantages(r: Rollouts, cfg: PPOConfig, seq_rewards, finished, critic=None, budget=None):
    """Fill r.advantages (and, with a critic, r.values and r.returns) from sequence rewards [B] and
    finished [B] (False = never emitted EOS). r.old_logp, and r.ref_logp when cfg.kl_coef > 0, must
    be set. This is where PPO and the GRPO family differ:
      gae:           reward on the last token (+ -kl_coef * KL per token), GAE over the critic's values,
                     advantages whitened over the batch (cfg.whiten_advantages);
      grpo / drgrpo: one advantage per sample, its reward against its group's (group_advantages,
                     std-normalised for grpo only), on every token of the sample; no critic.
    budget: the generation budget, for DAPO's overlong penalty (cfg.overlong_buffer > 0).
    Under torchrun r is this rank's rows: the whitening statistics are those of every rank's tokens
    (masked_whiten, a collective: call it on every rank), while a GRPO group lives on one rank and
    needs nothing from the others."""
    if cfg.adv_estimator == "gae":
        if critic is None:
            raise ValueError("adv_estimator 'gae' needs a critic")
        r.values = response_values(critic, r)
        rewards = token_rewards(seq_rewards, r.mask, r.old_logp, r.ref_logp, cfg.kl_coef, cfg.kl_estimator,
                                finished, cfg.no_eos_penalty, cfg.reward_clip)
        adv, r.returns = gae(rewards, r.values, r.mask, cfg.gamma, cfg.lam)
        r.advantages = masked_whiten(adv, r.mask) if cfg.whiten_advantages else adv
        return
    if cfg.adv_estimator not in ("grpo", "drgrpo"):
        raise ValueError(f"unknown adv_estimator {cfg.adv_estimator!r}")
    seq = seq_rewards.float()
    if cfg.reward_clip is not None:
        seq = seq.clamp(-cfg.reward_clip, cfg.reward_clip)
    seq = seq + (~finished.bool()).float() * cfg.no_eos_penalty
    if cfg.overlong_buffer:
        seq = seq + dapo_overlong_penalty(r.resp_lens, budget, cfg.overlong_buffer)
    adv = group_advantages(seq, cfg.group, normalize_std=cfg.adv_estimator == "grpo")
    r.advantages = adv[:, None] * r.mask


def _minibatch_totals(mb_mask):
    """[tokens, non-empty rows, rows] of the GLOBAL minibatch: this rank's part of it summed over
    the ranks (one collective), in mb_mask's float dtype."""
    m = mb_mask.float() if not mb_mask.is_floating_point() else mb_mask
    t = torch.stack([m.sum(), (m.sum(1) > 0).to(m.dtype).sum(), m.new_tensor(float(m.shape[0]))])
    return parallel.all_sum(t)


def _weight(mask, totals, agg):
    """Weight of a micro-batch's aggregated loss in its global minibatch (totals: _minibatch_totals),
    so that accumulating micro-batches, and summing gradients over ranks, gives exactly the
    minibatch's loss for every aggregation."""
    if agg == "token_mean":
        return float(mask.sum() / totals[0].clamp(min=1))
    if agg == "seq_mean":
        return float((mask.sum(1) > 0).sum() / totals[1].clamp(min=1))
    return mask.shape[0] / int(totals[2])


def rank_weight(mask, agg, device):
    """This rank's weight for rows the ranks hold in unequal parts (mask [b, T] of its rows, or None
    for none), as agg weighs them (1.0 in one process). Each rank scaling its aggregated loss by it
    makes the sum over ranks the loss of one process holding every row (ExPO's term; for
    seq_sum_norm with a fixed max_len, as rl.py passes). A collective: every rank calls it."""
    totals = _minibatch_totals(mask if mask is not None else torch.zeros(0, 1, device=device))
    return 0.0 if mask is None else _weight(mask, totals, agg)


def _check_ranks(B, cfg, extra_loss):
    """Refuse, on every rank alike, a split of the rollouts that would give the ranks different
    numbers of optimizer steps (a hang at the first collective otherwise).
    -> (local minibatch size, number of ranks with an extra_loss)."""
    world = parallel.world()
    if cfg.minibatch_size % world:
        raise ValueError(f"minibatch_size={cfg.minibatch_size} (rows per optimizer step over all ranks) is not "
                         f"divisible by the world size {world}")
    n, sq, n_extra = parallel.all_sum([B, B * B, int(extra_loss is not None)])
    if n * n != world * sq:     # sum(B)^2 == world * sum(B^2) only when every B is the same
        raise ValueError(f"ppo_update: the ranks hold different numbers of rollout rows ({B} here, {n} on "
                         f"{world} ranks): each must hold B / world of them")
    return cfg.minibatch_size // world, n_extra


def _accumulate(policy, critic, r, mb_idx, cfg, temperature, micro_batch_size):
    """Backward of the policy (and value) loss of this rank's rows mb_idx of a minibatch, in
    micro-batches each weighted by its part of the global minibatch -> this rank's part of the
    step's metrics (summed over the ranks by the caller)."""
    totals = _minibatch_totals(r.mask[mb_idx])
    step = {}
    # rows of like length share a micro-batch, which is cut to its longest row: less padding, and
    # the same gradient, since every micro-batch's loss is weighted by the whole minibatch's totals
    mb_idx = mb_idx[torch.argsort(r.prompt_lens[mb_idx] + r.resp_lens[mb_idx], stable=True)]
    for idx in mb_idx.split(micro_batch_size):
        m = r.select(idx)
        w = _weight(m.mask, totals, cfg.loss_agg)         # weight of this micro-batch's loss
        wt = _weight(m.mask, totals, "token_mean")       # weight of its token-mean metrics
        logp, ent = response_logprobs(policy, m, temperature, with_entropy=True)
        loss, info = policy_loss(logp, m.old_logp, m.advantages, m.mask, cfg.clip, cfg.clip_high,
                                 cfg.loss_agg, cfg.max_len)
        info["entropy"] = masked_mean(ent.detach(), m.mask)
        losses = {}                                      # aggregated like the loss: weight w
        if cfg.ent_coef:   # aggregated like the loss (and not detached: the bonus needs its gradient)
            loss = loss - cfg.ent_coef * aggregate_loss(ent, m.mask, cfg.loss_agg, cfg.max_len)
        if cfg.kl_loss_coef:
            kl = aggregate_loss(kl_penalty(logp, m.ref_logp, cfg.kl_estimator), m.mask, cfg.loss_agg, cfg.max_len)
            loss, losses["kl_loss"] = loss + cfg.kl_loss_coef * kl, kl.detach()
        (loss * w).backward()
        losses["policy_loss"] = loss.detach()
        if critic is not None:
            vloss, vinfo = value_loss(response_values(critic, m), m.values, m.returns, m.mask,
                                      cfg.value_clip, cfg.loss_agg, cfg.max_len)
            (vloss * w).backward()
            info.update(vinfo)
            losses["value_loss"] = vloss.detach()
        for weight, metrics in ((wt, info), (w, losses)):
            for k, v in metrics.items():
                step[k] = step.get(k, 0.0) + weight * float(v)
    return step


def _extra_backward_and_sum(step, policy, extra_loss, n_extra):
    """The backward of extra_loss on the ranks that have one, then the step's metrics summed over
    the ranks (extra_loss's are only known to those ranks; the other keys are the same on all)."""
    extra = {}
    if extra_loss is not None:
        loss, info = extra_loss(policy)
        loss.backward()
        extra = {k: float(v) for k, v in info.items()}
    elif n_extra and parallel.is_sharded(policy):     # FSDP2's gathers are collectives: join them
        (response_logprobs(policy, stand_in(policy)).sum() * 0.0).backward()
    step = dict(zip(step, parallel.all_sum(list(step.values()))))
    if n_extra:
        parts = [p for p in parallel.gather([extra]) if p]
        step.update({k: sum(p[k] for p in parts) for k in (parts[0] if parts else {})})
    return step


def _clip_grads(policy, critic, critic_opt, cfg, step):
    """Sum the gradients over the ranks and clip them -> the values whose finiteness decides the
    step (global, so every rank takes the same decision)."""
    parallel.sync_grads(policy.parameters())
    step["grad_norm"] = parallel.clip_grad_norm(policy.parameters(), cfg.grad_clip)
    checked = {"loss": step["policy_loss"], "value loss": step.get("value_loss", 0.0), "grad norm": step["grad_norm"]}
    if critic is not None:
        parallel.sync_grads(critic.parameters())
        if critic_opt is not None:
            step["critic_grad_norm"] = parallel.clip_grad_norm(critic.parameters(), cfg.grad_clip)
            checked["critic grad norm"] = step["critic_grad_norm"]
    return checked


def ppo_update(policy, opt, r: Rollouts, cfg: PPOConfig, critic=None, critic_opt=None, temperature=1.0,
               micro_batch_size=16, generator=None, extra_loss=None, log=print, nonfinite=0, what="ppo_update"):
    """cfg.ppo_epochs passes over the rollouts in minibatches of cfg.minibatch_size rows, each an
    optimizer step accumulated over micro-batches. r must hold old_logp, advantages and (with a
    critic) values and returns; ref_logp too when cfg.kl_loss_coef > 0. extra_loss(policy) ->
    (loss, metrics), when given, is added to every optimizer step's loss (ExPO's term).
    Under torchrun r is this rank's rows (the same number on every rank) and cfg.minibatch_size is
    global: each rank steps through its rows minibatch_size // world at a time, losses are weighted
    by global counts and gradients summed over ranks (parallel.sync_grads, or FSDP2 when the models
    are sharded), so the step is that of one process holding the global minibatch. extra_loss, computed by each rank on its own rows, and
    its metrics are summed over the ranks like the gradients (scaled by rank_weight they are the
    one-process term); a rank with nothing to add passes None (a zero term).
    A step whose (global) loss or gradient norm is not finite is skipped (sft.skip_if_nonfinite);
    nonfinite: such steps in a row before this call (an RL loop carries it from step to step, so
    cfg.max_bad_steps of them in a row abort the run as in SFT); what: how warnings name the call.
    Returns the mean of each (global) metric over the steps that were taken, "skipped_steps",
    "optimizer_steps" (taken + skipped) and "nonfinite_in_a_row"."""
    B = r.ids.shape[0]
    local_mb, n_extra = _check_ranks(B, cfg, extra_loss)
    say = log if parallel.is_main() else (lambda *a, **k: None)
    done, skipped = [], []
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=generator).to(r.ids.device)
        for mb_idx in order.split(local_mb):
            for o in (opt, critic_opt):
                if o is not None:
                    o.zero_grad(set_to_none=True)
            step = _accumulate(policy, critic, r, mb_idx, cfg, temperature, micro_batch_size)
            step = _extra_backward_and_sum(step, policy, extra_loss, n_extra)
            checked = _clip_grads(policy, critic, critic_opt, cfg, step)
            nonfinite = skip_if_nonfinite(checked, nonfinite, cfg.max_bad_steps,
                                          f"{what}, update {len(done) + len(skipped) + 1}", say)
            (skipped if nonfinite else done).append(step)
            for o in (opt, critic_opt):
                if o is not None and not nonfinite:
                    o.step()
                elif o is not None:
                    o.zero_grad(set_to_none=True)
    hist = done or skipped      # when every step was skipped, their (non-finite) metrics say so
    out = {k: sum(s[k] for s in hist) / len(hist) for k in (hist[0] if hist else {})}
    out.update(skipped_steps=len(skipped), optimizer_steps=len(done) + len(skipped), nonfinite_in_a_row=nonfinite)
    return out

# -----------------------------------------------------------------------------
# ExPO self-explanation term

def expo_loss(model, r: Rollouts, beta=0.04, temperature=1.0, agg="token_mean", max_len=None, weight=1.0):
    """ExPO: the GRPO objective gains + beta * log pi(c~, a* | q), so the loss gains
        -beta * aggregate(log pi(token)) over the tokens of c~ (which ends in \\boxed{a*}).
    r: rows of QUESTION-ONLY prompts (tok.prompt(q), not reward.expo_prompt) + the
    self-explanation tokens as responses (make_rollouts; no old_logp / advantages needed: this is a
    plain likelihood term, no ratio or clip). agg / max_len as aggregate_loss (use the update's).
    weight: under torchrun, this rank's rank_weight of the rows; loss and metric are scaled by it.
    Returns (loss, {"expo_logp": the aggregated log-prob, detached})."""
    logp = response_logprobs(model, r, temperature)                      # [B, T], 0 on padding
    lp = weight * aggregate_loss(logp, r.mask, agg, max_len)
    return -beta * lp, {"expo_logp": lp.detach()}

def expo_select(rewards, group, threshold=0.0):
    """bool [P]: the prompts whose group's mean reward is <= threshold (+1e-6 for float noise), i.e.
    where the policy is stuck near zero reward, which is where ExPO helps. rewards [B] with each
    prompt's group samples contiguous (as group_advantages). threshold is in the reward's own
    units: 0.0 for 1/0 accuracy rewards (all wrong), -1.0 for Satori's 0/-1 r_rule."""
    B = rewards.shape[0]
    if B % group != 0:
        raise ValueError(f"batch {B} is not a multiple of group {group}")
    mean = rewards.to(torch.float64).view(-1, group).mean(dim=1)   # [P]
    return mean <= threshold + 1e-6
