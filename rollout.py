"""The KV-cache sampler: paged cache, continuous batching, prefill + decode, temperature / top-p.

    sampler = Sampler(model, max_batch=64)
    outs = sampler.generate([tok.encode_prompt(q) for q in questions], max_new_tokens=256,
                            temperature=0.6, stop_ids=tok.stop_ids, seed=0)
    outs[0].tokens, outs[0].logprobs        # generated ids (prompt excluded), log p of each

The cache is allocated once as fixed-size blocks; each sequence holds a block table. A sequence
reserves the blocks for its whole budget (prompt + max_new_tokens) when it is admitted, so no
preemption is ever needed, and frees them the moment it stops; the next prompt in the queue takes
its slot at once. Full blocks of prompt tokens are shared between sequences with the same prefix
(the prompt template, several samples of one question, restart states), keyed by the exact prefix.
"""
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import kernels
import parallel


@dataclass
class Completion:
    tokens: list = field(default_factory=list)     # generated ids, prompt excluded, stop id included
    logprobs: list = field(default_factory=list)   # log p of each token under the distribution it was drawn from
    finish_reason: str = ""                        # "stop" (a stop id) or "length" (max_new_tokens)

    @property
    def finished(self):
        return self.finish_reason == "stop"

    @property
    def body(self):
        """The generated ids without the stop id that ended them."""
        return self.tokens[:-1] if self.finished else self.tokens


@dataclass
class _Seq:
    index: int            # position in the caller's prompt list
    tokens: list          # prompt + generated so far
    prompt_len: int
    budget: int           # max_new_tokens of this sequence
    blocks: list          # block table
    out: Completion
    cached: int = 0       # prompt tokens whose K/V came from shared blocks


