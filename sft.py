"""Supervised training on token sequences with a loss mask, and outcome-reward-model training.

    from sft import SFTConfig, sft_train, orm_train
    sft_train(model, [(prompt_ids, response_ids), ...], SFTConfig(lr=1e-3, epochs=2))
    orm_train(value_model, [(prompt_ids, chosen_ids, rejected_ids), ...], SFTConfig(lr=5e-5))

train.py calls these for pretraining of the built-in base model, format tuning, distillation and
the ORM:  python train.py --stages=pretrain,sft

Batches are packed, padding-free: whole documents (prompt + response) are laid end to end in rows
of `row_len` tokens; attention is causal within each document (model.doc_attention), never across, and
positions restart at 0 for each, so a packed row computes exactly what the documents would alone. The loss is
on response tokens only (the prompt is context), normalised over the whole optimizer step (all
micro-batches of one accumulation), so splitting a step into micro-batches never changes it.
The same holds across processes: under torchrun each rank trains on its share of every micro-batch's
rows and the loss is normalised by global counts (parallel.py), so `torchrun --nproc_per_node=N`
trains the same model as one process. With a checkpoint directory a run resumes bitwise where it
stopped (checkpoint.py).
"""
import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import checkpoint
import logprobs
import parallel
from model import autocast

IGNORE = -100   # target of a position that has no loss: prompt, last token of a document, padding


@dataclass
class SFTConfig:
    lr: float = 2e-5              # peak learning rate (Satori format tuning: 2e-5)
    min_lr_ratio: float = 0.1     # the cosine decays to lr * min_lr_ratio at the last step
    warmup_frac: float = 0.03     # linear warm-up over this share of the steps
    epochs: float = 1.0           # passes over the data (fractions allowed); unused when max_steps > 0
    max_steps: int = 0            # optimizer steps; > 0 overrides epochs (the data is cycled)
    batch_tokens: int = 4096      # token budget of one micro-batch (rows x row_len, padding included)
    row_len: int = 0              # length of a packed row; 0 = the longest example
    grad_accum: int = 1           # micro-batches per optimizer step
    clip: float = 1.0             # max global grad norm
    weight_decay: float = 0.0     # AdamW decay of matrices (never of norms, biases)
    betas: tuple = (0.9, 0.95)
    seed: int = 0
    log_every: int = 10           # optimizer steps between progress lines
    max_bad_steps: int = 5        # non-finite steps in a row (each skipped) before the run aborts
    dtype: torch.dtype = torch.float32   # forward compute (model.autocast); the weights stay fp32
    act_ckpt: bool = False        # recompute each block's activations in backward (model.Trunk.act_ckpt)
    shard: bool = False           # under torchrun, FSDP2 (parallel.shard_model) instead of a full copy per process


# -----------------------------------------------------------------------------
# learning-rate schedule

def lr_at(step, total, cfg):
    """lr of optimizer step `step` (0-based) out of `total`: linear warm-up to cfg.lr over the first
    int(warmup_frac * total) steps, then a cosine down to lr * min_lr_ratio at step total - 1."""
    warm = int(cfg.warmup_frac * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - 1 - warm))
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * progress))


# -----------------------------------------------------------------------------
# packing: units (one example = one or more documents kept together) -> rows -> micro-batches

