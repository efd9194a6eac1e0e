"""sft.py: loss mask, packing equivalence, schedule, Bradley-Terry loss, a tiny run that learns."""
import math
import random

import pytest
import torch

import sft
from model import ModelConfig, Transformer, ValueModel
from sft import SFTConfig


def tiny(vocab=40, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))


def examples(n, vocab=40, seed=0, resp_len=None):
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(1, 7))],
             [rng.randrange(vocab) for _ in range(resp_len or rng.randint(1, 6))]) for _ in range(n)]


def batch_of(exs, rows, keep=None):
    return sft.collate(rows, [[(p + r, len(p), keep)] for p, r in exs])


def unpacked_loss(model, p, r):
    """Sum of -log p over the response tokens, the example alone in its row, full logits."""
    ids = torch.tensor([p + r])
    logp = torch.log_softmax(model(ids)[0].float(), -1)                 # [T, V]
    tgt = ids[0, 1:]
    return -logp[torch.arange(len(tgt)), tgt][len(p) - 1:].sum()


def test_packing_matches_unpacked():
    model = tiny()
    exs = examples(7, resp_len=4)                   # equal response lengths: token mean = example mean
    b = batch_of(exs, [[0, 1, 2], [3, 4], [5, 6]])
    assert b.n_loss == 7 * 4
    packed, _ = sft.sft_loss(model, b)
    per_example = torch.stack([unpacked_loss(model, p, r) / len(r) for p, r in exs])
    assert abs(packed.item() / b.n_loss - per_example.mean().item()) < 1e-5
    # unequal lengths: the packed token sum equals the sum of the unpacked token sums
    exs = examples(6, seed=1)
    b = batch_of(exs, [[0, 1, 2, 3], [4, 5]])
    packed, _ = sft.sft_loss(model, b)
    assert abs(packed.item() - sum(unpacked_loss(model, p, r).item() for p, r in exs)) < 1e-4


def test_packing_positions_and_mask():
    exs = [([1, 2], [3]), ([4], [5, 6])]
    b = batch_of(exs, [[0, 1]])
    assert b.pos[0].tolist() == [0, 1, 2, 0, 1, 2]
    assert b.docs == [3, 3]                                          # no padding: no pad segment
    b = batch_of(exs, [[0, 1], [0]])                                 # the second row is padded
    assert b.docs == [3, 3, 3, 3] and b.ids.shape == (2, 6) and b.n_tokens == 9
    b = batch_of(exs, [[0, 1]])
    assert b.targets[0].tolist() == [sft.IGNORE, 3, sft.IGNORE, 5, 6, sft.IGNORE]
    assert b.ends.tolist() == [2, 5]


def test_loss_mask():
    """Prompt tokens are context only: no prompt position is a target, the loss equals the one
    computed by hand over the response positions, the gradient at prompt positions is exactly zero,
    and changing a response token changes the loss."""
    model = tiny()
    p, r = [5, 6, 7, 8], [9, 10, 11]
    b = batch_of([(p, r)], [[0]])
    assert b.targets[0, :len(p) - 1].eq(sft.IGNORE).all() and b.n_loss == len(r)
    loss, _ = sft.sft_loss(model, batch_of([(p, r)], [[0]]))
    assert abs(loss.item() - unpacked_loss(model, p, r).item()) < 1e-5
    # the same sequence with everything as response gives a strictly larger loss (more terms)
    full, _ = sft.sft_loss(model, batch_of([([5], p[1:] + r)], [[0]]))
    assert full.item() > loss.item() + 1e-3
    # gradient check: the loss gradient w.r.t. the logits of prompt positions is zero
    h = model.hidden(torch.tensor([p + r])).detach().requires_grad_()
    sel = b.targets != sft.IGNORE
    lp = sft.logprobs.token_logprobs(h[sel], model.lm_head.weight, b.targets[sel])
    (-lp.sum()).backward()
    assert h.grad[0, :len(p) - 1].abs().sum() == 0 and h.grad[0, len(p) - 1:-1].abs().sum() > 0
    changed, _ = sft.sft_loss(model, batch_of([(p, [9, 10, 12])], [[0]]))
    assert abs(changed.item() - loss.item()) > 1e-4


