"""The command line: --key value and --key=value, bare flags, --help, --config files, and every bad
option or input refused before any work with one line on stderr and exit code 2."""
import json
import os
import subprocess
import sys
from dataclasses import fields

import pytest

import config
import train
from config import Config, parse_args
from model import ModelConfig, Transformer
from tokenizer import build_task_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_both_forms_bare_flags_and_no_flags():
    cfg = parse_args(["--out", "runs/x", "--rl_steps=7", "--resume", "--no-orm_reward", "--sft_lr", "1e-4",
                      "--no_eos_penalty", "-2", "--betas", "0.9,0.99", "--rae", "false", "--expo=true"])
    assert (cfg.out, cfg.rl_steps, cfg.resume, cfg.orm_reward, cfg.sft_lr) == ("runs/x", 7, True, False, 1e-4)
    assert cfg.no_eos_penalty == -2.0 and cfg.betas == (0.9, 0.99) and cfg.rae is False and cfg.expo is True
    assert parse_args(["--debug"]).debug and parse_args(["--debug", "--seed=1"]).debug   # a flag before an option
    assert parse_args(["--rl-steps", "3"]).rl_steps == 3                                   # dashes as underscores
    assert parse_args(["--base", ""]).base == "" and parse_args(["--seed", "-1"]).seed == -1   # not options
    for argv, msg in ((["--rl_step=3"], "unknown option --rl_step; did you mean --rl_steps?"),
                      (["--rl_stepz"], "unknown option --rl_stepz; did you mean --rl_steps?"),
                      (["--no-cuda-graph", "--seed", "1"], "did you mean --no-cuda_graphs?"),
                      (["--zzz=1"], "unknown option --zzz; --help lists them"),
                      (["--rl_steps"], "--rl_steps: expected a value"),
                      (["--out", "--resume"], "--out: expected a value"),
                      (["--resume=maybe"], "--resume=maybe: expected true or false"),
                      (["rl_steps=3"], "bad argument 'rl_steps=3'"),
                      (["--rl_samples=2"], "--rl_samples is now --rl_group")):
        with pytest.raises(SystemExit, match=msg.replace("?", "\\?")):
            parse_args(argv)


def test_a_task_brings_its_defaults_and_a_given_option_wins(tmp_path):
    cd = parse_args(["--task=countdown"])
    assert cd.whole_numbers and cd.rl_max_new_tokens == 256 and not cd.orm_reward
    assert not parse_args(["--task=chain"]).whole_numbers and parse_args([]).rl_max_new_tokens == 128
    assert parse_args(["--task=countdown", "--rl_max_new_tokens=100", "--orm_reward"]).rl_max_new_tokens == 100
    assert parse_args(["--orm_reward", "--task", "countdown"]).orm_reward
    (tmp_path / "a.json").write_text('{"task": "countdown", "eval_max_new_tokens": 300}')
    cd = parse_args([f"--config={tmp_path / 'a.json'}"])
    assert cd.eval_max_new_tokens == 300 and cd.whole_numbers


def test_help_lists_every_option_grouped_with_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--seed=1", "-h"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in fields(Config):
        assert f"  --{f.name} " in text, f.name
    assert "\nRL (PPO + GAE), round 1 from format_tuned, round 2 from distilled:\n" in text
    line = next(l for l in text.splitlines() if l.startswith("  --rl_temperature "))
    assert "1.2" in line and "Satori: 0.6" in line


