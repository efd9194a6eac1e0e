"""checkpoint.py and the fault handling of sft.train_loop: round trips, keep-last-K, incomplete
checkpoints, unwritable directories, non-finite steps, and a run SIGKILLed mid-stage that resumes to
bitwise the same weights as an uninterrupted one.

This file is also the script of the crash test: `python tests/test_checkpoint.py MODE CKPT OUT`.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import sft  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
EXAMPLES = [([1 + i % 7, 2, 3], [4 + i % 11, 10 + i % 3, 2]) for i in range(24)]


def tiny(seed=0, tied=True):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**CFG.__dict__, "tie_word_embeddings": tied})
    return Transformer(cfg)


def adamw_after_steps(model, n=2):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    for _ in range(n):
        model(torch.tensor([[1, 2, 3, 4]])).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def draws(gen):
    return random.random(), torch.rand(3).tolist(), torch.randn(2, generator=gen).tolist()


def test_round_trip_weights_tie_optimizer_rng(tmp_path):
    model = tiny()
    opt = adamw_after_steps(model)
    gen = torch.Generator().manual_seed(7)
    path = checkpoint.save(tmp_path, "step-2", {"policy": model}, {"policy": opt}, {"step": 2, "note": "x"},
                           generators={"sampler": gen})
    want = draws(gen)                               # what comes next after the save
    stored = load_file(os.path.join(path, "policy.safetensors")).keys()
    assert ("lm_head.weight" in stored) != ("model.embed_tokens.weight" in stored)      # tied: stored once

    other = tiny(seed=1)
    other_opt = adamw_after_steps(other, 3)
    draws(gen)
    meta = checkpoint.load(path, {"policy": other}, {"policy": other_opt}, generators={"sampler": gen})
    assert meta == {"step": 2, "note": "x"}
    assert draws(gen) == want
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    assert other.lm_head.weight is other.model.embed_tokens.weight      # the tie holds
    assert other_opt.param_groups[0]["betas"] == (0.9, 0.95)
    # the next optimizer step is identical (moments and step counts restored)
    for m, o in ((model, opt), (other, other_opt)):
        m(torch.tensor([[5, 6]])).float().pow(2).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_load_errors_name_the_problem(tmp_path):
    model = tiny()
    path = checkpoint.save(tmp_path, "c", {"m": model}, {}, {})
    with pytest.raises(ValueError, match="Missing key.*weight"):       # an untied model needs both matrices
        checkpoint.load(path, {"m": tiny(tied=False)}, {})
    wider = Transformer(ModelConfig(**{**CFG.__dict__, "intermediate_size": 48}))
    with pytest.raises(ValueError, match="size mismatch for model.layers.0.mlp.down_proj.weight"):
        checkpoint.load(path, {"m": wider}, {})
    with open(os.path.join(path, "meta.json")) as f:
        rec = json.load(f)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({**rec, "world_size": 2}, f)
    with pytest.raises(ValueError, match="2 processes"):
        checkpoint.load(path, {"m": model}, {})


def test_keep_last_k_and_incomplete_checkpoints(tmp_path):
    model = tiny()
    for step in range(1, 5):
        checkpoint.save(tmp_path, f"step-{step}", {"m": model}, {}, {"step": step}, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["step-3", "step-4"]
    assert checkpoint.latest(tmp_path) == os.path.join(tmp_path, "step-4")
    # a crashed save (.tmp-*) and a directory without meta.json are never picked
    os.makedirs(tmp_path / ".tmp-step-9")
    os.makedirs(tmp_path / "step-8")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "step-8" / "m.safetensors"))
    assert checkpoint.latest(tmp_path) == os.path.join(tmp_path, "step-4")
    checkpoint.save(tmp_path, "step-5", {"m": model}, {}, {"step": 5}, keep=2)
    assert not os.path.exists(tmp_path / ".tmp-step-9")                  # cleaned by the next save
    assert checkpoint.latest(tmp_path) == os.path.join(tmp_path, "step-5")
    assert checkpoint.latest(tmp_path / "nothing-here") is None


def test_check_writable(tmp_path):
    checkpoint.check_writable(tmp_path / "new" / "dir", 1)
    assert os.listdir(tmp_path / "new" / "dir") == []                   # the probe is gone
    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "out"                                      # a file where a directory should be
    with pytest.raises(SystemExit, match=str(bad)):
        checkpoint.check_writable(bad)
    with pytest.raises(SystemExit, match="GiB free"):
        checkpoint.check_writable(tmp_path, 2**62)


def test_non_finite_steps_are_skipped_then_abort():
    calls = []

    def loss_nan_at(bad):
        def fn(model, batch):
            calls.append(1)
            loss, extra = sft.sft_loss(model, batch)
            return (loss * float("nan") if len(calls) in bad else loss), extra
        return fn

    units = [[(p + r, len(p), None)] for p, r in EXAMPLES]
    cfg = sft.SFTConfig(lr=1e-2, max_steps=4, batch_tokens=24, log_every=1, max_bad_steps=2)
    model, logs = tiny(), []
    m = sft.train_loop(model, units, cfg, loss_nan_at({2}), log=logs.append)
    assert m["skipped_steps"] == 1 and m["steps"] == 4
    assert any("step 2/4" in s and "WARNING" in s for s in logs)
    assert all(torch.isfinite(p).all() for p in model.parameters())

    calls.clear()
    model = tiny()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="2 non-finite steps in a row"):
        sft.train_loop(model, units, cfg, loss_nan_at({1, 2, 3, 4}), log=lambda s: None)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))   # no step was taken


def run_script(mode, ckpt, out):
    """Train the tiny model for 8 steps; mode "crash" SIGKILLs itself after step 5."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model = tiny()
    kill = lambda m: os.kill(os.getpid(), signal.SIGKILL) if m["step"] == 5 else None
    cfg = sft.SFTConfig(lr=1e-2, max_steps=8, batch_tokens=24, grad_accum=2, warmup_frac=0.25, log_every=1)
    m = sft.sft_train(model, EXAMPLES, cfg, log=lambda s: None, on_metrics=kill if mode == "crash" else None,
                      ckpt_dir=None if mode == "full" else ckpt, ckpt_every=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, out)
    print(json.dumps({"resumed_from": m["resumed_from"], "losses": m["losses"]}))


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    run = lambda mode, out: subprocess.run([sys.executable, os.path.abspath(__file__), mode, ckpt, str(tmp_path / out)],
                                           capture_output=True, text=True, timeout=120,
                                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    full = run("full", "full.safetensors")
    assert full.returncode == 0, full.stderr
    crashed = run("crash", "never.safetensors")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert checkpoint.latest(ckpt).endswith("step-00000004") and not os.path.exists(tmp_path / "never.safetensors")
    shutil.copytree(ckpt, tmp_path / "ckpt-truncated")
    resumed = run("resume", "resumed.safetensors")
    assert resumed.returncode == 0, resumed.stderr
    r, f = json.loads(resumed.stdout), json.loads(full.stdout)
    assert r["resumed_from"] == 4 and r["losses"] == f["losses"]
    a, b = load_file(tmp_path / "full.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(os.listdir(ckpt)) == ["step-00000006", "step-00000008"]   # keep=2
    # the newest checkpoint's weights cut short (a disk that filled up): resume from the one before,
    # still to bitwise the same end
    ckpt = str(tmp_path / "ckpt-truncated")
    newest = os.path.join(ckpt, "step-00000004", "model.safetensors")
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    resumed = run("resume", "fallback.safetensors")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_from"] == 2
    b = load_file(tmp_path / "fallback.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)




def test_resume_falls_back_only_past_checkpoints_that_fail_to_load(tmp_path):
    """Each broken checkpoint is named in one line and the next older one tried; none loading, or a
    checkpoint of another stage, is an error, not a silent fresh start."""
    model, root = tiny(), str(tmp_path)
    for step in (1, 2, 3):
        checkpoint.save(root, f"step-{step}", {"m": model}, {}, {"stage": "t", "step": step, "steps": 9}, keep=0)
    for step in (2, 3):
        with open(os.path.join(root, f"step-{step}", "m.safetensors"), "r+b") as f:
            f.truncate(100)
    logs = []
    assert checkpoint.resume(root, {"m": tiny(seed=1)}, {}, "t", 9, log=logs.append)["step"] == 1
    assert len(logs) == 3 and all("cannot resume from" in l and "\n" not in l for l in logs[:2]), logs
    assert "step-3" in logs[0] and "step-2" in logs[1] and "resumed from" in logs[2]
    with open(os.path.join(root, "step-1", "m.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(SystemExit, match="none of the 3 checkpoints under .* loads"):
        checkpoint.resume(root, {"m": tiny()}, {}, "t", 9, log=lambda s: None)
    with pytest.raises(SystemExit, match="checkpoint of stage 't' with 9 steps, but this run is 'u'"):
        checkpoint.resume(root, {"m": tiny()}, {}, "u", 9, log=lambda s: None)
    assert checkpoint.resume(str(tmp_path / "none"), {"m": tiny()}, {}, "t", 9) is None


def test_progress_refuses_to_lose_an_unfinished_run(tmp_path):
    """A fresh run into a directory whose run did not finish is refused (it would delete the
    checkpoints), naming --resume and --overwrite; --overwrite deletes them; a finished run may be
    followed by a fresh one."""
    out = str(tmp_path)
    sig = {"seed": 0}
    progress = checkpoint.begin_run(out, ["pretrain", "sft"], sig, resume=False)
    checkpoint.stage_start(out, progress, "pretrain")
    checkpoint.stage_done(out, progress, "pretrain")
    checkpoint.stage_start(out, progress, "sft")
    os.makedirs(os.path.join(out, "ckpt", "sft", "sft", "step-1"))
    with pytest.raises(SystemExit, match="unfinished run \\(stages pretrain,sft, done: pretrain, stopped in: sft\\): "
                                         "--resume=true goes on with it, --overwrite=true starts over"):
        checkpoint.begin_run(out, ["sft"], sig, resume=False)
    assert os.path.isdir(os.path.join(out, "ckpt", "sft", "sft", "step-1"))
    assert checkpoint.begin_run(out, ["pretrain", "sft"], sig, resume=True)["done"] == ["pretrain"]
    assert os.path.isdir(os.path.join(out, "ckpt", "sft", "sft", "step-1"))
    progress = checkpoint.begin_run(out, ["sft"], sig, resume=False, overwrite=True)
    assert not os.path.exists(os.path.join(out, "ckpt")) and progress["done"] == []
    checkpoint.stage_start(out, progress, "sft")
    checkpoint.stage_done(out, progress, "sft")
    checkpoint.end_run(out, progress)
    assert checkpoint.unfinished(out) is None
    checkpoint.begin_run(out, ["sft"], sig, resume=False)          # after a finished run: fine
    # a directory from before progress.json said "finished": its checkpoints decide
    os.remove(os.path.join(out, "progress.json"))
    os.makedirs(os.path.join(out, "ckpt", "rl"))
    assert checkpoint.unfinished(out) == f"checkpoints of stage rl in {os.path.join(out, 'ckpt')}"


def test_resume_reads_progress_written_under_old_option_names(tmp_path):
    """A run recorded with an option's old name resumes under the new one, and an option the
    earlier run did not have yet is not compared; a real difference is still refused."""
    out = str(tmp_path)
    progress = checkpoint.begin_run(out, ["pretrain"], {"rl_samples": 1, "seed": 0}, resume=False)
    checkpoint.stage_done(out, progress, "pretrain")
    renamed = {"rl_samples": "rl_group"}
    assert checkpoint.begin_run(out, ["rl"], {"rl_group": 1, "seed": 0, "new_option": 3}, True,
                                renamed=renamed)["done"] == ["pretrain"]
    with pytest.raises(SystemExit, match="--rl_group=1 \\(now 2\\)"):
        checkpoint.begin_run(out, ["rl"], {"rl_group": 2, "seed": 0}, True, renamed=renamed)


def test_provenance_marks_outputs_made_from_a_remade_input(tmp_path):
    """stale: an output whose input was remade since, and everything made from it, is stale; an
    output without provenance, or an input without an id (a user's model, an old output, one not
    given), is not judged."""
    d = {n: str(tmp_path / n) for n in ("base", "tuned", "rl", "distilled", "rl2")}
    for n in d.values():
        os.makedirs(n)
    ids = lambda *names: {n: checkpoint.output_id(d[n]) for n in names}
    checkpoint.write_provenance(d["base"], "pretrain", {})
    checkpoint.write_provenance(d["tuned"], "sft", ids("base"))
    checkpoint.write_provenance(d["rl"], "rl", ids("tuned"))
    checkpoint.write_provenance(d["distilled"], "distill", ids("rl", "base"))
    checkpoint.write_provenance(d["rl2"], "rl2", {**ids("distilled", "rl"), "elsewhere": "x", "user_model": None})
    assert checkpoint.stale(d) == {}
    checkpoint.write_provenance(d["rl"], "rl", ids("tuned"))         # rl ran again
    assert checkpoint.stale(d) == {"distilled": ["rl"], "rl2": ["distilled", "rl"]}
    os.remove(os.path.join(d["distilled"], "provenance.json"))       # not judged, nor judged by; rl2 still is
    assert checkpoint.stale(d) == {"rl2": ["rl"]}
    assert checkpoint.output_id(d["distilled"]) is None and checkpoint.output_id(str(tmp_path / "none")) is None


if __name__ == "__main__":
    run_script(*sys.argv[1:])
