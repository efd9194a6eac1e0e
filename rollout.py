"""The KV-cache sampler: a paged cache, continuous batching in fixed lanes, one batched prefill for
every admitted prompt, a static decode step (one CUDA graph per batch bucket on CUDA), temperature
and top-p.

    sampler = Sampler(model, max_batch=64)
    outs = sampler.generate([tok.encode_prompt(q) for q in questions], max_new_tokens=256,
                            temperature=0.6, stop_ids=tok.stop_ids, seed=0)
    outs[0].tokens, outs[0].logprobs        # generated ids (prompt excluded), log p of each

The cache is allocated once as fixed-size blocks; each sequence holds a block table. A sequence
reserves the blocks for its whole budget (prompt + max_new_tokens) when it is admitted, so no
preemption is ever needed. Full blocks of prompt tokens are shared between sequences with the same
prefix (the prompt template, several samples of one question, restart states), keyed by the exact
prefix.

A running sequence sits in one of max_batch lanes. What a decode step needs lives in device tensors
indexed by lane (the token to feed, its position, the block table, tokens generated, budget, a
running flag, the tokens and log-probs generated so far), and the step updates them in place: a stop
token or the budget ends a sequence on the device, with no host round trip. Every `sync_every`
steps the host collects the finished sequences, admits waiting ones (one prefill for all of them)
and moves the running ones into the lowest lanes, so that the step runs on the smallest bucket that
holds them (1, 2, 4, ... max_batch on CUDA, where each bucket's step is a CUDA graph).

Sampling draws one uniform number per token from a hash of (seed, the prompt's index in the call,
token index) and inverts the distribution's CDF (in float64, so no tail token is out of reach): the
samples of a prompt do not depend on the batch around it or on how the lanes were filled.
"""
from collections import deque
from itertools import chain
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import paged_kernels
import parallel
import step_kernels
from model import apply_rope

MAX_STOP_IDS = 8      # stop ids live in a fixed-size device buffer (a CUDA graph reads it)
CUDA_GRAPHS = True    # the default of Sampler(cuda_graphs=None) on CUDA (train.py's --cuda_graphs)


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
    prompt: list
    budget: int           # max_new_tokens of this sequence
    blocks: list          # block table
    cached: int = 0       # prompt tokens whose K/V came from shared blocks
    lane: int = -1
    generated: int = 0    # tokens generated, as far as the host knows (an upper bound between looks)