def test_config_file_json_and_toml_the_command_line_wins(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"rl_steps": 9, "sft_lr": 1, "betas": [0.8, 0.9], "rae": False}))
    (tmp_path / "a.toml").write_text('rl_steps = 9\nalgo = "grpo"\nbetas = [0.8, 0.9]\n')
    cfg = parse_args(["--rl_steps=4", f"--config={tmp_path / 'a.json'}"])
    assert (cfg.rl_steps, cfg.sft_lr, cfg.betas, cfg.rae) == (4, 1.0, (0.8, 0.9), False)
    assert isinstance(cfg.sft_lr, float)
    cfg = parse_args(["--config", str(tmp_path / "a.toml")])
    assert (cfg.rl_steps, cfg.algo, cfg.betas) == (9, "grpo", (0.8, 0.9))
    (tmp_path / "b.json").write_text(json.dumps({"rl_stepz": 1}))
    (tmp_path / "c.json").write_text(json.dumps({"rl_steps": "many"}))
    (tmp_path / "d.json").write_text("{oops")
    (tmp_path / "e.json").write_text(json.dumps({"betas": 0.9}))
    (tmp_path / "f.json").write_text(json.dumps({"sft_lr": True}))
    (tmp_path / "g.json").write_text(json.dumps({"rae": 1}))
    assert parse_args([f"--config={tmp_path / 'a.json'}", "--betas=0.5,0.6"]).betas == (0.5, 0.6)
    for name, msg in (("b.json", "did you mean --rl_steps"), ("c.json", "rl_steps = 'many': expected an integer"),
                      ("d.json", "cannot read it"), ("missing.json", "cannot read it"),
                      ("e.json", "betas = 0.9: expected numbers"), ("f.json", "sft_lr = True: expected a number"),
                      ("g.json", "rae = 1: expected true or false")):
        with pytest.raises(SystemExit, match=msg):
            parse_args([f"--config={tmp_path / name}"])


def test_every_number_option_has_a_range():
    ranged = [k for names in config.RANGES.values() for k in names.split()]
    assert len(ranged) == len(set(ranged)), "an option in two ranges"
    numbers = {f.name for f in fields(Config) if isinstance(f.default, (int, float, tuple)) and
               not isinstance(f.default, bool)}
    assert set(ranged) == numbers, (numbers - set(ranged), set(ranged) - numbers)


def _write(path, lines):
    path.write_text("".join(l + "\n" for l in lines))
    return str(path)


