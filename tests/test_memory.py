"""Training without [T, T] attention masks (per-document attention of packed rows) and with activation
checkpointing (--act_ckpt): the numbers of the dense reference, with less kept for backward."""
import torch
import torch.nn.functional as F

import logprobs
import ppo
import sft
from model import ValueModel, Transformer, doc_attention, repeat_kv
from test_ppo_update import CFG, rollouts
from test_sft import batch_of, examples, tiny


def dense_mask(docs, B, T):
    """The reference of doc_attention: bool [B, 1, T, T], True = attend, causal within each segment."""
    seg = torch.repeat_interleave(torch.arange(len(docs)), torch.tensor(docs)).view(B, T)
    return ((seg[:, :, None] == seg[:, None, :]) & torch.ones(T, T, dtype=torch.bool).tril())[:, None]


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_doc_attention_matches_the_dense_mask():
    """Rows of 4, 5 and 4 segments (the middle one ends in a pad tail), GQA: outputs and the
    gradients of q, k and v equal dense-masked SDPA's."""
    torch.manual_seed(0)
    B, T, heads, kv, hd = 3, 40, 4, 2, 16
    docs = [7, 13, 9, 11, 5, 5, 20, 6, 4, 12, 3, 17, 8]
    q = torch.randn(B, T, heads, hd, requires_grad=True)
    k, v = (torch.randn(B, T, kv, hd, requires_grad=True) for _ in range(2))
    y = doc_attention(q, k, v, docs)
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=dense_mask(docs, B, T), enable_gqa=True).transpose(1, 2)
    dy = torch.randn_like(y)
    for a, b in zip((y, *torch.autograd.grad(y, (q, k, v), dy)), (ref, *torch.autograd.grad(ref, (q, k, v), dy))):
        assert rel_err(a, b) <= 1e-6


def test_repeat_kv_is_repeat_interleave():
    k = torch.randn(2, 3, 5, 4)
    assert torch.equal(repeat_kv(k, 4), k.repeat_interleave(4, dim=-3))


def test_sft_and_orm_steps_match_the_dense_mask():
    """sft_loss and orm_loss over packed rows of 3 to 5 documents (two rows padded): loss and
    gradients as with the [B, 1, T, T] block-diagonal mask sft.collate used to build."""
    model = tiny()
    exs = examples(12, seed=2)
    b = batch_of(exs, [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9, 10, 11]])
    assert len(b.docs) == len(exs) + 2                                             # two pad tails
    mask = dense_mask(b.docs, *b.ids.shape)
    loss, _ = sft.sft_loss(model, b)
    loss.backward()
    g = grads(model)
    model.zero_grad()
    h = model.hidden(b.ids, b.pos, mask)
    sel = b.targets != sft.IGNORE
    ref = -logprobs.token_logprobs(h[sel], model.lm_head.weight, b.targets[sel]).sum()
    ref.backward()
    assert rel_err(loss.detach(), ref.detach()) <= 1e-5 and rel_err(g, grads(model)) <= 1e-5

    vm = ValueModel.from_policy(model)
    torch.nn.init.normal_(vm.score.weight)
    units = [[(p + c, len(p), None), (p + r, len(p), None)] for (p, c), (_, r) in zip(exs[0::2], exs[1::2])]
    b = sft.collate([[0, 1], [2, 3, 4], [5]], units)
    loss, _ = sft.orm_loss(vm, b, 2.0)
    loss.backward()
    g = grads(vm)
    vm.zero_grad()
    r = vm(b.ids, b.pos, dense_mask(b.docs, *b.ids.shape)).flatten()[b.ends].view(-1, 2)
    ref = sft.bt_loss(r[:, 0], r[:, 1], 2.0) * r.shape[0]
    ref.backward()
    assert rel_err(loss.detach(), ref.detach()) <= 1e-5 and rel_err(g, grads(vm)) <= 1e-5


def sft_grads(act_ckpt, train=True):
    """(gradients of one packed SFT loss, bytes autograd saved for backward)."""
    model = tiny()
    model.model.act_ckpt = act_ckpt
    model.train(train)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = sft.sft_loss(model, batch_of(examples(12, seed=3), [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]))
    loss.backward()
    return grads(model), sum(saved)


def test_act_ckpt_same_gradients_less_saved():
    """Checkpointing each block changes no gradient bit (CPU, fp32) and keeps far less for backward;
    out of training mode it never applies."""
    g0, plain = sft_grads(False)
    g1, ckpt = sft_grads(True)
    assert torch.equal(g0, g1)
    assert ckpt < plain / 3, (ckpt, plain)
    assert sft_grads(True, train=False)[1] == sft_grads(False, train=False)[1]


def ppo_grads(act_ckpt):
    torch.manual_seed(0)
    m = Transformer(CFG)
    m.model.act_ckpt = act_ckpt
    r, _, _ = rollouts(seed=1, B=8)
    with torch.no_grad():      # no grad: no checkpoint either
        r.old_logp = ppo.response_logprobs(m, r) + 0.1 * torch.randn_like(r.mask) * r.mask
    loss, _ = ppo.policy_loss(ppo.response_logprobs(m, r), r.old_logp, torch.randn_like(r.mask) * r.mask, r.mask)
    loss.backward()
    return grads(m)


def test_act_ckpt_ppo_policy_loss_same_gradients():
    assert torch.equal(ppo_grads(False), ppo_grads(True))