def pack(lengths, row_len, batch_tokens, rng):
    """Shuffle units and pack them into rows of at most row_len tokens (first fit among the last 16
    open rows: near-full rows in linear time), then group rows into micro-batches of
    batch_tokens // row_len rows. lengths: tokens of each unit. -> [[[unit index, ...] row] batch]."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows, space = [], []
    for i in order:
        n = lengths[i]
        for r in range(max(0, len(rows) - 16), len(rows)):
            if space[r] >= n:
                rows[r].append(i)
                space[r] -= n
                break
        else:
            rows.append([i])
            space.append(row_len - n)
    per = max(1, batch_tokens // row_len)
    return [rows[i:i + per] for i in range(0, len(rows), per)]


@dataclass
class Batch:
    ids: torch.Tensor       # [B, T] packed tokens (rows right-padded to the longest row)
    pos: torch.Tensor       # [B, T] position of each token inside its own document
    docs: list              # document lengths over the B * T flattened positions, a row's pad tail one more:
                            # attention is causal within a document only (model.doc_attention)
    targets: torch.Tensor   # [B, T] next token of the same document, IGNORE where there is no loss
    ends: torch.Tensor      # [D] flat index b * T + t of every document's last token, in unit order
    units: list             # unit indices in the order their documents appear in `ends`
    n_tokens: int           # real (non-pad) tokens
    n_loss: int             # positions with a target


def collate(rows, units, pad_id=0, device="cpu"):
    """Build a packed Batch. rows: [[unit index, ...], ...]; units[i]: list of documents
    (ids, n_prompt, keep); a document's loss targets are its own tokens after the first n_prompt,
    except those where the optional per-response-token mask `keep` is False."""
    T = max(sum(len(d) for i in row for d, *_ in units[i]) for row in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), IGNORE, dtype=torch.long)
    ends, order, docs = [], [], []
    for b, row in enumerate(rows):
        t = 0
        for i in row:
            order.append(i)
            for d, n_prompt, keep in units[i]:
                n = len(d)
                x = torch.tensor(d, dtype=torch.long)
                ids[b, t:t + n], pos[b, t:t + n] = x, torch.arange(n)
                # position j predicts d[j + 1]; only response tokens (index >= n_prompt) are targets
                k = max(n_prompt, 1)
                y = x[k:]
                if keep is not None:
                    y = y.masked_fill(~torch.tensor(keep[k - n_prompt:], dtype=torch.bool), IGNORE)
                targets[b, t + k - 1:t + n - 1] = y
                ends.append(b * T + t + n - 1)
                docs.append(n)
                t += n
        if t < T:
            docs.append(T - t)                               # the padding: one more segment, never read
    n_tokens = sum(len(d) for row in rows for i in row for d, *_ in units[i])
    n_loss = int((targets != IGNORE).sum())
    to = lambda x: x.to(device, non_blocking=True)
    return Batch(to(ids), to(pos), docs, to(targets), to(torch.tensor(ends)), order, n_tokens, n_loss)


# -----------------------------------------------------------------------------
# losses: each returns (sum over its units of the loss, metrics) for one packed batch

def sft_loss(model, batch):
    """-sum log p(target) over the batch's response tokens; the head is fused with the log-softmax
    (logprobs.token_logprobs), so [B, T, V] logits never exist."""
    h = model.hidden(batch.ids, batch.pos, docs=batch.docs)          # [B, T, H]
    sel = batch.targets != IGNORE                                    # [B, T]
    lp = logprobs.token_logprobs(h[sel], model.lm_head.weight, batch.targets[sel])   # [N] fp32
    return -lp.sum(), {}


def bt_loss(r_chosen, r_rejected, margin=2.0):
    """Bradley-Terry loss with a margin, mean over pairs: -log sigmoid(r+ - r- - margin)."""
    return -F.logsigmoid(r_chosen.float() - r_rejected.float() - margin).mean()


def orm_loss(value_model, batch, margin):
    """Reward of a document = the value model's output at its last token; units are
    (chosen, rejected) pairs, so batch.ends reads [r+, r-, r+, r-, ...]."""
    v = value_model(batch.ids, batch.pos, docs=batch.docs).float()   # [B, T]
    r = v.flatten()[batch.ends].view(-1, 2)                          # [pairs, 2]
    return bt_loss(r[:, 0], r[:, 1], margin) * r.shape[0], {"acc": (r[:, 0] > r[:, 1]).float().sum().item()}


# -----------------------------------------------------------------------------
# the training loop shared by SFT and the ORM

def sft_train(model, examples, cfg, log=print, on_metrics=None, name="sft", ckpt_dir=None, ckpt_every=0, keep=2):
    """Train a Transformer on (prompt_ids, response_ids) pairs, loss on the response only (append the
    eos id to the response to teach stopping). An example may carry a third item, a per-response-token
    mask (False = context, no loss: e.g. the wrong steps of a COAT demonstration that it corrects).
    `name` prefixes the progress lines and metrics; ckpt_dir, ckpt_every, keep: checkpoints and
    resume (see train_loop). Returns the run's metrics (see train_loop)."""
    units = [[(list(ex[0]) + list(ex[1]), len(ex[0]), ex[2] if len(ex) > 2 else None)] for ex in examples]
    if any(len(ex[1]) == 0 for ex in examples):
        raise ValueError("sft_train: every example needs at least one response token")
    return train_loop(model, units, cfg, sft_loss, per="tokens", log=log, on_metrics=on_metrics, name=name,
                      ckpt_dir=ckpt_dir, ckpt_every=ckpt_every, keep=keep)


