"""The RL loop every method shares, one step in five phases:
sample (rollout.Sampler) -> rollouts (old and reference log-probs) -> rewards (reward.py) ->
advantages (ppo.set_advantages) -> update (ppo.ppo_update), then the step's metrics.

    from rl import rl_train
    rl_train(cfg, policy, tok, problems, pool, temperature=1.2, group=1, steps=160, critic=critic, orm=orm)

PPO (Satori), GRPO, Dr. GRPO and DAPO differ in algo_config, in ppo.set_advantages and, for DAPO,
in the refills of sample_groups; RLSP adds an exploration reward (rewards), ExPO a likelihood term
on self-explanations (expo_term), RLT replaces the reward (reward_fn, rlt.py). train.py loads a
stage's models, calls rl_train and saves the result:  python train.py --stages=rl
"""
import copy
import math
import random
import time
from dataclasses import dataclass

import torch

import checkpoint
import parallel
from model import autocast, compute_dtype
import ppo
import reward
from rollout import Sampler, blocks_that_fit, generate_shared
from sft import SFTConfig, fmt_time, lr_at
from tokenizer import REFLECT

# -----------------------------------------------------------------------------
# sampling and grading (also used by the ORM / RAE and distillation stages)

def sample_and_grade(sampler, tok, problems, prompts, qids, group, temperature, max_new_tokens, seed, skip=None):
    """`group` samples of each prompt -> (completions, correct) in prompt-major order. The graded
    text of a sample is everything after its question's own prompt (a restart prefix included):
    skip[i] = tokens of prompts[i] that belong to that prefix-free prompt. Local to this process."""
    rep = [p for p in prompts for _ in range(group)]
    outs = sampler.generate(rep, max_new_tokens, temperature=temperature, stop_ids=tok.stop_ids, seed=seed)
    correct = []
    for i, o in enumerate(outs):
        k = i // group
        body = rep[i][skip[k]:] if skip else []
        correct.append(reward.grade(tok.decode(body + o.body), problems[qids[k]]) is True)
    return outs, correct


def sample_all(sampler, tok, problems, prompts, qids, group, temperature, max_new_tokens, seed):
    """`group` samples of every prompt, the prompts shared out over the processes -> per prompt,
    its [(response ids, correct)] * group, on every process."""
    outs = generate_shared(sampler, prompts, max_new_tokens, seed, group, temperature=temperature, stop_ids=tok.stop_ids)
    return [[(o.tokens, reward.grade(tok.decode(o.body), problems[q]) is True)
             for o in outs[i * group:(i + 1) * group]] for i, q in enumerate(qids)]

# -----------------------------------------------------------------------------
# the methods' settings

ALGOS = ("ppo", "grpo", "drgrpo", "dapo")


def algo_config(cfg, group):
    """The PPOConfig of --algo: where PPO, GRPO, Dr. GRPO and DAPO differ (DAPO also refills its
    batch, sample_groups)."""
    common = dict(gamma=cfg.gamma, lam=cfg.lam, clip=cfg.clip_eps, ppo_epochs=cfg.ppo_epochs,
                  minibatch_size=cfg.minibatch_size, grad_clip=cfg.clip, group=group,
                  reward_clip=cfg.reward_clip or None, ent_coef=cfg.ent_coef)
    if cfg.algo == "ppo":      # critic + GAE, advantages whitened over the batch, per-token KL reward
        return ppo.PPOConfig(adv_estimator="gae", value_clip=cfg.value_clip, kl_coef=cfg.kl_coef,
                             no_eos_penalty=cfg.no_eos_penalty, **common)
    grpo = dict(common, whiten_advantages=False, kl_estimator="k3", no_eos_penalty=cfg.no_eos_penalty)
    if cfg.algo == "grpo":     # (r - group mean) / group std, k3 KL in the loss, mean of sequence means
        return ppo.PPOConfig(adv_estimator="grpo", kl_loss_coef=cfg.grpo_kl, loss_agg="seq_mean", **grpo)
    if cfg.algo == "drgrpo":   # no std division; token sums over a constant length
        return ppo.PPOConfig(adv_estimator="drgrpo", kl_loss_coef=cfg.grpo_kl, loss_agg="seq_sum_norm",
                             max_len=cfg.rl_max_new_tokens, **grpo)
    if cfg.algo == "dapo":     # clip-higher, token mean, dynamic sampling, soft overlong penalty, no KL
        return ppo.PPOConfig(adv_estimator="grpo", clip_high=cfg.dapo_clip_high, loss_agg="token_mean",
                             dynamic_sampling=True, overlong_buffer=cfg.dapo_overlong_buffer,
                             **dict(grpo, no_eos_penalty=0.0))
    raise SystemExit(f"--algo={cfg.algo}: expected one of {', '.join(ALGOS)}")

