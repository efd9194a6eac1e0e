"""The RL loop every method shares: prompts -> rollouts (rollout.Sampler) -> rewards (reward.py)
-> advantages -> PPO-style update (ppo.py), and the reward pieces of the methods beside Satori's.

    from rl import rl_train
    rl_train(cfg, policy, tok, problems, pool, temperature=0.6, group=1, steps=40, critic=critic, scorer=orm)

PPO (Satori), GRPO, Dr. GRPO and DAPO differ in algo_config and in ppo.set_advantages only; RLSP adds
an exploration reward, ExPO a likelihood term on self-explanations, RLT replaces the reward (score).
train.py loads the models of a stage, calls rl_train and saves the result:  python train.py --stages=rl
"""
import copy
import random
import time

import torch

import checkpoint
import parallel
import ppo
import reward
from rollout import Sampler
from sft import SFTConfig, lr_at

# -----------------------------------------------------------------------------
# sampling and grading (also used by the ORM / RAE and distillation stages)

def sample_and_grade(sampler, tok, problems, prompts, qids, n, temperature, max_new_tokens, seed, skip=None):
    """n samples of each prompt -> (completions, responses, correct) in prompt-major order. The graded
    text of a sample is everything after its question's own prompt (a restart prefix included):
    skip[i] = tokens of prompts[i] that belong to that prefix-free prompt. Local to this process."""
    rep = [p for p in prompts for _ in range(n)]
    outs = sampler.generate(rep, max_new_tokens, temperature=temperature, stop_ids=tok.stop_ids, seed=seed)
    stop = set(tok.stop_ids)
    responses, correct = [], []
    for i, o in enumerate(outs):
        k = i // n
        body = rep[i][skip[k]:] if skip else []
        toks = o.tokens[:-1] if o.finished and o.tokens[-1] in stop else o.tokens
        responses.append(o.tokens)
        correct.append(reward.grade(tok.decode(body + toks), problems[qids[k]]["answer"]) is True)
    return outs, responses, correct


def sample_all(sampler, tok, problems, prompts, qids, n, temperature, max_new_tokens, seed):
    """sample_and_grade of every prompt, the prompts shared out over the processes ->
    (responses, correct) of all of them on every process."""
    mine = parallel.shard(list(range(len(prompts))))
    _, responses, correct = sample_and_grade(sampler, tok, problems, [prompts[i] for i in mine], [qids[i] for i in mine],
                                             n, temperature, max_new_tokens, seed + 7919 * parallel.rank())
    return parallel.gather(responses), parallel.gather(correct)

# -----------------------------------------------------------------------------
# PPO (Satori) and the GRPO family differ in algo_config and in ppo.set_advantages only

ALGOS = ("ppo", "grpo", "drgrpo", "dapo")


def algo_config(cfg, group):
    """The PPOConfig of --algo: the only lines where PPO, GRPO, Dr. GRPO and DAPO differ."""
    common = dict(gamma=cfg.gamma, lam=cfg.lam, clip=cfg.clip_eps, ppo_epochs=cfg.ppo_epochs,
                  minibatch_size=cfg.minibatch_size, grad_clip=cfg.clip, group_size=group,
                  reward_clip=cfg.reward_clip or None)
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


def pick(pool, rng):
    """One state of pool, a list of (states, share) pairs (as_pools): a list chosen with probability
    share, then a state of it uniformly."""
    if len(pool) == 1:           # one list: one draw, so a single-list pool samples as it always did
        return pool[0][0][rng.randrange(len(pool[0][0]))]
    u, states = rng.random(), pool[-1][0]
    for states, share in pool:
        if u < share:
            break
        u -= share
    return states[rng.randrange(len(states))]


def as_pools(pool):
    """[(states, share), ...] of an RL pool given as one list of states (share 1) or as such pairs;
    the shares must add up to 1 and every list with a share be non-empty."""
    pools = pool if pool and isinstance(pool[0], tuple) else [(pool, 1.0)]
    if abs(sum(share for _, share in pools) - 1) > 1e-6 or any(share > 0 and not states for states, share in pools):
        raise ValueError(f"RL pool: shares {[share for _, share in pools]} of lists of "
                         f"{[len(states) for states, _ in pools]} states; expected non-empty lists, shares summing to 1")
    return pools