def test_response_token_mask():
    """A per-response-token mask turns tokens into context: the loss is the hand-computed sum over the
    kept tokens only, and the masked token's value no longer matters."""
    model = tiny()
    p, r = [5, 6, 7, 8], [9, 10, 11, 12]
    keep = [True, False, False, True]
    b = batch_of([(p, r)], [[0]], keep)
    assert b.n_loss == 2 and b.targets[0].tolist()[len(p) - 1:] == [9, sft.IGNORE, sft.IGNORE, 12, sft.IGNORE]
    loss, _ = sft.sft_loss(model, b)
    ids = torch.tensor([p + r])
    logp = torch.log_softmax(model(ids)[0].float(), -1)
    want = -(logp[len(p) - 1, 9] + logp[len(p) + 2, 12])
    assert abs(loss.item() - want.item()) < 1e-5
    other, _ = sft.sft_loss(model, batch_of([(p, [9, 10, 3, 12])], [[0]], keep))   # a masked target changes
    assert abs(other.item() - loss.item()) > 1e-4                                   # (as context it still counts)
    assert sft.collate([[0]], [[(p + r, len(p), None)]]).n_loss == len(r)


def test_cosine_schedule():
    cfg = SFTConfig(lr=1.0, min_lr_ratio=0.1, warmup_frac=0.1)
    total = 101                                     # warm-up 10 steps, cosine over steps 10..100
    assert sft.lr_at(0, total, cfg) == pytest.approx(0.1)
    assert sft.lr_at(9, total, cfg) == pytest.approx(1.0)       # end of warm-up: peak
    assert sft.lr_at(10, total, cfg) == pytest.approx(1.0)
    assert sft.lr_at(55, total, cfg) == pytest.approx(0.55)     # halfway: (peak + min) / 2
    assert sft.lr_at(100, total, cfg) == pytest.approx(0.1)     # last step: the minimum
    no_warm = SFTConfig(lr=2.0, min_lr_ratio=0.0, warmup_frac=0.0)
    assert sft.lr_at(0, 3, no_warm) == pytest.approx(2.0) and sft.lr_at(2, 3, no_warm) == pytest.approx(0.0)


def test_bt_loss_values():
    rc, rr = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 0.0])
    # -log sigmoid(1) and -log sigmoid(-2), mean
    want = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(2.0))) / 2
    assert sft.bt_loss(rc, rr, margin=2.0).item() == pytest.approx(want, rel=1e-6)
    assert sft.bt_loss(torch.tensor([0.0]), torch.tensor([0.0]), margin=0.0).item() == pytest.approx(math.log(2))


def test_pack_respects_row_len_and_covers_everything():
    lengths = [random.Random(i).randint(1, 30) for i in range(200)]
    batches = sft.pack(lengths, 32, 128, random.Random(0))
    seen = [i for b in batches for row in b for i in row]
    assert sorted(seen) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 32 for b in batches for row in b)
    assert all(len(b) <= 4 for b in batches)


def test_sft_train_loss_decreases_and_accumulation():
    model = tiny()
    exs = [([1, 2, 3], [4 + i % 5, 10, 11, 2]) for i in range(40)]
    logs, mets = [], []
    cfg = SFTConfig(lr=1e-2, max_steps=30, batch_tokens=64, grad_accum=2, warmup_frac=0.1, log_every=10)
    m = sft.sft_train(model, exs, cfg, log=logs.append, on_metrics=mets.append)
    assert m["steps"] == 30 and len(m["losses"]) == 30
    assert m["loss"] < 0.6 * m["first_loss"]
    assert len(logs) == 3 and "loss" in logs[0] and "tok/s" in logs[0] and "eta" in logs[0]
    assert mets[-1]["step"] == 30


def test_epochs_plan():
    cfg = SFTConfig(epochs=1.5, batch_tokens=10, row_len=10)
    plan = sft._plan([5] * 20, 10, cfg, random.Random(0))   # 10 rows, 1 row per batch
    assert len(plan) == 15


def test_orm_train_separates_pairs():
    torch.manual_seed(0)
    pol = tiny()
    vm = ValueModel.from_policy(pol)
    pairs = [([1, 2, 3 + i % 3], [7, 8], [9, 9, 9]) for i in range(16)]
    cfg = SFTConfig(lr=3e-3, max_steps=25, batch_tokens=64, warmup_frac=0.0, log_every=25)
    m = sft.orm_train(vm, pairs, cfg, margin=1.0, log=lambda s: None)
    assert m["loss"] < m["first_loss"] and m["acc"] > 0.5   # acc: share of pairs ranked right, last window
    with torch.no_grad():
        rc = vm(torch.tensor([[1, 2, 3, 7, 8]]))[0, -1]
        rr = vm(torch.tensor([[1, 2, 3, 9, 9, 9]]))[0, -1]
    assert rc > rr
