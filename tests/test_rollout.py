"""The paged sampler against transformers' generate and against a full no-cache forward."""
import pytest
import torch

from model import Transformer
from rollout import Sampler, sample, stream_key, uniform

transformers = pytest.importorskip("transformers")
VOCAB = 97


@pytest.fixture(params=["dense", "paged"])
def dense(request, monkeypatch):
    """Every sampler test runs with both decode paths: contiguous per-slot K/V (CPU's default) and the
    paged blocks (CUDA's, through the kernels' torch references here)."""
    real = Sampler.__init__
    monkeypatch.setattr(Sampler, "__init__", lambda self, *a, **k: real(self, *a, **{"dense": request.param == "dense", **k}))
    return request.param


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    hf.save_pretrained(path)
    return hf, Transformer.from_pretrained(path).eval()


def ragged_prompts(n, seed=1, lo=1, hi=40):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (k,), generator=g).tolist() for k in lens]


def test_greedy_matches_transformers_on_ragged_batch(models, dense):
    hf, ours = models
    prompts = ragged_prompts(6)
    outs = Sampler(ours, max_batch=8, block_size=8).generate(prompts, max_new_tokens=16, temperature=0)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])   # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    for o, r in zip(outs, ref[:, width:].tolist()):
        assert o.tokens == r and o.finish_reason == "length"


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8), (0, 1.0)])
def test_logprobs_equal_full_forward(models, temperature, top_p, dense):
    _, ours = models
    prompts = ragged_prompts(5, seed=2)
    prompts += [prompts[1]] * 3    # samples of one prompt share its cache blocks
    outs = Sampler(ours, max_batch=4, block_size=4).generate(prompts, 12, temperature=temperature,
                                                            top_p=top_p, seed=3)
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            logits = ours(torch.tensor([p + o.tokens]))[0, len(p) - 1:-1]
        logp = torch.log_softmax(logits / (temperature or 1.0), -1)
        if top_p < 1.0:   # the nucleus the token was drawn from, renormalised
            srt, order = logp.sort(-1, descending=True)
            drop = (srt.exp().cumsum(-1) - srt.exp()) >= top_p
            logp = torch.log_softmax(logp.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -torch.inf), -1)
        ref = logp.gather(-1, torch.tensor(o.tokens)[:, None])[:, 0]
        assert torch.allclose(ref, torch.tensor(o.logprobs), atol=1e-4)
        if temperature == 0:
            assert o.tokens == logits.argmax(-1).tolist()


def test_continuous_batching_with_few_blocks_matches_one_at_a_time(models, dense):
    _, ours = models
    prompts = ragged_prompts(9, seed=4) + [list(range(33))] * 2
    alone = [Sampler(ours, max_batch=1, block_size=8).generate([p], 10, temperature=0)[0].tokens for p in prompts]
    # 2 slots and just enough blocks for two sequences: every slot is reused several times
    small = Sampler(ours, max_batch=2, block_size=8, max_seq_len=64, num_blocks=12)
    outs = small.generate(prompts, 10, temperature=0)
    assert [o.tokens for o in outs] == alone
    assert sorted(small.free) == list(range(12)) and all(r == 0 for r in small.refs)   # all blocks returned
    for few in (0, 7):                     # no room for one sequence (0: a GPU with no free memory)
        with pytest.raises(ValueError, match="needs 8"):
            Sampler(ours, max_batch=2, block_size=8, max_seq_len=64, num_blocks=few)


def test_stop_ids_max_new_tokens_and_seeds(models, dense):
    _, ours = models
    prompts = ragged_prompts(4, seed=5)
    s = Sampler(ours, max_batch=4, block_size=8)
    free = s.generate(prompts, 20, temperature=1.0, seed=7)
    assert all(len(o.tokens) == 20 and o.finish_reason == "length" for o in free)
    stop = free[0].tokens[5]
    outs = s.generate(prompts, 20, temperature=1.0, seed=7, stop_ids=[stop])
    first = free[0].tokens.index(stop)
    assert outs[0].tokens == free[0].tokens[:first + 1] and outs[0].finished
    for o in outs:
        assert (o.finished and o.tokens[-1] == stop and stop not in o.tokens[:-1]) or \
               (len(o.tokens) == 20 and stop not in o.tokens)
    again = s.generate(prompts, 20, temperature=1.0, seed=7)
    other = s.generate(prompts, 20, temperature=1.0, seed=8)
    assert [o.tokens for o in again] == [o.tokens for o in free]
    assert [o.tokens for o in other] != [o.tokens for o in free]
    per_prompt = s.generate(prompts, [3, 5, 1, 7], temperature=1.0, seed=7)
    assert [len(o.tokens) for o in per_prompt] == [3, 5, 1, 7]
    with pytest.raises(ValueError, match="max_seq_len"):
        s.generate([[1] * 10], max_new_tokens=10_000)
    with pytest.raises(ValueError, match="empty"):
        s.generate([[]], max_new_tokens=3)


