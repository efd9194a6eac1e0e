"""--dtype: bf16 compute over fp32 master weights in every training forward (SFT, the ORM, PPO's
rollouts, rewards, critic and update), the same path on CPU as on CUDA."""
import json
import os

import pytest
import torch

import logprobs
import sft
import train
from model import autocast, compute_dtype
from sft import SFTConfig
from test_sft import examples, tiny
from test_train import TINY, pretrain_and_fake_format_tuned


@pytest.fixture
def head_dtypes(monkeypatch):
    """The dtypes the fused log-prob head computes in, call by call."""
    seen, real = [], logprobs._token_logprobs

    def spy(hidden, weight, *a):
        seen.append((hidden.dtype, weight.dtype))
        return real(hidden, weight, *a)
    monkeypatch.setattr(logprobs, "_token_logprobs", spy)
    return seen


def test_compute_dtype_option():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compute_dtype("auto", cpu) == torch.float32 and compute_dtype("auto", cuda) == torch.bfloat16
    assert compute_dtype("bfloat16", cpu) == torch.bfloat16 and compute_dtype("float32", cuda) == torch.float32


def test_bf16_sft_runs_the_head_in_bf16_and_keeps_fp32_weights(head_dtypes):
    exs = examples(32, seed=1)
    runs = {}
    for dt in (torch.float32, torch.bfloat16):
        head_dtypes.clear()
        model = tiny(seed=3)
        m = sft.sft_train(model, exs, SFTConfig(lr=3e-3, epochs=4, batch_tokens=128, dtype=dt, log_every=100),
                          log=lambda s: None)
        runs[dt] = m
        assert set(head_dtypes) == {(dt, dt)}                      # hidden states and head weight alike
        assert all(p.dtype == torch.float32 for p in model.parameters())
    fp32, bf16 = runs[torch.float32], runs[torch.bfloat16]
    assert bf16["first_loss"] == pytest.approx(fp32["first_loss"], rel=0.02)   # the same model, rounded
    assert bf16["loss"] == pytest.approx(fp32["loss"], rel=0.02) and bf16["loss"] < bf16["first_loss"]


def test_bf16_forward_is_the_fp32_one_rounded():
    model = tiny(seed=5)
    ids = torch.randint(0, 40, (3, 17))
    ref = model(ids)
    with autocast(torch.device("cpu"), torch.bfloat16):
        low = model(ids)
    assert low.dtype == torch.bfloat16
    assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()
    with autocast(torch.device("cpu"), torch.float32):               # fp32: no autocast at all
        assert model(ids).equal(ref)


def test_bf16_rl_stages(tmp_path, head_dtypes):
    """orm and rl with --dtype=bfloat16 on CPU: every log-prob head call (old log-probs, update)
    computes in bf16, and the saved policy and critic keep fp32 weights."""
    out = str(tmp_path)
    small = TINY + ["--rae_questions=4", "--rae_group=2", "--rl_batch=4", "--minibatch_size=2", "--micro_batch=1",
                    "--rl_max_new_tokens=8", "--rl_steps=2"]
    pretrain_and_fake_format_tuned(out, small)
    head_dtypes.clear()
    train.main([f"--out={out}", "--stages=orm,rl", "--dtype=bfloat16"] + small)
    assert head_dtypes and set(head_dtypes) == {(torch.bfloat16, torch.bfloat16)}
    for d in ("rl_round1", "rl_round1/critic"):
        assert json.load(open(os.path.join(out, d, "config.json")))["torch_dtype"] == "float32"
    steps = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"rl_round1"' in l and '"step"' in l]
    assert [m["step"] for m in steps] == [1, 2]
    assert steps[0]["clipfrac"] == 0.0 and abs(steps[0]["kl"]) < 1e-6    # old log-probs in the update's precision