def orm_pairs(prompts, groups):
    """(prompt, correct response, incorrect response) triples for the ORM: per prompt, its correct
    and incorrect samples paired in order (groups[i]: [(response ids, correct), ...] of prompts[i])."""
    pairs = []
    for p, samples in zip(prompts, groups):
        good = [r for r, ok in samples if ok]
        bad = [r for r, ok in samples if not ok]
        pairs += [(p, g, b) for g, b in zip(good, bad)]
    return pairs


def orm_train(value_model, pairs, cfg, margin=2.0, log=print, on_metrics=None, ckpt_dir=None, ckpt_every=0, keep=2):
    """Train a ValueModel as an outcome reward model on (prompt, chosen, rejected) triples of token
    ids, with the Bradley-Terry margin loss. Both responses of a pair sit in the same row."""
    units = [[(list(p) + list(c), len(p), None), (list(p) + list(r), len(p), None)] for p, c, r in pairs]
    fn = lambda m, b: orm_loss(m, b, margin)
    return train_loop(value_model, units, cfg, fn, per="units", log=log, on_metrics=on_metrics, name="orm",
                      ckpt_dir=ckpt_dir, ckpt_every=ckpt_every, keep=keep)


def _plan(lengths, row_len, cfg, rng):
    """Every micro-batch of the run, packed up front (re-shuffled each epoch) so the schedule knows
    the total number of steps."""
    if cfg.max_steps > 0:
        need = cfg.max_steps * cfg.grad_accum
    else:
        need = None
    plan, epoch = [], 0
    while True:
        batches = pack(lengths, row_len, cfg.batch_tokens, rng)
        if need is None:
            left = math.ceil(len(batches) * min(1.0, cfg.epochs - epoch))
            plan += batches[:left]
            epoch += 1
            if epoch >= cfg.epochs:
                return plan
        else:
            plan += batches[:need - len(plan)]
            if len(plan) >= need:
                return plan


def fmt_time(s):
    """Seconds as m:ss or h:mm:ss, for progress lines."""
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def skip_if_nonfinite(values, in_a_row, limit, what, log):
    """The guard of every training loop (SFT, the ORM, the PPO update): an optimizer step whose loss
    or gradient norm is not finite is skipped. values: {name: float}, global over the processes, so
    that every process decides alike. -> in_a_row: 0 when every value is finite (take the step),
    else in_a_row + 1 after a warning (skip it). `limit` skips in a row raise RuntimeError: only a
    lower learning rate or other data gets such a run going again."""
    if all(math.isfinite(v) for v in values.values()):
        return 0
    in_a_row += 1
    log(f"{what}: WARNING non-finite " + ", ".join(f"{k} {v}" for k, v in values.items())
        + f": step skipped ({in_a_row} in a row)")
    if in_a_row >= limit:
        raise RuntimeError(f"{what}: {in_a_row} non-finite steps in a row, aborting: lower the learning rate or "
                           "check the data and rewards (max_bad_steps sets the limit)")
    return in_a_row


