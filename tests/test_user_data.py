"""A user's model and data end to end: a Qwen2 directory of their own, GSM8K-style JSONL, their own
demonstrations, every stage of the default chain; and a base pretrained from plain question/answer
data that answers in \\boxed{}."""
import json
import os
import random
import shutil

import data
import train
from tokenizer import CONTINUE as C, REFLECT as R, Tokenizer
from config import Config


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def gsm8k_style(problems):
    """Built-in problems written the GSM8K way: reasoning with calculator notes, then "#### answer"."""
    rows = []
    for p in problems:
        steps = [line.replace(" = ", f" = <<{line.split(': ')[1].split(' = ')[0]}>>") for line in
                 data.solution_steps(p["solution"])]
        rows.append({"question": p["question"], "answer": "\n".join(steps) + f"\n#### {p['answer']}"})
    return rows


USER_TEMPLATE = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}{{ '<|im_start|>system\\n"
                 "You are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + "
                 "m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
                 "{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_user_model_gsm8k_data_and_demos_run_every_stage(tmp_path, capsys):
    """The shipped base stands in for the user's checkpoint (it can answer these questions, so that
    every stage has something to learn from); the demonstrations come in the chat "messages" format."""
    model = tmp_path / "my-qwen"
    shutil.copytree(train.base_path(Config()), model)
    tok_cfg = json.load(open(model / "tokenizer_config.json"))     # what a user's tokenizer carries
    tok_cfg.update(chat_template=USER_TEMPLATE, model_max_length=2048, tokenizer_class="Qwen2Tokenizer")
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    problems, _ = data.builtin_split(data.task_config(Config()), 60, 1, seed=5)
    path = _jsonl(tmp_path / "gsm8k.jsonl", gsm8k_style(problems))
    demos = []
    for p in problems[:20]:
        steps = data.solution_steps(p["solution"])
        response = (f"{steps[0]}\n{C}" + f"\n{C}".join(steps[1:]) + f"\n{R}Let me check: it holds.\n"
                    f"{C}The answer is \\boxed{{{p['answer']}}}.")
        demos.append({"messages": [{"role": "user", "content": p["question"]},
                                   {"role": "assistant", "content": response}]})
    demo_path = _jsonl(tmp_path / "demos.jsonl", demos)
    out = str(tmp_path / "out")
    rc = train.cli([f"--out={out}", f"--model={model}", f"--data={path}", f"--demos={demo_path}",
                    "--sft_epochs=10", "--sft_lr=3e-4", "--rae_questions=4", "--rae_group=2", "--orm_epochs=1",
                    "--rl_batch=4", "--minibatch_size=2", "--micro_batch=2", "--rl_max_new_tokens=128",
                    "--rl_steps=1", "--rl2_steps=1", "--rl2_group=2", "--distill_questions=8",
                    "--distill_epochs=1", "--eval_max_new_tokens=128", "--log_every=1"])
    logged = capsys.readouterr()
    assert rc == 0, logged.err
    assert "54 train / 6 test problems" in logged.out                  # n_test: a tenth of --data
    assert f"pretrain: --model given, {model} is the base model" in logged.out
    assert f"synthesize: --demos given, 20 demonstrations from {demo_path}" in logged.out
    copied = [json.loads(line) for line in open(os.path.join(out, "synthesize", "demos.jsonl"))]
    assert [d["response"] for d in copied] == [d["messages"][1]["content"] for d in demos]
    res = json.load(open(os.path.join(out, "results.json")))
    assert [r["name"] for r in res["stages"]] == list(train.EVAL_STAGES)
    assert all(r["n"] == 6 for r in res["stages"])
    # format tuning learned from the user's demonstrations (their COAT tokens are new to the model)
    done = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    sft = next(m for m in done if m.get("stage") == "sft" and m.get("done"))
    assert sft["loss"] < sft["first_loss"] / 2
    # the last model keeps the user's tokenizer settings, and transformers' generate on it stops
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    final = os.path.join(out, "rl_round2")
    hf_tok = AutoTokenizer.from_pretrained(final)
    assert hf_tok.model_max_length == 2048 and hf_tok.chat_template == USER_TEMPLATE
    hf = AutoModelForCausalLM.from_pretrained(final)
    text = hf_tok.apply_chat_template([{"role": "user", "content": problems[0]["question"]}], tokenize=False,
                                      add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.")
    ids = torch.tensor([hf_tok.encode(Tokenizer.from_pretrained(final).prompt(problems[0]["question"]))])  # as trained
    gen = hf.generate(ids, max_new_tokens=300, do_sample=False)[0, ids.shape[1]:].tolist()
    assert len(gen) < 300 and gen[-1] in hf.generation_config.eos_token_id


def test_plain_question_answer_data_pretrains_a_base_that_answers_in_boxed(tmp_path):
    rng = random.Random(0)
    rows = []
    for _ in range(300):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        rows.append({"question": f"What is {a} plus {b}?", "answer": a + b})
    path = _jsonl(tmp_path / "plain.jsonl", rows)
    out = str(tmp_path / "out")
    train.main([f"--out={out}", f"--data={path}", "--stages=pretrain,eval", "--hidden_size=32",
                "--intermediate_size=64", "--num_hidden_layers=1", "--vocab_size=300", "--pretrain_steps=60",
                "--pretrain_batch_tokens=1024", "--pretrain_lr=1e-2", "--eval_max_new_tokens=24"])
    base = json.load(open(os.path.join(out, "results.json")))["stages"][0]
    assert base["n"] == 30 and base["boxed_rate"] > 0.9


def test_a_model_that_never_answers_in_boxed_is_told_what_to_do(tmp_path, capsys):
    """An untrained model writes no \\boxed{} answer: synthesis stops with a line that says what to do
    instead of leaving format tuning an empty file."""
    out = str(tmp_path / "out")
    rows = [{"question": f"What is {i} plus 1?", "answer": i + 1} for i in range(20)]
    path = _jsonl(tmp_path / "plain.jsonl", rows)
    rc = train.cli([f"--out={out}", f"--data={path}", "--stages=pretrain,synthesize", "--hidden_size=32",
                    "--intermediate_size=64", "--num_hidden_layers=1", "--vocab_size=300", "--pretrain_steps=1",
                    "--pretrain_batch_tokens=256", "--synth_questions=4", "--synth_group=2",
                    "--synth_max_new_tokens=4"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert "synthesize: no demonstration; of 8 samples" in err and "0 reached a \\boxed{} answer" in err
    assert "Bring demonstrations (--demos=file.jsonl), raise --synth_group" in err
    assert not os.path.exists(os.path.join(out, "synthesize", "demos.jsonl"))
    assert open(os.path.join(out, "train.log")).read().splitlines()[-1] == err.strip()   # the log says why it ended


def test_a_model_is_only_prompted_the_way_it_learned(tmp_path, capsys):
    """Each output records the prompt style its model learned; a run that would prompt it another way
    is refused before any work."""
    out = str(tmp_path / "out")
    assert train.cli([f"--out={out}", "--stages=pretrain"]) == 0
    assert json.load(open(os.path.join(out, "base", "provenance.json")))["prompt"] == "satori"
    capsys.readouterr()
    assert train.cli([f"--out={out}", "--stages=eval", "--prompt=chat_template"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --prompt=chat_template: {os.path.join(out, 'base')} learned --prompt=satori; give "
                   "--prompt=satori, or start from the base model in a new --out\n")