class PagedKVCache:
    """K/V for every layer, [L, num_blocks, block_size, n_kv, hd] each, and the metadata of the
    current step. The model calls `attend` once per layer with the step's packed tokens."""

    def __init__(self, cfg, num_blocks, block_size, device, dtype):
        shape = (cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size
        self.scale = cfg.head_dim ** -0.5

    def set_step(self, slot_mapping, block_tables, context_lens, query_lens, decode):
        # slot_mapping [N]: cache slot of each new token; block_tables [B, max_blocks];
        # context_lens [B]: cached tokens after this step; query_lens: new tokens per sequence.
        self.slot_mapping, self.block_tables, self.context_lens = slot_mapping, block_tables, context_lens
        self.query_lens, self.decode = query_lens, decode

    def attend(self, layer, q, k, v):
        """q [N, heads, hd], k/v [N, n_kv, hd] of the step's new tokens -> [N, heads, hd]."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        kernels.store_kv(k, v, k_cache, v_cache, self.slot_mapping)
        if self.decode:   # one new token per sequence
            return kernels.decode_attention(q, k_cache, v_cache, self.block_tables, self.context_lens, self.scale)
        # Prefill: each sequence's new tokens attend causally to its whole cached context, which
        # may start with shared prefix blocks computed by another sequence.
        outs, start = [], 0
        for b, n in enumerate(self.query_lens):
            ctx = int(self.context_lens[b])
            slots = _slots(self.block_tables[b], ctx, self.block_size)
            kc = k_cache.flatten(0, 1)[slots].transpose(0, 1)                 # [n_kv, ctx, hd]
            vc = v_cache.flatten(0, 1)[slots].transpose(0, 1)
            qb = q[start:start + n].transpose(0, 1)                            # [heads, n, hd]
            # query i sits at position ctx - n + i and sees keys 0 .. ctx - n + i
            mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(ctx - n)
            o = F.scaled_dot_product_attention(qb[None], kc[None], vc[None], attn_mask=mask, enable_gqa=True)
            outs.append(o[0].transpose(0, 1))
            start += n
        return torch.cat(outs)


def _slots(block_table, n, block_size):
    """Cache slots of a sequence's first n tokens."""
    pos = torch.arange(n, device=block_table.device)
    return block_table[pos // block_size].long() * block_size + pos % block_size


class Sampler:
    def __init__(self, model, max_batch=64, block_size=16, max_seq_len=None, num_blocks=None):
        self.model = model
        cfg = model.cfg
        self.max_batch, self.block_size = max_batch, block_size
        self.max_seq_len = max_seq_len or min(cfg.max_position_embeddings, 2048)
        blocks_per_seq = -(-self.max_seq_len // block_size)
        self.num_blocks = num_blocks or max_batch * blocks_per_seq
        p = next(model.parameters())
        self.device = p.device
        self.cache = PagedKVCache(cfg, self.num_blocks, block_size, p.device, p.dtype)

    # ------------------------------------------------------------------ block bookkeeping
    def _reset_blocks(self):
        # Weights change between calls (RL updates), so cached prefixes never outlive a call.
        self.free = deque(range(self.num_blocks))
        self.refs = [0] * self.num_blocks
        self.prefix_of = {}    # block id -> prefix key, for blocks holding a full prompt prefix
        self.block_of = {}     # prefix key (tuple of all tokens up to the block's end) -> block id

    def _alloc(self):
        b = self.free.popleft()
        key = self.prefix_of.pop(b, None)
        if key is not None:    # it held a cached prefix that nobody uses any more: forget it
            del self.block_of[key]
        self.refs[b] = 1
        return b

    def _release(self, blocks):
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free.append(b)   # cached prefixes stay findable until the block is reused

    def _admit(self, index, prompt, max_new_tokens):
        """Reserve a sequence's blocks, reusing full prompt blocks already in the cache.
        Returns None when there is not enough free space yet."""
        bs = self.block_size
        need = -(-(len(prompt) + max_new_tokens) // bs)
        shared = []
        # at least the last prompt token is always recomputed: we need its logits
        for i in range((len(prompt) - 1) // bs):
            b = self.block_of.get(tuple(prompt[:(i + 1) * bs]))
            if b is None:
                break
            shared.append(b)
        fresh = need - len(shared)
        idle_shared = sum(self.refs[b] == 0 for b in shared)   # they sit in the free list
        if fresh > len(self.free) - idle_shared:
            return None
        for b in shared:
            if self.refs[b] == 0:
                self.free.remove(b)
            self.refs[b] += 1
        blocks = shared + [self._alloc() for _ in range(fresh)]
        for i in range(len(shared), len(prompt) // bs):   # publish this prompt's full blocks
            key = tuple(prompt[:(i + 1) * bs])
            if key not in self.block_of:
                self.block_of[key], self.prefix_of[blocks[i]] = blocks[i], key
        return _Seq(index, list(prompt), len(prompt), max_new_tokens, blocks, Completion(), cached=len(shared) * bs)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_p=1.0, stop_ids=None, seed=None):
        """max_new_tokens: one budget for all, or a list with one per prompt."""
        budgets = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
        if len(budgets) != len(prompts):
            raise ValueError(f"{len(budgets)} max_new_tokens for {len(prompts)} prompts")
        for i, (p, n) in enumerate(zip(prompts, budgets)):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if n < 1:
                raise ValueError(f"prompt {i}: max_new_tokens must be >= 1, got {n}")
            if len(p) + n > self.max_seq_len:
                raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens {n} exceeds "
                                 f"the sampler's max_seq_len {self.max_seq_len}")
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else torch.seed())
        stop = set(stop_ids or [])
        self._reset_blocks()
        queue = deque(zip(range(len(prompts)), prompts, budgets))
        running, results = [], [None] * len(prompts)
        while queue or running:
            admitted = []
            while queue and len(running) + len(admitted) < self.max_batch:
                seq = self._admit(*queue[0])
                if seq is None:
                    break
                queue.popleft()
                admitted.append(seq)
            if not admitted and not running:
                raise RuntimeError("KV cache too small for one sequence: raise num_blocks")
            batch = admitted or running       # prefill the newcomers first, then decode everyone
            logits = self._forward(batch, decode=not admitted)
            tokens, logprobs = sample(logits, temperature, top_p, gen)
            for seq, t, lp in zip(batch, tokens.tolist(), logprobs.tolist()):
                seq.tokens.append(t)
                seq.out.tokens.append(t)
                seq.out.logprobs.append(lp)
                if t in stop or len(seq.out.tokens) >= seq.budget:
                    seq.out.finish_reason = "stop" if t in stop else "length"
                    results[seq.index] = seq.out
                    self._release(seq.blocks)
            running = [s for s in running + admitted if not s.out.finish_reason]
        return results

    def _forward(self, batch, decode):
        """Run the model on the step's new tokens; returns the logits of each sequence's last one."""
        bs, dev = self.block_size, self.device
        if decode:   # the newest token of each sequence (its K/V is not cached yet)
            new = [s.tokens[-1:] for s in batch]
            starts = [len(s.tokens) - 1 for s in batch]
        else:        # the prompt, minus the prefix whose K/V sits in shared blocks
            new = [s.tokens[s.cached:] for s in batch]
            starts = [s.cached for s in batch]
        query_lens = [len(n) for n in new]
        ids = torch.tensor([t for n in new for t in n], device=dev)
        pos = torch.tensor([p for st, n in zip(starts, new) for p in range(st, st + len(n))], device=dev)
        # block tables cut to the blocks in use: attention reads no reserved-but-empty blocks
        used = [-(-(st + len(n)) // bs) for st, n in zip(starts, new)]
        width = max(used)
        tables = torch.tensor([s.blocks[:u] + [0] * (width - u) for s, u in zip(batch, used)], dtype=torch.int32, device=dev)
        slots = torch.tensor([s.blocks[p // bs] * bs + p % bs
                              for s, st, n in zip(batch, starts, new) for p in range(st, st + len(n))],
                             dtype=torch.long, device=dev)
        ctx = torch.tensor([st + len(n) for st, n in zip(starts, new)], dtype=torch.int32, device=dev)
        self.cache.set_step(slots, tables, ctx, query_lens, decode)
        h = self.model.hidden(ids[None], pos[None], cache=self.cache)[0]     # [N, H]
        last = torch.tensor(query_lens, device=dev).cumsum(0) - 1
        return h[last] @ self.model.lm_head.weight.T                           # [B, V]


def sampler_for(model, prompts, max_new_tokens, max_batch):
    """A Sampler with room for the longest of prompts plus max_new_tokens."""
    return Sampler(model, max_batch=max_batch, max_seq_len=max(map(len, prompts)) + max_new_tokens)


def generate_shared(sampler, prompts, max_new_tokens, seed, group=1, **kw):
    """`group` samples of each prompt, every process decoding those of its contiguous share of the
    prompts (with seed + 7919 * rank, so that the processes draw different samples) -> the
    Completions of all prompts, prompt-major, on every process."""
    mine = [p for p in parallel.shard(prompts) for _ in range(group)]
    outs = sampler.generate(mine, max_new_tokens, seed=seed + 7919 * parallel.rank(), **kw) if mine else []
    return parallel.gather(outs)


def sample(logits, temperature, top_p, gen):
    """logits [B, V] -> (tokens [B], logprobs [B]). temperature 0 is greedy, and then the
    log-prob is that of the untempered model distribution."""
    logits = logits.float()
    if temperature == 0:
        logp = torch.log_softmax(logits, -1)
        tok = logits.argmax(-1)
        return tok, logp.gather(-1, tok[:, None])[:, 0]
    logp = torch.log_softmax(logits / temperature, -1)
    if top_p < 1.0:   # keep the smallest set of tokens whose mass reaches top_p, renormalised
        sorted_logp, order = logp.sort(-1, descending=True)
        cum = sorted_logp.exp().cumsum(-1)
        drop_sorted = cum - sorted_logp.exp() >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), -1)
    # Exponential race: argmax p / E with E ~ Exp(1) draws from p, without a host sync.
    e = torch.empty_like(logp).exponential_(generator=gen)
    tok = (logp - e.log()).argmax(-1)
    return tok, logp.gather(-1, tok[:, None])[:, 0]