def test_bad_inputs_one_line_exit_2_nothing_written(tmp_path, capsys):
    qa = lambda i: json.dumps({"question": f"what is {i} + 1?", "answer": str(i + 1)})
    small = _write(tmp_path / "small.jsonl", [qa(i) for i in range(40)])
    one = _write(tmp_path / "one.jsonl", [qa(0)])
    broken = _write(tmp_path / "broken.jsonl", [qa(0), "{oops", qa(1), '{"question": "q"}', "[1]"] +
                    ["{bad"] * 12)
    model = tmp_path / "not_a_model"
    model.mkdir()
    no_weights, bad_tok = tmp_path / "no_weights", tmp_path / "bad_tok"
    for d in (no_weights, bad_tok):
        Transformer(ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1)).save_pretrained(str(d))
        build_task_tokenizer(["Step 1: 1 + 1 = 2."] * 3, vocab_size=60).save_pretrained(str(d))
    os.remove(no_weights / "model.safetensors")
    (bad_tok / "tokenizer.json").write_text("{not json")
    out = tmp_path / "run"
    cases = [
        (["--rl_steps=-1"], "--rl_steps=-1: expected an integer >= 1"),
        (["--rl_batch=-8"], "--rl_batch=-8: expected an integer >= 1"),
        (["--sft_epochs=-1"], "--sft_epochs=-1.0: expected a number > 0"),
        (["--rl_temperature=-1"], "--rl_temperature=-1.0: expected a number > 0"),
        (["--clip=nan"], "--clip=nan: expected a number > 0"),
        (["--gamma=1.5"], "--gamma=1.5: expected a number in [0, 1]"),
        (["--betas=1.0,0.9"], "--betas=1.0,0.9: expected numbers in [0, 1)"),
        (["--betas=0.9"], "--betas=0.9: expected two numbers"),
        (["--task_ops=+x"], "--task_ops=+x: expected some of"),
        (["--task_min_steps=5"], "--task_min_steps=5: expected at most --task_n_steps=3"),
        (["--num_attention_heads=3"], "each must divide the one before"),
        (["--algo=grpo", "--grpo_group=1", "--rl_batch=64"], "--grpo_group=1: expected >= 2"),
        (["--device=tpu"], "--device=tpu: expected cpu, cuda"),
        (["--resume", "--overwrite"], "--resume and --overwrite"),
        (["--heldout=dev"], "--heldout=dev: only the built-in countdown task"),
        (["--task=countdown", "--countdown_order=best"], "--countdown_order=best: expected one of cycle, random"),
        (["--stages=pretrain,bogus"], "--stages: unknown stage 'bogus'"),
        (["--rl_step=3"], "did you mean --rl_steps?"),
        ([f"--data={tmp_path / 'nope.jsonl'}"], "nope.jsonl: no such file"),
        ([f"--test_data={small}"], "expected --data too"),
        ([f"--model={model}"], "no config.json"),
        ([f"--model={no_weights}"], "no model.safetensors"),
        ([f"--model={bad_tok}"], f"--model={bad_tok}: tokenizer: "),
        (["--base=nowhere"], "--base=nowhere: no such directory"),
        (["--hidden_size=12", "--num_attention_heads=4"], "expected an even head size"),
        (["--stages=sft"], "stage sft reads base, which is not in"),
        ([f"--data={small}", "--model=", "--stages=eval", "--n_test=40"], "40 problems, and --n_test=40 of them are held out"),
        ([f"--data={small}", "--stages=rlt"], "40 problems have no 'solution'; RLT's teacher explains worked solutions"),
        ([f"--data={small}", f"--demos={tmp_path / 'nope.jsonl'}"], "--demos=" + str(tmp_path / "nope.jsonl") + ": no such file"),
        ([f"--demos={one}", "--stages=sft"], f"--demos={one}: stage synthesize copies them into --out"),
        ([f"--data={small}", f"--demos={one}"], f"{one}:1: expected string fields 'question' (or 'prompt') and 'response'"),
        ([f"--data={broken}", "--n_test=1"], None),
    ]
    for argv, msg in cases:
        rc = train.cli([f"--out={out}"] + argv)
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert not out.exists(), (argv, "wrote to --out")
        if msg is not None:
            assert err.startswith("error: ") and err.count("\n") == 1 and msg in err, (argv, err)
    # a data file's bad lines are reported together, up to a limit, one line each
    lines = err.splitlines()
    assert lines[0] == (f"error: {broken}:2: invalid JSON (Expecting property name enclosed in double quotes at "
                        'column 2); expected one object per line like {"question": ..., "answer": ...}')
    assert lines[1].startswith(f"{broken}:4: expected an 'answer' field") and lines[2].startswith(f"{broken}:5:")
    assert len(lines) == 11 and lines[-1] == f"{broken}: 5 more bad lines"


def test_a_real_shell_sees_one_line_and_exit_2_and_debug_shows_the_traceback(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "train.py", f"--out={tmp_path / 'run'}", *a], cwd=ROOT,
                                    capture_output=True, text=True, timeout=120)
    p = run("--rl_steps=-1")
    assert p.returncode == 2 and p.stderr == "error: --rl_steps=-1: expected an integer >= 1\n" and p.stdout == ""
    p = run("--rl_steps=-1", "--debug")
    assert p.returncode == 2 and "Traceback" in p.stderr and p.stderr.endswith("expected an integer >= 1\n")
    assert not (tmp_path / "run").exists()


def test_bf16_on_a_gpu_without_it_is_refused(tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    for dtype in ("auto", "bfloat16"):
        with pytest.raises(SystemExit, match=f"--dtype={dtype}: bf16 compute, which Tesla V100 does not have"):
            train.main([f"--out={tmp_path}", "--stages=eval", f"--dtype={dtype}"])
    with pytest.raises(SystemExit, match="--dtype"):       # named even when the device is given
        train.main([f"--out={tmp_path}", "--stages=eval", "--device=cuda"])
    assert not os.listdir(tmp_path)