def sample_groups(cfg, sampler, tok, train, pool, first, rng, group, temperature, seed, dynamic):
    """The states `first` (this process's prompts), `group` samples each -> (states, outs,
    responses, correct). dynamic (DAPO): groups whose samples are all right or all wrong are dropped
    and replaced by new draws from pool with rng, up to cfg.dapo_max_refills times; the batch may
    come back short after that."""
    # a restart state's prefix after its question's own prompt is part of the graded response
    own_prompt = lambda s: len(tok.encode_prompt(train[s.question_id]["question"])) if s.status else len(s.prompt_ids)
    states, outs, responses, correct = [], [], [], []
    draw = first
    for attempt in range(1 + (cfg.dapo_max_refills if dynamic else 0)):
        if attempt:
            draw = [pick(pool, rng) for _ in range(len(first) - len(states))]
        o, resp, ok = sample_and_grade(sampler, tok, train, [s.prompt_ids for s in draw],
                                       [s.question_id for s in draw], group, temperature, cfg.rl_max_new_tokens,
                                       seed=seed + 1_000_003 * attempt, skip=[own_prompt(s) for s in draw])
        keep = ppo.dynamic_sampling_keep(torch.tensor(ok, dtype=torch.float), group) if dynamic else None
        for i, s in enumerate(draw):
            if keep is None or keep[i * group]:
                states.append(s)
                rows = slice(i * group, (i + 1) * group)
                outs += o[rows]
                responses += resp[rows]
                correct += ok[rows]
        if len(states) == len(first):
            break
    return states, outs, responses, correct


def expo_rollouts(cfg, sampler, tok, train, states, correct, group, temperature, seed, dev):
    """ExPO: for every prompt whose group reward is near zero (ppo.expo_select on accuracy), the
    policy writes a self-explanation given the question AND the correct answer (reward.expo_prompt);
    those that end in the right \\boxed{} answer become rows (question-only prompt, explanation) for
    ppo.expo_loss. None when there are none."""
    stuck = ppo.expo_select(torch.tensor(correct, dtype=torch.float), group, cfg.expo_threshold)
    qids = [states[i].question_id for i in stuck.nonzero().flatten().tolist()]
    if not qids:
        return None
    prompts = [tok.encode(reward.expo_prompt(train[q]["question"], train[q]["answer"])) for q in qids]
    outs = sampler.generate(prompts, cfg.rl_max_new_tokens, temperature=temperature, stop_ids=tok.stop_ids, seed=seed)
    rows = [(tok.encode_prompt(train[q]["question"]), o.tokens) for q, o in zip(qids, outs)
            if o.finished and reward.grade(tok.decode(o.tokens[:-1]), train[q]["answer"]) is True]
    if not rows:
        return None
    return ppo.make_rollouts([p for p, _ in rows], [t for _, t in rows], tok.pad_id, dev)