def test_each_token_is_the_draw_of_its_uniform(models, dense):
    # mixed budgets and more prompts than lanes: sequences end at different steps, lanes are refilled
    # and compacted, and token n of prompt i is still the draw at uniform(key of i, n) from the
    # distribution of a full forward
    _, ours = models
    prompts, budgets = ragged_prompts(7, seed=9), [2, 15, 1, 9, 20, 3, 12]
    outs = Sampler(ours, max_batch=4, block_size=4).generate(prompts, budgets, temperature=1.3, seed=11)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        assert len(o.tokens) == budgets[i]
        with torch.no_grad():
            logits = ours(torch.tensor([p + o.tokens]))[0, len(p) - 1:-1]
        u = uniform(stream_key(torch.tensor([11]), torch.tensor([i])), torch.arange(len(o.tokens)))
        assert sample(logits, 1.3, 1.0, u)[0].tolist() == o.tokens


def expected_probs(logits, temperature, top_p):
    p = torch.softmax(logits / temperature, -1)
    srt, order = p.sort(descending=True)
    keep = (srt.cumsum(0) - srt) < top_p
    q = torch.zeros_like(p)
    q[order[keep]] = srt[keep]
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.5, 1.0), (2.0, 1.0), (1.0, 0.7), (0.8, 0.5)])
def test_sampling_frequencies(temperature, top_p):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    n = 40_000
    u = uniform(stream_key(torch.tensor([0]), torch.arange(n)), torch.zeros(n, dtype=torch.long))
    tok, logp = sample(logits.expand(n, -1), temperature, top_p, u)
    freq = torch.bincount(tok, minlength=6).float() / n
    want = expected_probs(logits, temperature, top_p)
    assert (freq - want).abs().max() < 0.01          # ~4 standard errors at n = 40k
    assert torch.all(freq[want == 0] == 0)            # outside the nucleus: never drawn
    assert torch.allclose(logp, want[tok].log(), atol=1e-5)


def test_sampler_frequencies_end_to_end(models):
    _, ours = models
    prompt = ragged_prompts(1, seed=6)[0]
    with torch.no_grad():
        logits = ours(torch.tensor([prompt]))[0, -1]
    outs = Sampler(ours, max_batch=512, block_size=8).generate([prompt] * 4000, 1, temperature=1.5, seed=0)
    freq = torch.bincount(torch.tensor([o.tokens[0] for o in outs]), minlength=VOCAB).float() / 4000
    want = torch.softmax(logits / 1.5, -1)
    assert 0.5 * (freq - want).abs().sum() < 0.08     # total variation over 97 tokens


def test_a_large_prefill_keeps_the_rotary_table(models, dense):
    """Prompts packed into one prefill can outnumber the model's positions: the table a captured
    decode step reads must stay the same tensor."""
    _, ours = models
    s = Sampler(ours, max_batch=8, block_size=8, max_seq_len=100)
    key = (torch.device("cpu"), torch.float32)
    table = ours.model._rope[key][0]
    prompts = ragged_prompts(8, seed=9, lo=60, hi=80)          # ~560 tokens against 256 positions
    assert sum(map(len, prompts)) > ours.cfg.max_position_embeddings
    s.generate(prompts, 4, temperature=0)
    assert ours.model._rope[key][0] is table


@pytest.mark.parametrize("seed", [0, 1, 7919, 2 ** 32 - 1])
def test_uniforms_look_uniform_over_prompts_and_tokens(seed):
    # u[prompt, token] of one call: the whole grid, its diagonal and a row and a column each pass a
    # Kolmogorov-Smirnov test against U(0, 1) (~0.1% level), no prompt's draws mirror another's, and
    # next to no value repeats (a hash that vanished on the diagonal repeated one value 256 times)
    n = 256
    u = uniform(stream_key(torch.tensor([seed]), torch.arange(n))[:, None], torch.arange(n))
    for x in (u.flatten(), u.diagonal(), u[:, 0], u[0], u[:, n - 1]):
        x = x.sort().values
        ecdf = torch.arange(1, len(x) + 1, dtype=torch.float64) / len(x)
        assert (x - ecdf).abs().max() < 1.95 / len(x) ** 0.5 + 1 / len(x)
    assert not torch.equal(u, u.T)
    assert n * n - len(set(u.flatten().tolist())) <= 8


def test_uniforms_have_more_than_32_random_bits():
    # 2^20 draws: ~128 pairs would repeat if u were a function of one 32-bit hash, ~0 with 52 bits
    u = uniform(stream_key(torch.tensor([5]), torch.arange(1024))[:, None], torch.arange(1024))
    assert u.numel() - u.unique().numel() <= 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bench.py gpu runs it)")
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_on_cuda_greedy_matches_transformers_and_logprobs_a_full_forward(models, cuda_graphs):
    """The CUDA path whole: paged Triton kernels, the fused forward, CUDA graphs (fp32, IEEE)."""
    import copy
    hf, ours = (copy.deepcopy(m).cuda() for m in models)
    prompts = ragged_prompts(6)
    prompts += [prompts[1]] * 2
    sampler = Sampler(ours, max_batch=4, block_size=8, cuda_graphs=cuda_graphs)
    outs = sampler.generate(prompts, max_new_tokens=16, temperature=0)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    for o, r in zip(outs, ref[:, width:].tolist()):
        assert o.tokens == r
    for p, o in zip(prompts, sampler.generate(prompts, 12, temperature=1.0, seed=3)):
        with torch.no_grad():
            logits = ours(torch.tensor([p + o.tokens], device="cuda"))[0, len(p) - 1:-1]
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(o.tokens, device="cuda")[:, None])[:, 0]
        assert torch.allclose(ref.cpu(), torch.tensor(o.logprobs), atol=1e-4)
