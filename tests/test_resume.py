"""train.py survives a crash: a run SIGKILLed in the middle of a stage and resumed with --resume
ends with weights bitwise equal to an uninterrupted run, even after the crashed run was evaluated;
a finished stage is not redone; a fresh run into it, or resuming with other options, is refused;
configs that cannot work are refused before any work."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

import rl
import config
import train
from test_train import TINY, pretrain_and_fake_format_tuned

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RL = TINY + ["--rae_questions=4", "--rae_group=2", "--rl_batch=4", "--minibatch_size=2", "--micro_batch=1",
             "--rl_max_new_tokens=8", "--rl_steps=12", "--rl_ckpt_every=1", "--ckpt_every=1", "--min_free_gb=0"]


def launch(out, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    return subprocess.Popen([sys.executable, "train.py", f"--out={out}", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(p):
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    return out


def rl_steps_logged(out):
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    with open(path) as f:
        lines = [json.loads(l) for l in f if l.strip().endswith("}")]
    return max([l["step"] for l in lines if l.get("stage") == "rl_round1" and "reward" in l] or [0])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny base model and a 'format-tuned' copy of it with the COAT tokens."""
    out = str(tmp_path_factory.mktemp("prep"))
    pretrain_and_fake_format_tuned(out, RL)
    return out


def copy_models(src, dst):
    for d in ("base", "format_tuned"):
        shutil.copytree(os.path.join(src, d), os.path.join(dst, d))