class PagedKVCache:
    """K/V for every layer, [L, num_blocks, block_size, n_kv, hd] each, and the metadata of the
    current step. The model calls `attend` once per layer with the step's packed tokens.

    With lanes > 0 (on CPU), decode reads each lane's K/V from a contiguous copy [L, lanes, n_kv,
    max_len, hd] instead of the blocks: gathering the blocks every step copies every context once
    per layer, which is most of a CPU decode step. Prefill still writes the blocks (prefixes are
    shared through them) and then copies each new sequence's prompt into its lane's rows."""

    def __init__(self, cfg, num_blocks, block_size, device, dtype, lanes=0, max_len=0):
        shape = (cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.scale, self.block_size = cfg.head_dim ** -0.5, block_size
        dense = (cfg.num_hidden_layers, lanes, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.dense = (torch.zeros(dense, device=device, dtype=dtype), torch.zeros(dense, device=device, dtype=dtype)) \
            if lanes else None

    def set_decode(self, block_tables, positions, running):
        # One new token per lane: positions [B] of the new tokens; a stopped lane (running False)
        # stores nothing in the blocks and attends over one token.
        self.prefill = None
        self.block_tables, self.positions = block_tables, positions
        self.context_lens = torch.where(running, positions + 1, 1).int()
        if self.dense is not None:   # -inf past each lane's context, for every layer: [B * n_kv, 1, T]
            B, n_kv, T = len(positions), self.k.shape[3], block_tables.shape[1] * self.block_size
            past = torch.arange(T, device=positions.device) >= self.context_lens[:, None]
            self.bias = torch.zeros(B, n_kv, 1, T, device=positions.device).masked_fill_(
                past[:, None, None], float("-inf")).view(B * n_kv, 1, T)
        else:                        # each new token's slot in the blocks (-1: none)
            bs = self.block_size
            blk = block_tables.gather(1, (positions // bs)[:, None])[:, 0].long()
            self.slot_mapping = torch.where(running, blk * bs + positions % bs, -1)

    def set_prefill(self, slot_mapping, block_tables, q_start, q_lens, context_lens, max_q_len, lanes):
        # Packed runs of new tokens: sequence i's are rows q_start[i] .. + q_lens[i], the last of its
        # context_lens[i] tokens (an earlier part may sit in blocks another sequence computed);
        # lanes [n]: where the sequences run.
        self.prefill = (q_start, q_lens, max_q_len, lanes)
        self.slot_mapping, self.block_tables, self.context_lens = slot_mapping, block_tables, context_lens

    def attend(self, layer, q, k, v, cos, sin):
        """q [N, heads, hd], k/v [N, n_kv, hd] of the step's new tokens, q and k before the rotary
        embedding at their positions (cos, sin [N, hd]) -> [N, heads, hd]."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        if self.prefill is None and self.dense is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            return self._attend_dense(layer, q, k, v)
        if step_kernels.fused(q, "rope_store"):     # one kernel: rotate q and k, store k and v
            q = step_kernels.rope_store(q, k, v, cos, sin, k_cache, v_cache, self.slot_mapping)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            paged_kernels.store_kv(k, v, k_cache, v_cache, self.slot_mapping)
        if self.prefill is None:
            return paged_kernels.decode_attention(q, k_cache, v_cache, self.block_tables, self.context_lens, self.scale)
        q_start, q_lens, max_q_len, lanes = self.prefill
        out = paged_kernels.prefill_attention(q, k_cache, v_cache, self.block_tables, q_start, q_lens,
                                        self.context_lens, self.scale, max_q_len)
        if self.dense is not None:       # the new sequences' prompts into their lanes' rows
            w = self.block_tables.shape[1]
            for cache, dense in ((k_cache, self.dense[0][layer]), (v_cache, self.dense[1][layer])):
                dense[lanes, :, :w * self.block_size] = paged_kernels.gather_blocks(cache, self.block_tables).transpose(1, 2)
        return out

    def _attend_dense(self, layer, q, k, v):
        b, T = q.shape[0], self.block_tables.shape[1] * self.block_size
        dk, dv = self.dense[0][layer], self.dense[1][layer]                  # [lanes, n_kv, max_len, hd]
        n_kv, hd = dk.shape[1], q.shape[-1]
        rows = torch.arange(b, device=q.device)
        dk[rows, :, self.positions], dv[rows, :, self.positions] = k, v      # a stopped lane's row is unused
        # the query heads of a KV head play the part of query positions: no K/V repeated per head.
        # Two batched matmuls beat CPU SDPA here, whose flash kernel tiles 2-4 query rows poorly;
        # in float32 whatever the cache's dtype, as SDPA accumulates (a no-op for fp32).
        keys, values = (c[:b, :, :T].float().reshape(b * n_kv, T, hd) for c in (dk, dv))
        s = torch.baddbmm(self.bias, q.float().view(b * n_kv, -1, hd), keys.transpose(1, 2),
                          alpha=self.scale)                                 # [b * n_kv, heads / n_kv, T]
        return torch.bmm(s.softmax(-1), values).view(q.shape).to(q.dtype)


class Sampler:
    def __init__(self, model, max_batch=64, block_size=16, max_seq_len=None, num_blocks=None, cuda_graphs=None,
                 sync_every=None, dense=None):
        """cuda_graphs: capture the decode step per bucket (default: on CUDA); sync_every: decode
        steps between the host's looks at the lanes (default: 8 on CUDA, 1 on CPU, where a look
        costs nothing); dense: decode from contiguous per-lane K/V (default: on CPU; see PagedKVCache)."""
        self.model = model
        cfg = model.cfg
        self.max_batch, self.block_size = max_batch, block_size
        self.max_seq_len = max_seq_len or min(cfg.max_position_embeddings, 2048)
        self.width = -(-self.max_seq_len // block_size)                   # blocks per sequence at most
        self.num_blocks = min(max_batch * self.width if num_blocks is None else num_blocks, max_batch * self.width)   # more are never used
        if self.num_blocks < self.width:
            raise ValueError(f"KV cache of {self.num_blocks} blocks of {block_size} tokens: one sequence of "
                             f"{self.max_seq_len} tokens needs {self.width}; free GPU memory, or lower --rl_max_new_tokens")
        p = next(model.parameters())
        self.device = dev = p.device
        dense = dev.type == "cpu" if dense is None else dense
        self.cache = PagedKVCache(cfg, self.num_blocks, block_size, dev, p.dtype, max_batch if dense else 0,
                                  self.width * block_size if dense else 0)
        # the rotary table at its full size now (positions stay below max_seq_len): a captured step
        # keeps reading the tensor it saw
        model.model.rope(max(cfg.max_position_embeddings, self.max_seq_len, max_batch), dev, p.dtype)
        self.cuda_graphs = dev.type == "cuda" and (CUDA_GRAPHS if cuda_graphs is None else cuda_graphs)
        self.sync_every = sync_every or (8 if dev.type == "cuda" else 1)
        S, L = max_batch, self.max_seq_len
        zeros = lambda *shape, dtype=torch.long: torch.zeros(*shape, dtype=dtype, device=dev)
        # the lanes' state, updated in place by every decode step
        self.tok, self.pos, self.n_gen, self.budget = (zeros(S) for _ in range(4))
        self.running = zeros(S, dtype=torch.bool)
        self.tables = zeros(S, self.width, dtype=torch.int32)
        self.out_tok, self.out_lp = zeros(S, L), zeros(S, L, dtype=torch.float32)
        self.u = zeros(S, L, dtype=torch.float64)   # the uniform that draws each lane's token n, drawn at admission
        # the call's settings, as device tensors so that a captured step reads the current ones
        self.seed_t, self.temp_t, self.stop_t = zeros(1), zeros(1, dtype=torch.float32), zeros(MAX_STOP_IDS)
        self.graphs, self.pool = {}, None

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
        return _Seq(index, list(prompt), max_new_tokens, blocks, cached=len(shared) * bs)

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_p=1.0, stop_ids=None, seed=None, progress=None):
        """max_new_tokens: one budget for all, or a list with one per prompt. progress(done, total), if
        given, is called at each of the host's looks at the lanes (no extra sync)."""
        budgets = self._check(prompts, max_new_tokens, stop_ids)
        stop = list(stop_ids or [])
        self.seed_t.fill_((torch.seed() if seed is None else seed) & 0xFFFFFFFF)
        self.temp_t.fill_(temperature or 1.0)
        self.stop_t.fill_(-1)
        self.stop_t[:len(stop)] = torch.tensor(stop, dtype=torch.long)
        self.running.zero_()
        self._reset_blocks()
        mode = (temperature == 0, top_p)
        queue = deque(zip(range(len(prompts)), prompts, budgets))
        lanes, results = [None] * self.max_batch, [None] * len(prompts)
        while True:
            self._collect(lanes, results, set(stop))
            if progress:
                progress(len(prompts) - len(queue) - sum(s is not None for s in lanes), len(prompts))
            if not queue and not any(lanes):
                return results
            admitted = []
            while queue and None in lanes:
                seq = self._admit(*queue[0])
                if seq is None:
                    break
                queue.popleft()
                seq.lane = lanes.index(None)
                lanes[seq.lane] = seq
                admitted.append(seq)
            if admitted:
                self._prefill(admitted, *mode)
                continue                       # collect the ones a stop token ended at once
            if not any(lanes):
                raise RuntimeError("KV cache too small for one sequence: raise num_blocks")
            b = self._compact(lanes)
            steps = max(1, min(self.sync_every, min(s.budget - s.generated for s in lanes if s)))
            # eagerly, attention reads only the blocks the running sequences can reach by the next look
            reach = None if self.cuda_graphs else -(-max(len(s.prompt) + s.generated + steps for s in lanes if s)
                                                    // self.block_size)
            for _ in range(steps):
                self._decode(b, *mode, reach)
            for s in lanes:
                if s:
                    s.generated += steps

    def _check(self, prompts, max_new_tokens, stop_ids):
        budgets = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
        if len(budgets) != len(prompts):
            raise ValueError(f"{len(budgets)} max_new_tokens for {len(prompts)} prompts")
        if len(stop_ids or []) > MAX_STOP_IDS:
            raise ValueError(f"{len(stop_ids)} stop ids: at most {MAX_STOP_IDS}")
        for i, (p, n) in enumerate(zip(prompts, budgets)):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if n < 1:
                raise ValueError(f"prompt {i}: max_new_tokens must be >= 1, got {n}")
            if len(p) + n > self.max_seq_len:
                raise ValueError(f"prompt {i}: {len(p)} tokens + max_new_tokens {n} exceeds "
                                 f"the sampler's max_seq_len {self.max_seq_len}")
        return budgets

    def _prefill(self, seqs, greedy, top_p):
        """One forward over every admitted sequence's uncached prompt tokens; samples each one's
        first token and puts the sequences in their lanes."""
        bs, dev = self.block_size, self.device
        lens = [len(s.prompt) - s.cached for s in seqs]
        ids = torch.tensor(list(chain.from_iterable(s.prompt[s.cached:] for s in seqs)), device=dev)
        tables = torch.tensor([s.blocks + [0] * (self.width - len(s.blocks)) for s in seqs], dtype=torch.int32,
                              device=dev)
        prompt_blocks = -(-max(len(s.prompt) for s in seqs) // bs)          # attention reads no further
        q_lens = torch.tensor(lens, dtype=torch.int32, device=dev)
        q_start = q_lens.cumsum(0, dtype=torch.int32) - q_lens
        ctx = torch.tensor([len(s.prompt) for s in seqs], dtype=torch.int32, device=dev)
        # each new token's sequence, position and cache slot, on the device (not a Python loop per token)
        seq = torch.repeat_interleave(torch.arange(len(seqs), device=dev), q_lens, output_size=len(ids))
        pos = torch.arange(len(ids), device=dev) - q_start[seq] + (ctx - q_lens)[seq]
        slot_map = tables[seq, pos // bs].long() * bs + pos % bs
        sl = torch.tensor([s.lane for s in seqs], device=dev)
        self.cache.set_prefill(slot_map, tables[:, :prompt_blocks], q_start, q_lens, ctx, max(lens), sl)
        h = self.model.hidden(ids[None], pos[None], cache=self.cache)[0]         # [N, H]
        logits = h[q_start + q_lens - 1] @ self.model.lm_head.weight.T               # [B, V]
        key = stream_key(self.seed_t, torch.tensor([s.index for s in seqs], device=dev))
        most = max(s.budget for s in seqs)
        u = uniform(key[:, None], torch.arange(most, device=dev))                  # [n, most]: once, not per step
        tok, lp = sample(logits, self.temp_t, top_p, u[:, 0], greedy)
        budget = torch.tensor([s.budget for s in seqs], device=dev)
        self.tables[sl], self.u[sl, :most], self.budget[sl] = tables, u, budget
        self.tok[sl], self.pos[sl], self.n_gen[sl] = tok, ctx.long(), 1
        self.out_tok[sl, 0], self.out_lp[sl, 0] = tok, lp
        self.running[sl] = ~((tok[:, None] == self.stop_t).any(-1) | (budget <= 1))
        for s in seqs:
            s.generated = 1

    def _step(self, b, greedy, top_p, reach=None):
        """The static decode step of lanes [0, b): feed each running lane's token, sample the next,
        record it, end sequences at a stop token or their budget. Shapes depend on b alone and
        nothing reads the host, so a CUDA graph can capture it. reach: block-table columns to read
        (eager only; None: all)."""
        L = self.max_seq_len
        tok, pos, run, n = self.tok[:b], self.pos[:b], self.running[:b], self.n_gen[:b]
        self.cache.set_decode(self.tables[:b, :reach], pos, run)
        h = self.model.hidden(tok[None], pos[None], cache=self.cache)[0]            # [b, H]
        # [lane, n] of out_*, u for every lane: a stopped lane writes past its last token, where nothing reads
        at = torch.arange(b, device=self.device) * L + n.clamp(max=L - 1)
        new, lp = sample(h @ self.model.lm_head.weight.T, self.temp_t, top_p, self.u.view(-1)[at], greedy)
        self.out_tok.view(-1)[at], self.out_lp.view(-1)[at] = new, lp
        done = run & ((new[:, None] == self.stop_t).any(-1) | (n + 1 >= self.budget[:b]))
        n += run
        pos += run
        tok.copy_(new)
        run &= ~done

    def _decode(self, b, greedy, top_p, reach=None):
        if not self.cuda_graphs or top_p < 1.0:
            return self._step(b, greedy, top_p, reach)
        graph = self.graphs.get((b, greedy))
        if graph is None:
            graph = self.graphs[(b, greedy)] = self._capture(b, greedy)
        graph.replay()

    @torch.inference_mode()
    def capture(self, greedy=False):
        """Capture the decode step of every bucket now (each is otherwise captured on first use);
        a no-op without CUDA graphs."""
        if self.cuda_graphs:
            for b in sorted({self._bucket(n) for n in range(1, self.max_batch + 1)}, reverse=True):
                if (b, greedy) not in self.graphs:
                    self.graphs[(b, greedy)] = self._capture(b, greedy)

    def _capture(self, b, greedy):
        """The step of bucket b as a CUDA graph. Warm-up and capture run with every lane stopped, so
        that they write no K/V into the blocks and advance nothing; the tokens to feed, which a step
        overwrites in every lane, are put back."""
        running, tok = self.running.clone(), self.tok.clone()
        self.running.zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):       # compiles and autotunes the kernels before capture
            for _ in range(2):
                self._step(b, greedy, 1.0)
        torch.cuda.current_stream().wait_stream(stream)
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._step(b, greedy, 1.0)
        self.running.copy_(running)
        self.tok.copy_(tok)
        return graph

    def _collect(self, lanes, results, stop):
        """The host's look at the lanes (one sync): finished sequences become Completions and give
        their blocks back."""
        occupied = [i for i, s in enumerate(lanes) if s]
        if not occupied:
            return
        running = self.running.tolist()
        done = [i for i in occupied if not running[i]]
        if not done:
            return
        idx = torch.tensor(done, device=self.device)
        n = self.n_gen[idx].tolist()
        toks, lps = self.out_tok[idx, :max(n)].tolist(), self.out_lp[idx, :max(n)].tolist()
        for i, k, t, lp in zip(done, n, toks, lps):
            seq = lanes[i]
            reason = "stop" if t[k - 1] in stop else "length"
            results[seq.index] = Completion(t[:k], lp[:k], reason)
            self._release(seq.blocks)
            lanes[i] = None

    def _compact(self, lanes):
        """Move the topmost running sequences into the free lanes below them when a smaller bucket
        then holds them all (only the moved lanes' state is copied) -> the bucket of the next steps."""
        used = [i for i, s in enumerate(lanes) if s]
        n, top = len(used), used[-1] + 1
        if self._bucket(n) < self._bucket(top):
            holes = [j for j in range(n) if lanes[j] is None]
            movers = [i for i in used if i >= n]
            dst, src = (torch.tensor(x, device=self.device) for x in (holes, movers))
            for t in (self.tok, self.pos, self.n_gen, self.budget, self.u, self.running, self.tables,
                      self.out_tok, self.out_lp):
                t[dst] = t[src]
            self.running[src] = False
            for d in self.cache.dense or ():
                d[:, dst] = d[:, src]
            for j, i in zip(holes, movers):
                lanes[j], lanes[i] = lanes[i], None
                lanes[j].lane = j
            top = n
        return self._bucket(top)

    def _bucket(self, n):
        """The batch a step runs on for lanes [0, n): n itself eagerly (every step costs in
        proportion to its batch); with CUDA graphs a power of two (or max_batch), so that few are
        captured and the running sequences move seldom."""
        return min(1 << (n - 1).bit_length(), self.max_batch) if self.cuda_graphs else n


def _mix(x):
    """A multiply-xorshift hash of 32-bit words held in int64 (no product overflows)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x


def stream_key(seed, index):
    """The key of prompt `index`'s random stream under `seed` (int64 tensors)."""
    return _mix(_mix(seed & 0xFFFFFFFF) ^ (index & 0xFFFFFFFF))


def uniform(key, step):
    """One float64 in (0, 1) per element from stream keys and token indices (broadcast; 52 random
    bits from two hash words): the same numbers on every device and in every batch."""
    # The token index gets a hash of its own (shifted off zero, times an odd constant) before it
    # meets the key: hashed like the key, key ^ _mix(step) would be 0 wherever the prompt index XOR
    # the token index equals a value fixed by the seed (seed 0: token i of prompt i), a u near 0.
    t = _mix((step + 1) & 0xFFFFFFFF) * 0x2C1B3C6D & 0xFFFFFFFF
    h = _mix(key ^ t)
    lo = _mix(_mix(key ^ 0x9E3779B9) ^ t)    # a word that h does not determine: u has 52 random bits
    return (((h >> 6) * 2 ** 26 + (lo >> 6)).double() + 0.5) * 2.0 ** -52


def sample(logits, temperature, top_p, u, greedy=False):
    """logits [B, V], uniforms u [B] -> (tokens [B], logprobs [B]): the token whose CDF interval
    holds u. greedy: the argmax, and the log-prob of the untempered distribution. temperature may
    be a tensor (a CUDA graph reads its current value)."""
    if not greedy and top_p >= 1.0 and torch.is_tensor(temperature) and step_kernels.fused(logits, "sample"):
        return step_kernels.sample(logits, temperature, u)          # one kernel, no [B, V] temporaries
    logits = logits.float()
    if greedy:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    logp = torch.log_softmax(logits / temperature, -1)
    if top_p < 1.0:   # keep the smallest set of tokens whose mass reaches top_p, renormalised
        sorted_logp, order = logp.sort(-1, descending=True)
        cum = sorted_logp.exp().cumsum(-1)
        drop_sorted = cum - sorted_logp.exp() >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logp = torch.log_softmax(logp.masked_fill(drop, float("-inf")), -1)
    # summed in float64, so that a tail token's step of the CDF never rounds away; exp in float32 (half
    # the cost): its ~1e-7 relative error is that of the float32 log-probabilities themselves
    cdf = logp.exp().double().cumsum(-1)
    tok = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None])[:, 0].clamp(max=logits.shape[-1] - 1)
    return tok, logp.gather(-1, tok[:, None])[:, 0]


def blocks_that_fit(model, block_size=16, share=0.6):
    """KV-cache blocks (K and V of every layer) that `share` of the GPU's free memory holds, or None
    on the CPU. The rest of the free memory is the decode and prefill steps' working room."""
    p = next(model.parameters())
    if p.device.type != "cuda":
        return None
    c = model.cfg
    per_block = 2 * c.num_hidden_layers * block_size * c.num_key_value_heads * c.head_dim * p.element_size()
    # what the caching allocator holds but no tensor uses (the last update's) is free for the cache too
    free = torch.cuda.mem_get_info(p.device)[0] + torch.cuda.memory_reserved(p.device) - torch.cuda.memory_allocated(p.device)
    return int(free * share) // per_block


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