def rl_train(cfg, policy, tok, problems, pool, temperature, group, steps, critic=None, scorer=None, ref=None,
             score=None, name="rl", log=None, ckpt_dir=None):
    """--algo (cfg.algo) on policy, in place: each step draws cfg.rl_batch // group prompts from `pool`
    (rae.RestartStates, question_id indexing `problems`; or [(states, share), ...] to draw each prompt
    from one of several lists with those probabilities, e.g. RAE states and plain questions),
    samples `group` responses of each, rewards them (Satori's reward: rule + sigmoid(scorer) +
    reflection bonus, + RLSP's exploration reward if cfg.rlsp_coef; or score(policy, states, outs)
    -> [reward per sample]), turns rewards into advantages (ppo.set_advantages: GAE over the critic
    for ppo, group baselines otherwise) and updates (ppo.ppo_update, + ExPO's term with cfg.expo).
    critic: for ppo; ref: the frozen start for a KL term. Under torchrun each process samples its
    share of every step's prompts. log(msg, **metrics): progress (default: print msg). ckpt_dir:
    resume from its newest checkpoint, save every cfg.rl_ckpt_every steps. Returns the metrics of
    the last step."""
    log = log or (lambda msg, **metrics: print(msg, flush=True))
    train, dst, dev = problems, name, next(policy.parameters()).device
    pcfg = algo_config(cfg, group)
    rcfg = reward.RewardConfig(use_orm=scorer is not None, reflect_bonus=cfg.reflect_bonus)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.actor_lr, betas=cfg.betas, weight_decay=0.0)
    copt = torch.optim.AdamW(critic.parameters(), lr=cfg.critic_lr, betas=cfg.betas, weight_decay=0.0) if critic else None
    sched = SFTConfig(lr=1.0, warmup_frac=cfg.warmup_frac, min_lr_ratio=cfg.min_lr_ratio)
    n_prompts = max(1, cfg.rl_batch // group)
    pool = as_pools(pool)
    states = [s for sub, _ in pool for s in sub]
    longest = max(len(s.prompt_ids) for s in states)
    if cfg.expo:
        longest = max(longest, max(len(tok.encode(reward.expo_prompt(train[s.question_id]["question"],
                                                                      train[s.question_id]["answer"]))) for s in states))
    rank, world = parallel.rank(), parallel.world()
    # checkpoints: weights and optimizers; every random draw below is seeded by the step, so the
    # step is all the position a resumed run needs
    models, opts = {"policy": policy, "critic": critic}, {"opt": opt, "copt": copt}
    models, opts = {k: v for k, v in models.items() if v}, {k: v for k, v in opts.items() if v}
    meta = checkpoint.resume(ckpt_dir, models, opts, dst, steps, log)
    start, m, bad = meta["step"] if meta else 0, {}, 0
    # on GPU the sampler decodes with a bf16 copy of the policy (half the bytes per decode step),
    # refreshed after every update; its log-probs are then not the training model's, so the ratio's
    # old log-probs are recomputed with the policy itself
    dtype = {"auto": torch.bfloat16 if dev.type == "cuda" else None, "float32": None, "bfloat16": torch.bfloat16}[cfg.sampler_dtype]
    gen_model = policy if dtype is None else copy.deepcopy(policy).to(dtype).eval().requires_grad_(False)
    sampler = Sampler(gen_model, max_batch=n_prompts // world * group, max_seq_len=longest + cfg.rl_max_new_tokens)
    t_start = time.time()
    log(f"{dst}: {cfg.algo}, {steps} steps of {n_prompts} prompts x {group} samples, temperature {temperature}, "
        f"actor lr {cfg.actor_lr:g}"
        + (f", {world} processes" if world > 1 else ""))
    for step in range(start, steps):
        for o, base in ((opt, cfg.actor_lr), (copt, cfg.critic_lr)):
            for g in (o.param_groups if o else []):
                g["lr"] = base * lr_at(step, steps, sched)
        t0 = time.time()
        policy.eval()
        # the step's global batch is the same on every process; each samples its own share of it
        rng = random.Random(f"{cfg.seed}:{dst}:{step}")
        first = parallel.shard([pick(pool, rng) for _ in range(n_prompts)])
        seed = cfg.seed * 100003 + step + 7919 * rank
        batch, outs, responses, correct = sample_groups(cfg, sampler, tok, train, pool, first,
                                                        random.Random(f"{cfg.seed}:{dst}:{step}:{rank}"), group,
                                                        temperature, seed, pcfg.dynamic_sampling)
        left_out = 0
        if pcfg.dynamic_sampling:
            # each process kept its own number of groups; every one must train on as many rows,
            # so the groups are dealt out again (at most world - 1 of them left out)
            rows = lambda i: slice(i * group, (i + 1) * group)
            groups, left_out = parallel.rebalance([(s, outs[rows(i)], responses[rows(i)], correct[rows(i)])
                                                   for i, s in enumerate(batch)])
            batch = [s for s, *_ in groups]
            outs, responses, correct = ([x for g in groups for x in g[k]] for k in (1, 2, 3))
        if not batch:
            log(f"{dst} step {step + 1}/{steps}: every group was all right or all wrong"
                + (f" but {left_out}, left out to give every process as many" if left_out else "") + "; no update")
            continue
        extra, er = None, None
        if cfg.expo:
            er = expo_rollouts(cfg, sampler, tok, train, batch, correct, group, temperature, seed, dev)
            # the ranks find different numbers of explanations: each weighs its term by its share
            share = ppo.rank_share(None if er is None else er.mask, pcfg.loss_agg, dev)
            if er is not None:
                extra = lambda m: ppo.expo_loss(m, er, cfg.expo_beta, temperature, pcfg.loss_agg, pcfg.max_len, share)
        t_gen = time.time() - t0
        prompts = [s.prompt_ids for s in batch for _ in range(group)]
        status = [s.status for s in batch for _ in range(group)]
        r = ppo.make_rollouts(prompts, responses, tok.pad_id, dev)
        r.old_logp = torch.zeros_like(r.mask)
        r.old_logp[r.mask.bool()] = torch.tensor([lp for o in outs for lp in o.logprobs], device=dev)
        if gen_model is not policy:
            with torch.no_grad():
                r.old_logp = ppo.response_logprobs(policy, r, temperature)
        with torch.no_grad():
            orm = [None] * len(outs)
            if scorer is not None:
                last = r.prompt_lens + r.resp_lens - 1
                orm = scorer(r.ids)[torch.arange(len(outs), device=dev), last].tolist()
            if ref is not None:
                r.ref_logp = ppo.response_logprobs(ref, r, temperature)
        if score is not None:
            seq_r = score(policy, [s for s in batch for _ in range(group)], outs)
        else:
            seq_r = [reward.satori_reward(c, s_orm, st, rcfg) for c, s_orm, st in zip(correct, orm, status)]
        if cfg.rlsp_coef:       # RLSP: an exploration reward beside the verifier's, weighted by a schedule
            coef = reward.rlsp_coef(step, steps, cfg.rlsp_coef, cfg.rlsp_schedule)
            seq_r = [x + coef * reward.exploration_reward(tok.decode(o.tokens), cfg.rlsp_max_steps, coat=True)
                     for x, o in zip(seq_r, outs)]
        seq_r = torch.tensor(seq_r, device=dev)
        finished = torch.tensor([o.finished for o in outs], device=dev)
        ppo.set_advantages(r, pcfg, seq_r, finished, critic, cfg.rl_max_new_tokens)
        t1 = time.time()
        policy.train()
        gen = torch.Generator().manual_seed(seed)       # minibatch order
        info = ppo.ppo_update(policy, opt, r, pcfg, critic, copt, temperature, cfg.micro_batch, gen, extra, log=log)
        # non-finite steps: ppo_update skips them; a run of updates with nothing but skips aborts
        bad = bad + 1 if info["skipped_steps"] == info["optimizer_steps"] else 0
        if bad >= pcfg.max_bad_steps:
            raise RuntimeError(f"{dst}: {bad} RL steps in a row had only non-finite updates (steps "
                               f"{step + 2 - bad}..{step + 1}), aborting: lower the learning rate or check the rewards")
        if gen_model is not policy:
            with torch.no_grad():
                for q, p in zip(gen_model.parameters(), policy.parameters()):
                    q.copy_(p)
        t_train = time.time() - t1
        reflect = tok.tk.token_to_id("<|reflect|>")     # None before format tuning (the RLT teacher)
        n, n_tok, r_sum, n_ok, n_reflect, n_prompt = parallel.all_sum(
            [len(outs), int(r.mask.sum()), float(seq_r.sum()), sum(correct), sum(reflect in o.tokens for o in outs), len(batch)])
        m = {"stage": dst, "algo": cfg.algo, "step": step + 1, "reward": r_sum / n, "acc": n_ok / n,
             "kl": info["approx_kl"], "entropy": info["entropy"], "clipfrac": info["clipfrac"],
             "value_loss": info.get("value_loss", 0.0), "resp_len": n_tok / n, "reflect_rate": n_reflect / n,
             "prompts": n_prompt, "tok_s": n_tok / (t_gen + t_train), "gen_s": t_gen, "train_s": t_train,
             "skipped_steps": info["skipped_steps"]}
        m.update({k: info[k] for k in ("kl_loss", "expo_logp") if k in info})
        more = ""
        if pcfg.dynamic_sampling:
            m["left_out"] = left_out
            more = f" prompts {n_prompt}" + (f" ({left_out} left out)" if left_out else "")
        if cfg.expo:
            m["expo_rows"] = parallel.all_sum(0 if er is None else er.ids.shape[0])
            more += f" expo {m['expo_rows']}"
        log(f"{dst} step {step + 1}/{steps} | reward {m['reward']:+.3f} acc {m['acc']:.3f} kl {m['kl']:.4f} "
            f"ent {m['entropy']:.3f} clip {m['clipfrac']:.3f} vloss {m['value_loss']:.4f} len {m['resp_len']:.0f} "
            f"reflect {m['reflect_rate']:.2f}{more} | {m['tok_s']:.0f} tok/s gen {t_gen:.1f}s train {t_train:.1f}s", **m)
        if ckpt_dir and ((cfg.rl_ckpt_every > 0 and (step + 1) % cfg.rl_ckpt_every == 0) or step + 1 == steps):
            checkpoint.save(ckpt_dir, f"step-{step + 1:08d}", models, opts, {"stage": dst, "step": step + 1, "steps": steps},
                            keep=cfg.ckpt_keep)
    log(f"{dst}: {steps - start} {cfg.algo} steps in {time.time() - t_start:.0f}s")
    return m

# -----------------------------------------------------------------------------
# RLT: the teacher's reward from a frozen student (the stage itself is train.stage_rlt)

def rlt_solution(problem):
    """What the RLT teacher is shown and the student must find likely: the final answer line."""
    return f"The answer is \\boxed{{{problem['answer']}}}."


def rlt_teacher_ids(tok, problem, full_prompt=False):
    """The teacher's prompt: the question and its solution. full_prompt: RLT's instruction
    (reward.rlt_teacher_prompt, for real models); else the question's own prompt with the solution
    appended, as the built-in base model has only seen ~130 positions and RLT's prompt alone is ~190."""
    if full_prompt:
        return tok.encode(reward.rlt_teacher_prompt(problem["question"], rlt_solution(problem)))
    return tok.encode_prompt(problem["question"] + "\nSolution: " + rlt_solution(problem))


def rlt_rows(tok, problem, explanation, full_prompt=False):
    """Token rows for RLT's reward, the explanation tokenised ONCE and placed in both contexts
    (reward.py's RLT comment) -> (teacher prompt + <think>, student prompt, explanation ids,
    the student's suffix ids, solution ids)."""
    return (rlt_teacher_ids(tok, problem, full_prompt) + tok.encode("<think>"),
            tok.encode(reward.RLT_STUDENT_PREFIX.format(question=problem["question"])), tok.encode(explanation),
            tok.encode(reward.RLT_STUDENT_SUFFIX), tok.encode(rlt_solution(problem)))


def rlt_scorer(cfg, tok, train, student, dev):
    """score(teacher, states, outs) for rl_train: r_SS - lambda * r_KL (reward.rlt_reward) from the
    frozen student's and the current teacher's log-probs; rlt_missing_tags_reward without
    well-formed tags (or a response that never stopped)."""
    def score(teacher, states, outs):
        rewards = [cfg.rlt_missing_tags_reward] * len(outs)
        rows = []
        for i, (s, o) in enumerate(zip(states, outs)):
            expl = reward.extract_explanation(tok.decode(o.tokens[:-1])) if o.finished else None
            if expl is not None:
                rows.append((i, *rlt_rows(tok, train[s.question_id], expl, cfg.rlt_full_prompt)))
        if not rows:
            return rewards
        with torch.no_grad():
            t = ppo.make_rollouts([tp for _, tp, _, e, _, _ in rows], [e for *_, e, _, _ in rows], tok.pad_id, dev)
            t_lp = ppo.response_logprobs(teacher, t)
            st = ppo.make_rollouts([sp for _, _, sp, *_ in rows], [e + suf + sol for *_, e, suf, sol in rows], tok.pad_id, dev)
            s_lp = ppo.response_logprobs(student, st)
        for k, (i, _, _, e, suf, sol) in enumerate(rows):
            n, m = len(e), len(e) + len(suf)
            rewards[i] = reward.rlt_reward(s_lp[k, m:m + len(sol)], s_lp[k, :n], t_lp[k, :n], cfg.rlt_lambda,
                                           cfg.rlt_alpha)
        return rewards
    return score