def test_sigkill_mid_rl_then_resume_is_bitwise(prepared, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    copy_models(prepared, a)
    copy_models(prepared, b)
    finish(launch(a, "--stages=orm,rl", *RL))                  # uninterrupted

    p = launch(b, "--stages=orm,rl", *RL)
    t0 = time.time()
    while rl_steps_logged(b) < 3:                               # kill it in the middle of RL
        assert p.poll() is None, p.stdout.read()
        assert time.time() - t0 < 240, "the run never reached RL step 3"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(b, "rl_round1"))    # the stage did not finish
    ckpts = os.listdir(os.path.join(b, "ckpt", "rl", "rl_round1"))
    assert any(c.startswith("step-") for c in ckpts)
    progress = json.load(open(os.path.join(b, "progress.json")))
    assert progress["done"] == ["orm"] and progress["current"] == "rl" and progress["finished"] is False

    # evaluating the crashed run only reads it; a fresh run into it is refused, naming the way on
    train.main([f"--out={b}", "--stages=eval"] + RL)
    assert json.load(open(os.path.join(b, "progress.json"))) == progress
    assert os.listdir(os.path.join(b, "ckpt", "rl", "rl_round1")) == ckpts
    with pytest.raises(SystemExit, match="unfinished run \\(stages orm,rl, done: orm, stopped in: rl\\): "
                                         "--resume=true goes on with it"):
        train.main([f"--out={b}", "--stages=rl"] + RL)
    assert os.listdir(os.path.join(b, "ckpt", "rl", "rl_round1")) == ckpts

    log = finish(launch(b, "--stages=orm,rl", "--resume=true", *RL))
    assert "stage orm: done in an earlier run" in log and "rl_round1: resumed from" in log
    wa = load_file(os.path.join(a, "rl_round1", "model.safetensors"))
    wb = load_file(os.path.join(b, "rl_round1", "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert wa[k].equal(wb[k]), k
    assert not os.path.exists(os.path.join(b, "ckpt", "rl"))   # a finished stage keeps only its output

    # resuming with other options is refused, naming them
    with pytest.raises(SystemExit, match="--rl_steps=12 \\(now 13\\)"):
        train.main([f"--out={b}", "--stages=orm,rl", "--resume=true"] + RL + ["--rl_steps=13"])


def test_configs_that_cannot_work_are_refused(tmp_path):
    out = str(tmp_path)
    bad = [(["--algo=sgd"], "--algo=sgd"),
           (["--algo=grpo", "--grpo_group=3", "--stages=rl"], "--rl_batch=64 must be a multiple of --grpo_group"),
           (["--minibatch_size=48"], "--minibatch_size=48 must divide --rl_batch=64"),
           (["--rl_max_new_tokens=600"], "max_position_embeddings=1024"),
           (["--rlsp_schedule=cosine"], "--rlsp_schedule=cosine"),
           (["--rae_mix=1.5"], "--rae_mix=1.5: expected a number in \\[0, 1\\]"),
           (["--distill_keep=0"], "--distill_keep=0.0: expected a number in \\(0, 1\\]"),
           (["--eval_batch=0"], "--eval_batch=0: expected an integer >= 1"),
           (["--n_rl=-1"], "--n_rl=-1: expected an integer >= 0"),
           (["--algo=dapo", "--dapo_overlong_buffer=128"], "--dapo_overlong_buffer=128: expected less than")]
    for args, msg in bad:
        with pytest.raises(SystemExit, match=msg):
            train.main([f"--out={out}", "--stages=eval"] + args)    # a later --stages wins
    assert not os.listdir(out)                                      # nothing ran
    # a user's model whose tokenizer has more tokens than its embedding
    from model import ModelConfig, Transformer
    from tokenizer import build_task_tokenizer
    tok = build_task_tokenizer(["Step 1: 1 + 1 = 2."] * 3, vocab_size=300)
    Transformer(ModelConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1)).save_pretrained(str(tmp_path / "m"))
    tok.save_pretrained(str(tmp_path / "m"))
    with pytest.raises(SystemExit, match="the tokenizer has .* tokens, the model's embedding 100 rows"):
        train.main([f"--out={out}", "--stages=eval", f"--model={tmp_path / 'm'}"])


def test_unwritable_out_is_refused(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(SystemExit, match="not writable"):
        train.main([f"--out={tmp_path / 'file' / 'run'}", "--stages=eval"])
    with pytest.raises(SystemExit, match="GiB free, at least"):
        train.main([f"--out={tmp_path / 'run'}", "--stages=eval", "--min_free_gb=1e9"])


def test_torchrun_two_processes_run_the_stages(prepared, tmp_path):
    """sft -> orm -> rl (PPO and GRPO) -> eval in 2 CPU processes (gloo): every stage finishes, rank 0
    alone writes, and the sharded evaluation covers every test problem once."""
    out = str(tmp_path / "run")
    copy_models(prepared, out)
    from test_train import BAD2, C, E, P, R, S1, S2, S3
    demo = f"{S1}\n{C}{BAD2}\n{R}Let me check step 2.\n{E}{S2}\n{C}{S3}\n{C}The answer is \\boxed{{196}}.<|im_end|>"
    os.makedirs(os.path.join(out, "synthesize"))
    with open(os.path.join(out, "synthesize", "demos.jsonl"), "w") as f:
        f.write(json.dumps({"question": P["question"], "answer": P["answer"], "response": demo}) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")    # gloo on the CPU, GPU or not
    run = lambda *a: subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                     "train.py", f"--out={out}", *a, *RL], cwd=ROOT, env=env, capture_output=True,
                                    text=True, timeout=300)
    p = run("--stages=sft,orm,rl,eval")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 processes" in p.stdout and p.stdout.count("stage rl done") == 1     # rank 0 alone prints
    res = json.load(open(os.path.join(out, "results.json")))
    assert [r["name"] for r in res["stages"]] == ["base", "format_tuned", "rl_round1"]
    assert all(r["n"] == 4 for r in res["stages"])
    steps = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"rl_round1"' in l and '"reward"' in l]
    assert [s["step"] for s in steps] == list(range(1, 13))
    p = run("--stages=rl,eval", "--algo=grpo", "--grpo_group=2")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def test_checkpoints_of_an_old_run_are_kept_and_stage_swap_recovers(prepared, tmp_path):
    """A directory with checkpoints but no record of its run finishing (a run of an older version
    that died) is unfinished: eval leaves it alone, a fresh run is refused, --resume keeps the
    checkpoints and --overwrite deletes them. A crash between save_stage's two renames leaves
    <stage>.old, which load_stage puts back."""
    out = str(tmp_path / "run")
    copy_models(prepared, out)
    marker = os.path.join(out, "ckpt", "rl", "rl_round1", "keep")
    os.makedirs(os.path.dirname(marker))
    open(marker, "w").close()
    train.main([f"--out={out}", "--stages=eval"] + RL)
    assert os.path.exists(marker) and not os.path.exists(os.path.join(out, "progress.json"))
    with pytest.raises(SystemExit, match="holds an unfinished run \\(checkpoints of stage rl in .*--resume=true"):
        train.main([f"--out={out}", "--stages=orm"] + RL)
    train.main([f"--out={out}", "--stages=orm", "--resume"] + RL)
    assert os.path.exists(marker)
    train.main([f"--out={out}", "--stages=orm", "--overwrite"] + RL)
    assert not os.path.exists(marker)
    os.replace(os.path.join(out, "format_tuned"), os.path.join(out, "format_tuned.old"))
    cfg = config.parse_args([f"--out={out}"] + RL)
    model, tok = train.load_stage(cfg, "format_tuned")
    assert os.path.isdir(os.path.join(out, "format_tuned")) and not os.path.exists(os.path.join(out, "format_tuned.old"))
    assert rl.algo_config(config.Config(reward_clip=0), 1).reward_clip is None
    assert rl.algo_config(config.Config(), 1).reward_clip == 10.0


def test_resume_may_move_the_run_and_change_how_it_runs(tmp_path):
    """Options that say how to run (where, how often to checkpoint or log, disk headroom) may change
    on --resume; the finished stage is skipped."""
    a, b = tmp_path / "a", tmp_path / "b"
    train.main([f"--out={a}", "--stages=pretrain"] + TINY)
    os.replace(a, b)
    train.main([f"--out={b}", "--stages=pretrain,eval", "--resume"] + TINY + ["--ckpt_every=7", "--log_every=3",
                                                                          "--min_free_gb=0"])
    assert json.load(open(b / "progress.json"))["done"] == ["pretrain", "eval"]
    with pytest.raises(SystemExit, match="--seed=0 \\(now 1\\)"):
        train.main([f"--out={b}", "--stages=pretrain", "--resume", "--seed=1"] + TINY)


def descendants(pid):
    """The ids of pid's children, their children, ... (Linux /proc)."""
    parent = {}
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                parent[int(d)] = int(f.read().rpartition(")")[2].split()[1])
        except (ValueError, OSError):
            continue                # not a process, or one that just ended
    found, todo = [], [pid]
    while todo:
        q = todo.pop()
        kids = [c for c, p in parent.items() if p == q]
        found += kids
        todo += kids
    return found


def running(pid):
    """pid is a process that has not ended (a zombie has: it waits only to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def test_sigkill_mid_rl_under_fsdp_then_resume(prepared, tmp_path):
    """RL under FSDP2 in 2 processes, SIGKILLed in the middle (torchrun and its workers at once) and
    resumed in 2 processes, ends with weights bitwise equal to an uninterrupted run; the sharded
    checkpoint also resumes in one process, and the run goes on from the step it was saved at."""
    a, b, c = (str(tmp_path / d) for d in "abc")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONHASHSEED="0")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    rl_args = ["--stages=rl", "--shard=fsdp", *RL]
    copy_models(prepared, a)
    p = subprocess.run(torchrun + [f"--out={a}", "--stages=orm,rl", "--shard=fsdp", *RL], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)       # uninterrupted
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 processes" in p.stdout
    copy_models(prepared, b)
    shutil.copytree(os.path.join(a, "orm"), os.path.join(b, "orm"))     # the same ORM: rl alone from here

    with open(tmp_path / "b.out", "w") as out:     # a file, not a pipe: workers left running would hold it open
        p = subprocess.Popen(torchrun + [f"--out={b}", *rl_args], cwd=ROOT, env=env, stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True)
        try:
            t0 = time.time()
            while rl_steps_logged(b) < 3:                           # kill it in the middle of RL
                assert p.poll() is None, (tmp_path / "b.out").read_text()[-3000:]
                assert time.time() - t0 < 240, "the run never reached RL step 3"
                time.sleep(0.02)
        finally:
            procs = descendants(p.pid)
            os.killpg(p.pid, signal.SIGKILL)    # torchrun alone: its workers, in sessions of their own, die with it
            p.wait()
            t0 = time.time()
            while any(running(q) for q in procs) and time.time() - t0 < 10:
                time.sleep(0.02)
            left = [q for q in procs if running(q)]
            for q in left:
                os.kill(q, signal.SIGKILL)
    assert p.returncode == -signal.SIGKILL and len(procs) >= 2, procs
    assert not left, f"workers {left} outlived their launcher"       # nothing writes into b any more
    assert not os.path.exists(os.path.join(b, "rl_round1"))       # the stage did not finish
    ckpts = sorted(d for d in os.listdir(os.path.join(b, "ckpt", "rl", "rl_round1")) if d.startswith("step-"))
    meta = json.load(open(os.path.join(b, "ckpt", "rl", "rl_round1", ckpts[-1], "meta.json")))
    assert meta["sharded"] and meta["world_size"] == 2               # FSDP2 shards, not whole copies
    shutil.copytree(b, c)

    # one process resumes from the 2 processes' shards, and the run goes on where it was saved
    p = subprocess.run([sys.executable, "train.py", f"--out={c}", *rl_args, "--resume=true"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "resharded from 2 processes to 1" in p.stdout, p.stdout[-3000:]
    at = int(p.stdout.split("rl_round1: resumed from ")[1].split(" at step ")[1].split("/")[0])
    assert 2 <= at < 12          # step 3 was logged after step 2's checkpoint; the stage had not finished
    steps = [json.loads(l) for l in open(os.path.join(c, "metrics.jsonl")) if l.strip().endswith("}")]
    steps = [s for s in steps if s.get("stage") == "rl_round1" and "reward" in s]
    assert [s["step"] for s in steps[len(steps) - (12 - at):]] == list(range(at + 1, 13))
    assert all(math.isfinite(s["reward"]) and math.isfinite(s["kl"]) for s in steps)
    assert os.path.isfile(os.path.join(c, "rl_round1", "model.safetensors"))

    # 2 processes resume it as it was: bitwise the uninterrupted run
    p = subprocess.run(torchrun + [f"--out={b}", *rl_args, "--resume=true"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "rl_round1: resumed from" in p.stdout and "resharded" not in p.stdout, p.stdout[-3000:]
    for f in ("model.safetensors", os.path.join("critic", "model.safetensors")):
        wa = load_file(os.path.join(a, "rl_round1", f))
        wb = load_file(os.path.join(b, "rl_round1", f))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert wa[k].equal(wb[k]), (f, k)