# -----------------------------------------------------------------------------
# the prompts of a step: drawn from a pool of restart states

def pick(pool, rng):
    """One state of pool, a list of (states, prob) pairs (as_pools): a list chosen with probability
    prob, then a state of it uniformly."""
    if len(pool) == 1:           # one list: a single draw from the rng
        return pool[0][0][rng.randrange(len(pool[0][0]))]
    u, states = rng.random(), pool[-1][0]
    for states, prob in pool:
        if u < prob:
            break
        u -= prob
    return states[rng.randrange(len(states))]


def as_pools(pool):
    """[(states, prob), ...] of an RL pool given as one list of states (prob 1) or as such pairs;
    the probabilities must add up to 1 and every list with one be non-empty."""
    pools = pool if pool and isinstance(pool[0], tuple) else [(pool, 1.0)]
    if abs(sum(prob for _, prob in pools) - 1) > 1e-6 or any(prob > 0 and not states for states, prob in pools):
        raise ValueError(f"RL pool: probabilities {[prob for _, prob in pools]} of lists of "
                         f"{[len(states) for states, _ in pools]} states; expected non-empty lists, summing to 1")
    return pools

# -----------------------------------------------------------------------------
# phase 1: sample

@dataclass
class Samples:
    """One RL step's samples on this process: `group` of each prompt, contiguous."""
    states: list          # [P] rae.RestartState of each prompt
    outs: list            # [P * group] rollout.Completion
    correct: list         # [P * group] graded right?
    seed: int             # this step's seed on this process (sampling, minibatch order)
    left_out: int = 0     # DAPO groups left out over all processes so that each trains on as many