def _optimizer(model, cfg, device):
    """AdamW over the trainable parameters, decaying matrices only (nanoGPT's groups; a tied
    embedding appears once in parameters()) -> (params, optimizer)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return params, torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=device.type == "cuda")


def _accumulate(model, rows, units, loss_fn, per, device, dtype, win, sharded=False):
    """Forward and backward of one optimizer step's micro-batches (this rank's rows of each), the
    loss normalised by the step's GLOBAL count of loss tokens (per="tokens") or units (per="units")
    -> (this rank's part of the step's loss, its tokens); loss_fn's extra metrics go to win. Sharded,
    every rank runs every micro-batch (FSDP2's gathers are collectives): a rank with no rows for one
    runs a stand-in row whose loss counts zero."""
    micro = [(r, collate(r or [[0]], units, 0, device)) for r in rows if r or sharded]    # may be [] on a rank
    denom = max(1, parallel.all_sum(sum(b.n_loss if per == "tokens" else len(b.units) for r, b in micro if r)))
    step_loss, step_tokens = 0.0, 0
    for r, b in micro:
        with autocast(device, dtype):
            loss_sum, extra = loss_fn(model, b)
        if not r:
            (loss_sum * 0.0).backward()
            continue
        (loss_sum / denom).backward()
        step_loss += loss_sum.item() / denom
        step_tokens += b.n_tokens
        for k, v in extra.items():
            win["extra"][k] = win["extra"].get(k, 0.0) + v
        win["n"] += len(b.units)
    return step_loss, step_tokens


def _window(tokens):
    """What a progress line averages over: the losses and extra metrics since the last line."""
    return {"losses": [], "extra": {}, "n": 0, "t": time.time(), "tokens": tokens}


_REPORT_ONLY = ("stage", "step", "steps", "loss", "lr", "grad_norm", "tokens_per_s", "eta_s")   # not in the result


def _report(win, name, step, steps, lr, gnorm, tokens, t0, start, say):
    """The progress line and metrics of the window since the last one (extra metrics over all ranks)."""
    parts = parallel.gather([(win["extra"], win["n"])])        # per-rank metric sums -> global
    n = sum(k for _, k in parts)
    extra = {k: sum(e.get(k, 0.0) for e, _ in parts) for k in dict.fromkeys(k for e, _ in parts for k in e)}
    now = time.time()
    tps = (tokens - win["tokens"]) / max(now - win["t"], 1e-9)
    eta = (now - t0) / (step + 1 - start) * (steps - step - 1)
    m = {"stage": name, "step": step + 1, "steps": steps,
         "loss": sum(win["losses"]) / len(win["losses"]) if win["losses"] else float("nan"),
         "lr": lr, "grad_norm": gnorm, "tokens_per_s": tps, "eta_s": eta}
    m.update({k: v / max(n, 1) for k, v in extra.items()})
    say(f"{name} step {step + 1}/{steps} loss {m['loss']:.4f}" + "".join(f" {k} {m[k]:.3f}" for k in extra)
        + f" lr {lr:.2e} gnorm {gnorm:.2f} tok/s {tps:.0f} eta {fmt_time(eta)}")
    return m


def _plan_run(units, cfg, name):
    """Every micro-batch of the run, from the seed (so a resumed run rebuilds the same plan)."""
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    lengths = [sum(len(d) for d, *_ in u) for u in units]
    row_len = cfg.row_len or max(lengths)
    if max(lengths) > row_len:
        raise ValueError(f"{name}: an example has {max(lengths)} tokens, more than row_len={row_len}")
    return _plan(lengths, row_len, cfg, rng)


def _setup(model, cfg, name, steps, ckpt_dir, say):
    """The model sharded (with cfg.shard under torchrun, unless the caller did it), its optimizer, and
    the loop's state: a fresh one or the newest checkpoint's -> (params, optimizer, state)."""
    if cfg.shard and parallel.world() > 1 and not parallel.is_sharded(model):   # before the optimizer: it holds the shards
        parallel.shard_model(model, None if cfg.dtype == torch.float32 else cfg.dtype)
    params, opt = _optimizer(model, cfg, next(model.parameters()).device)
    # what a checkpoint saves besides weights, optimizer and RNG
    run = {"stage": name, "step": 0, "steps": steps, "losses": [], "skipped_steps": 0, "bad_in_a_row": 0, "tokens": 0}
    if ckpt_dir:
        # fail before training, not at the first save: room for weights + two AdamW moments
        checkpoint.check_writable(ckpt_dir, 3 * sum(p.numel() * p.element_size() for p in params))
        # the plan is rebuilt from the seed, so the step is all the data position needed
        run = {**run, **(checkpoint.resume(ckpt_dir, {"model": model}, {"opt": opt}, name, steps, say) or {})}
    return params, opt, run


def train_loop(model, units, cfg, loss_fn, per="tokens", log=print, on_metrics=None, name="sft",
               ckpt_dir=None, ckpt_every=0, keep=2):
    """AdamW + warm-up/cosine + grad clipping + accumulation over packed micro-batches (the module
    docstring says how processes share them). units: lists of documents (ids, n_prompt, keep);
    loss_fn(model, batch) -> (loss sum, metrics); per: normalise by the step's loss "tokens" or
    "units" (ORM pairs). ckpt_dir: resume from its newest checkpoint, save every ckpt_every steps
    (0: after the last) keeping `keep`. -> {"steps", "loss" (last log window), "first_loss",
    "losses", "tokens" (all ranks), "time_s", "tokens_per_s", "skipped_steps", "resumed_from"}
    (+ loss_fn's metrics, e.g. the ORM's "acc")."""
    if not units:
        raise ValueError(f"{name}: no training examples")
    device = next(model.parameters()).device
    rank, world = parallel.rank(), parallel.world()
    say = log if rank == 0 else (lambda s: None)
    plan = _plan_run(units, cfg, name)
    steps = math.ceil(len(plan) / cfg.grad_accum)
    params, opt, run = _setup(model, cfg, name, steps, ckpt_dir, say)
    sharded = parallel.is_sharded(model)
    start, losses, tokens = run["step"], run["losses"], run["tokens"]
    model.train()
    model.model.act_ckpt = cfg.act_ckpt
    last, win = {"loss": losses[-1] if losses else float("nan")}, _window(tokens)
    t0, tokens0 = time.time(), tokens
    for step in range(start, steps):
        lr = lr_at(step, steps, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        rows = [r[rank::world] for r in plan[step * cfg.grad_accum:(step + 1) * cfg.grad_accum]]
        step_loss, step_tokens = _accumulate(model, rows, units, loss_fn, per, device, cfg.dtype, win, sharded)
        parallel.sync_grads(params)
        step_loss, step_tokens = parallel.all_sum([step_loss, step_tokens])
        tokens += step_tokens
        gnorm = parallel.clip_grad_norm(params, cfg.clip)
        run["bad_in_a_row"] = skip_if_nonfinite({"loss": step_loss, "grad norm": gnorm}, run["bad_in_a_row"],
                                                cfg.max_bad_steps, f"{name} step {step + 1}/{steps}", say)
        if run["bad_in_a_row"]:
            run["skipped_steps"] += 1
        else:
            opt.step()
            win["losses"].append(step_loss)
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        if (step + 1) % cfg.log_every == 0 or step == steps - 1:
            last = _report(win, name, step, steps, lr, gnorm, tokens, t0, start, say)
            if on_metrics and rank == 0:
                on_metrics(last)
            win = _window(tokens)
        if ckpt_dir and ((ckpt_every > 0 and (step + 1) % ckpt_every == 0) or step == steps - 1):
            run.update(step=step + 1, losses=losses, tokens=tokens)
            checkpoint.save(ckpt_dir, f"step-{step + 1:08d}", {"model": model}, {"opt": opt}, run, keep=keep)
    model.eval()
    dt = time.time() - t0
    out = {"steps": steps, "loss": last["loss"], "first_loss": losses[0], "losses": losses, "tokens": tokens,
           "time_s": dt, "tokens_per_s": (tokens - tokens0) / max(dt, 1e-9),
           "skipped_steps": run["skipped_steps"], "resumed_from": start}
    out.update({k: v for k, v in last.items() if k not in _REPORT_ONLY})
    return out