def sample(cfg, sampler, tok, problems, pool, step, name, group, temperature, dynamic):
    """The step's prompts (the same global draw on every process, each sampling its share) and their
    samples. dynamic (DAPO): groups whose samples are all right or all wrong are replaced by new
    draws, up to cfg.dapo_max_refills times, then dealt out again so every process holds as many."""
    draw = random.Random(f"{cfg.seed}:{name}:{step}")
    first = parallel.shard([pick(pool, draw) for _ in range(max(1, cfg.rl_batch // group))])
    seed = cfg.seed * 100003 + step + 7919 * parallel.rank()
    refill = random.Random(f"{cfg.seed}:{name}:{step}:{parallel.rank()}")
    s = Samples(*sample_groups(cfg, sampler, tok, problems, pool, first, refill, group, temperature, seed, dynamic),
                seed=seed)
    if dynamic:
        rows = lambda i: slice(i * group, (i + 1) * group)
        groups, s.left_out = parallel.rebalance([(st, s.outs[rows(i)], s.correct[rows(i)])
                                                 for i, st in enumerate(s.states)])
        s.states = [st for st, _, _ in groups]
        s.outs, s.correct = [o for g in groups for o in g[1]], [c for g in groups for c in g[2]]
    return s


def sample_groups(cfg, sampler, tok, problems, pool, first, rng, group, temperature, seed, dynamic):
    """The states `first` (this process's prompts), `group` samples each -> (states, outs, correct).
    dynamic (DAPO): groups whose samples are all right or all wrong are dropped and replaced by new
    draws from pool with rng, up to cfg.dapo_max_refills times; the batch may come back short."""
    # a restart state's prefix after its question's own prompt is part of the graded response
    own_prompt = lambda s: len(tok.encode_prompt(problems[s.question_id]["question"])) if s.status else len(s.prompt_ids)
    states, outs, correct = [], [], []
    draw = first
    for attempt in range(1 + (cfg.dapo_max_refills if dynamic else 0)):
        if attempt:
            draw = [pick(pool, rng) for _ in range(len(first) - len(states))]
        o, ok = sample_and_grade(sampler, tok, problems, [s.prompt_ids for s in draw], [s.question_id for s in draw],
                                 group, temperature, cfg.rl_max_new_tokens, seed=seed + 1_000_003 * attempt,
                                 skip=[own_prompt(s) for s in draw])
        keep = ppo.dynamic_sampling_keep(torch.tensor(ok, dtype=torch.float), group) if dynamic else None
        for i, s in enumerate(draw):
            if keep is None or keep[i * group]:
                states.append(s)
                outs += o[i * group:(i + 1) * group]
                correct += ok[i * group:(i + 1) * group]
        if len(states) == len(first):
            break
    return states, outs, correct


# -----------------------------------------------------------------------------
# phases 2 and 3: rollouts, rewards (phase 4, the advantages, is ppo.set_advantages)

def rollouts(policy, copy_sampled, ref, tok, s, group, temperature, dev):
    """The samples as ppo.Rollouts with the log-probs of the policy that sampled them (old_logp),
    recomputed by the policy itself when a copy of it sampled (bf16, or gathered from FSDP2 shards)
    or the update computes under autocast (the ratio must start at 1 in the update's own
    precision), and the reference's with a KL term."""
    r = ppo.make_rollouts([st.prompt_ids for st in s.states for _ in range(group)], [o.tokens for o in s.outs],
                          tok.pad_id, dev)
    r.old_logp = torch.zeros_like(r.mask)
    r.old_logp[r.mask.bool()] = torch.tensor([lp for o in s.outs for lp in o.logprobs], device=dev)
    with torch.no_grad():
        if copy_sampled or torch.is_autocast_enabled(r.ids.device.type):
            r.old_logp = ppo.response_logprobs(policy, r, temperature)
        if ref is not None:
            r.ref_logp = ppo.response_logprobs(ref, r, temperature)
    return r


def rewards(cfg, tok, s, r, group, step, steps, orm=None, reward_fn=None, policy=None):
    """Sequence rewards [B]: Satori's (rule + sigmoid(ORM score at the last token) + reflection
    bonus of restart states), or reward_fn(policy, states, outs) (RLT); plus RLSP's exploration
    reward with cfg.rlsp_coef."""
    dev = r.ids.device
    if reward_fn is not None:
        seq_r = reward_fn(policy, [st for st in s.states for _ in range(group)], s.outs)
    else:
        scores = [None] * len(s.outs)
        if orm is not None:
            with torch.no_grad():
                scores = orm(r.ids)[torch.arange(len(s.outs), device=dev), r.prompt_lens + r.resp_lens - 1].tolist()
        rcfg = reward.RewardConfig(use_orm=orm is not None, reflect_bonus=cfg.reflect_bonus,
                                   clip=cfg.reward_clip or math.inf)
        status = [st.status for st in s.states for _ in range(group)]
        seq_r = [reward.satori_reward(c, x, st, rcfg) for c, x, st in zip(s.correct, scores, status)]
    if cfg.rlsp_coef:       # RLSP: an exploration reward beside the verifier's, weighted by a schedule
        coef = reward.rlsp_coef(step, steps, cfg.rlsp_coef, cfg.rlsp_schedule)
        seq_r = [x + coef * reward.exploration_reward(tok.decode(o.tokens), cfg.rlsp_max_steps, coat=True)
                 for x, o in zip(seq_r, s.outs)]
    return torch.tensor(seq_r, device=dev)

# -----------------------------------------------------------------------------
# ExPO's term: self-explanations of the known answer where a group failed

def expo_rollouts(cfg, sampler, tok, problems, states, correct, group, temperature, seed, dev):
    """ExPO: for every prompt whose group reward is near zero (ppo.expo_select on accuracy), the
    policy writes a self-explanation given the question AND the correct answer (reward.expo_prompt);
    those that end in the right \\boxed{} answer become rows (question-only prompt, explanation) for
    ppo.expo_loss. None when there are none."""
    stuck = ppo.expo_select(torch.tensor(correct, dtype=torch.float), group, cfg.expo_threshold)
    qids = [states[i].question_id for i in stuck.nonzero().flatten().tolist()]
    if not qids:
        return None
    prompts = [tok.encode(reward.expo_prompt(tok, problems[q]["question"], problems[q]["answer"])) for q in qids]
    outs = sampler.generate(prompts, cfg.rl_max_new_tokens, temperature=temperature, stop_ids=tok.stop_ids, seed=seed)
    rows = [(tok.encode_prompt(problems[q]["question"]), o.tokens) for q, o in zip(qids, outs)
            if o.finished and reward.grade(tok.decode(o.body), problems[q]) is True]
    if not rows:
        return None
    return ppo.make_rollouts([p for p, _ in rows], [t for _, t in rows], tok.pad_id, dev)


def expo_term(cfg, pcfg, sampler, tok, problems, s, group, temperature, dev):
    """(ExPO's extra_loss for ppo_update or None, its rows or None). The processes find different
    numbers of explanations: each weighs its term by its rank_weight, so that the sum over processes
    is the term of one process holding every row (a collective: every process calls this)."""
    er = expo_rollouts(cfg, sampler, tok, problems, s.states, s.correct, group, temperature, s.seed, dev)
    weight = ppo.rank_weight(None if er is None else er.mask, pcfg.loss_agg, dev)
    if er is None:
        return None, None
    return (lambda m: ppo.expo_loss(m, er, cfg.expo_beta, temperature, pcfg.loss_agg, pcfg.max_len, weight)), er


# -----------------------------------------------------------------------------
# phase 5: update, and the step's metrics

def update(pcfg, policy, critic, opts, r, temperature, micro_batch, seed, extra=None, nonfinite=0,
           log=print, what="ppo_update"):
    """ppo.ppo_update (+ ExPO's extra term; nonfinite and what for its non-finite step guard)."""
    policy.train()
    gen = torch.Generator().manual_seed(seed)       # minibatch order
    return ppo.ppo_update(policy, opts["opt"], r, pcfg, critic, opts.get("copt"), temperature, micro_batch, gen,
                          extra, log=log, nonfinite=nonfinite, what=what)


def step_metrics(cfg, pcfg, tok, name, step, steps, s, r, seq_r, info, er, t_gen, t_train):
    """(the step's metrics over every process, its progress line)."""
    reflect = tok.tk.token_to_id(REFLECT)     # None before format tuning (the RLT teacher)
    n, n_tok, r_sum, n_ok, n_reflect, n_prompt = parallel.all_sum(
        [len(s.outs), int(r.mask.sum()), float(seq_r.sum()), sum(s.correct), sum(reflect in o.tokens for o in s.outs),
         len(s.states)])
    m = {"stage": name, "algo": cfg.algo, "step": step + 1, "reward": r_sum / n, "acc": n_ok / n,
         "kl": info["approx_kl"], "entropy": info["entropy"], "clipfrac": info["clipfrac"],
         "value_loss": info.get("value_loss", 0.0), "resp_len": n_tok / n, "reflect_rate": n_reflect / n,
         "prompts": n_prompt, "tok_s": n_tok / (t_gen + t_train), "gen_s": t_gen, "train_s": t_train,
         "skipped_steps": info["skipped_steps"]}
    m.update({k: info[k] for k in ("kl_loss", "expo_logp") if k in info})
    more = ""
    if pcfg.dynamic_sampling:
        m["left_out"] = s.left_out
        more = f" prompts {n_prompt}" + (f" ({s.left_out} left out)" if s.left_out else "")
    if cfg.expo:
        m["expo_rows"] = parallel.all_sum(0 if er is None else er.ids.shape[0])
        more += f" expo {m['expo_rows']}"
    line = (f"{name} step {step + 1}/{steps} | reward {m['reward']:+.3f} acc {m['acc']:.3f} kl {m['kl']:.4f} "
            f"ent {m['entropy']:.3f} clip {m['clipfrac']:.3f} vloss {m['value_loss']:.4f} len {m['resp_len']:.0f} "
            f"reflect {m['reflect_rate']:.2f}{more} | {m['tok_s']:.0f} tok/s gen {t_gen:.1f}s train {t_train:.1f}s")
    return m, line

# -----------------------------------------------------------------------------
# the loop

def _shard(cfg, dtype, trained, frozen):
    """--shard=fsdp under torchrun: FSDP2 over the processes for every model of the loop
    (parallel.shard_model; those train.py loaded sharded already stay as they are). Trained models
    keep fp32 master weights and gather in the compute dtype; frozen ones are stored in it."""
    if cfg.shard != "fsdp" or parallel.world() == 1:
        return
    low = None if dtype == torch.float32 else dtype
    for m in trained:
        if m is not None and not parallel.is_sharded(m):
            parallel.shard_model(m, low)
    for m in frozen:
        if m is not None and not parallel.is_sharded(m):
            parallel.shard_model(m.to(dtype))


def _sampler(cfg, policy, tok, problems, pool, group):
    """-> sampler_of_step(): the sampler an RL step decodes with. A whole policy: one sampler, made
    now and kept; on GPU (--sampler_dtype auto) its model is a bf16 copy of the policy (half the
    bytes per decode step), refreshed before every step. A sharded policy (FSDP2): every step, its
    weights gathered whole in that dtype (parallel.whole_copy) and a sampler whose KV cache fits the
    free memory; the caller drops both before the update, which gets the memory back. A copy's
    log-probs are not the update's own: rollouts recomputes them."""
    dev = next(policy.parameters()).device
    dtype = {"auto": torch.bfloat16 if dev.type == "cuda" else None, "float32": None,
             "bfloat16": torch.bfloat16}[cfg.sampler_dtype]
    states = [s for sub, _ in pool for s in sub]
    longest = max(len(s.prompt_ids) for s in states)
    if cfg.expo:
        longest = max(longest, max(len(tok.encode(reward.expo_prompt(tok, problems[s.question_id]["question"],
                                                                      problems[s.question_id]["answer"])))
                                   for s in states))
    kw = dict(max_batch=max(1, cfg.rl_batch // group) // parallel.world() * group,
              max_seq_len=longest + cfg.rl_max_new_tokens)
    if parallel.is_sharded(policy):
        def gathered():
            model = parallel.whole_copy(policy, dtype)
            return Sampler(model, num_blocks=blocks_that_fit(model), **kw)
        return gathered
    gen_model = policy if dtype is None else copy.deepcopy(policy).to(dtype).eval().requires_grad_(False)
    sampler = Sampler(gen_model, **kw)
    if gen_model is policy:                   # the sampler reads the policy's own weights
        return lambda: sampler

    def kept():
        with torch.no_grad():
            for q, p in zip(gen_model.parameters(), policy.parameters()):
                q.copy_(p)
        return sampler
    return kept


def rl_train(cfg, policy, tok, problems, pool, temperature, group, steps, critic=None, orm=None, ref=None,
             reward_fn=None, name="rl", log=None, ckpt_dir=None):
    """--algo (cfg.algo) on policy, in place, for `steps` steps of cfg.rl_batch samples: `group` of
    each of cfg.rl_batch // group prompts drawn from `pool` (rae.RestartStates whose question_id
    indexes `problems`; or [(states, prob), ...] to draw each prompt from one of several lists, e.g.
    RAE states and plain questions). critic: PPO's; orm: the outcome reward model in Satori's reward;
    ref: the frozen start of a KL term; reward_fn(policy, states, outs): a reward in place of Satori's.
    Under torchrun each process samples its share of every step's prompts. log(msg, **metrics):
    progress. ckpt_dir: resume from its newest checkpoint, save every cfg.rl_ckpt_every steps.
    Returns the metrics of the last step."""
    log = log or (lambda msg, **metrics: print(msg, flush=True))
    dev = next(policy.parameters()).device
    pcfg, pool, dtype = algo_config(cfg, group), as_pools(pool), compute_dtype(cfg.dtype, dev)
    _shard(cfg, dtype, (policy, critic), (orm, ref))      # before the optimizers: they hold the shards
    models = {k: v for k, v in (("policy", policy), ("critic", critic)) if v is not None}
    for m in models.values():
        m.model.act_ckpt = cfg.act_ckpt      # the update's forwards only: sampling and eval never checkpoint
    opts = {k: torch.optim.AdamW(m.parameters(), lr=lr, betas=cfg.betas, weight_decay=0.0)
            for k, m, lr in (("opt", policy, cfg.actor_lr), ("copt", critic, cfg.critic_lr)) if m is not None}
    # every random draw of a step is seeded by the step, so the step is all the position a resume needs
    meta = checkpoint.resume(ckpt_dir, models, opts, name, steps, log)
    start, m, nonfinite = meta["step"] if meta else 0, {}, 0
    sampler_of_step = _sampler(cfg, policy, tok, problems, pool, group)
    log(f"{name}: {cfg.algo}, {steps} steps of {max(1, cfg.rl_batch // group)} prompts x {group} samples, "
        f"temperature {temperature}, actor lr {cfg.actor_lr:g}" + (f", {parallel.world()} processes" if parallel.world() > 1 else ""))
    sched = SFTConfig(lr=1.0, warmup_frac=cfg.warmup_frac, min_lr_ratio=cfg.min_lr_ratio)   # a factor of each lr
    t_start = time.time()
    for step in range(start, steps):
        for k, base in (("opt", cfg.actor_lr), ("copt", cfg.critic_lr)):
            for g in (opts[k].param_groups if k in opts else []):
                g["lr"] = base * lr_at(step, steps, sched)
        t0 = time.time()
        policy.eval()
        sampler = sampler_of_step()
        s = sample(cfg, sampler, tok, problems, pool, step, name, group, temperature, pcfg.dynamic_sampling)
        if not s.states:
            log(f"{name} step {step + 1}/{steps}: every group was all right or all wrong"
                + (f" but {s.left_out}, left out to give every process as many" if s.left_out else "") + "; no update")
            continue
        extra, er = expo_term(cfg, pcfg, sampler, tok, problems, s, group, temperature, dev) if cfg.expo else (None, None)
        copy_sampled = sampler.model is not policy
        del sampler             # sharded: its gathered weights and KV cache, freed for the update
        t_gen = time.time() - t0
        with autocast(dev, dtype):      # every forward after sampling: old and reference log-probs, ORM, critic
            r = rollouts(policy, copy_sampled, ref, tok, s, group, temperature, dev)
            seq_r = rewards(cfg, tok, s, r, group, step, steps, orm, reward_fn, policy)
            ppo.set_advantages(r, pcfg, seq_r, torch.tensor([o.finished for o in s.outs], device=dev), critic,
                               cfg.rl_max_new_tokens)
            t1 = time.time()
            info = update(pcfg, policy, critic, opts, r, temperature, cfg.micro_batch, s.seed, extra=extra,
                          nonfinite=nonfinite, log=log, what=f"{name} step {step + 1}/{steps}")
        nonfinite = info["nonfinite_in_a_row"]
        m, line = step_metrics(cfg, pcfg, tok, name, step, steps, s, r, seq_r, info, er, t_gen, time.time() - t1)
        m["eta_s"] = (time.time() - t_start) / (step + 1 - start) * (steps - step - 1)
        log(f"{line} eta {fmt_time(m['eta_s'])}", **m)
        if ckpt_dir and ((cfg.rl_ckpt_every > 0 and (step + 1) % cfg.rl_ckpt_every == 0) or step + 1 == steps):
            checkpoint.save(ckpt_dir, f"step-{step + 1:08d}", models, opts, {"stage": name, "step": step + 1, "steps": steps},
                            keep=cfg.ckpt_keep)
    log(f"{name}: {steps - start} {cfg.algo} steps in {time.time() - t_start:.0f}s")
    return m
