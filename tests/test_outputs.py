"""Stage directories that work everywhere: transformers loads them, its generate stops where our
sampler does, its apply_chat_template gives our prompt, and a user's tokenizer settings survive."""
import json
import os
import random
import shutil

import pytest
import torch

import data
import tokenizer
import train
from config import Config
from model import Transformer, ValueModel
from rollout import Sampler
from tokenizer import INSTRUCTION, PROMPT_TEMPLATE, Tokenizer

transformers = pytest.importorskip("transformers")
BASE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "base")
# a user's template: a default system message, the bos token, tojson, raise_exception, and block tags
# on lines of their own (trim_blocks / lstrip_blocks)
USER_TEMPLATE = """{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}
<|im_start|>system
You are a helpful assistant. {{ {"tools": []} | tojson }}<|im_end|>
{% for message in messages %}
    {% if message['role'] == 'user' %}
<|im_start|>user
{{ message['content'] }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""


def save(out, name, model, tok, **kw):
    """out/<name> as a stage writes it."""
    return train.save_stage(Config(out=str(out)), {"stage": "test", "made_from": {}}, name, model, tok, **kw)


def stage_pair(out, src):
    """out/base saved from the model directory src, and out/coat: the same + COAT tokens + a critic."""
    model, tok = Transformer.from_pretrained(src), Tokenizer.from_pretrained(src)
    base = save(out, "base", model, tok)
    model, tok = train.with_coat_tokens(model, tok)
    return base, save(out, "coat", model, tok, models={"critic": ValueModel.from_policy(model)})


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return stage_pair(tmp_path_factory.mktemp("out"), BASE)


def user_dir(path, template_in="config", **cfg):
    """A user's model directory: the shipped base with a tokenizer_config.json as the Hub has them
    (a stale added_tokens_decoder, Qwen2Tokenizer), the chat template in it or in chat_template.jinja."""
    os.makedirs(path)
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copy(os.path.join(BASE, f), path)
    cfg = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
           "added_tokens_decoder": {"0": {"content": "<|endoftext|>", "special": True}},
           "clean_up_tokenization_spaces": False, **cfg}
    if template_in == "jinja":
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(cfg.pop("chat_template"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f)
    return str(path)


def test_generate_stops_at_eos_with_our_sampler_tokens(stages):
    """transformers' greedy generate on a stage directory ends where our sampler's does, token for token."""
    path = stages[0]
    tok, ours = Tokenizer.from_pretrained(path), Transformer.from_pretrained(path).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    rng = random.Random(0)
    prompts = [tok.encode_prompt(data.make_problem(rng)["question"]) for _ in range(3)]
    budget = 400
    outs = Sampler(ours, max_batch=4, block_size=16).generate(prompts, budget, temperature=0, stop_ids=tok.stop_ids)
    for p, o in zip(prompts, outs):
        ids = torch.tensor([p])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget, do_sample=False)
        ref = ref[0, len(p):].tolist()
        assert len(ref) < budget and ref[-1] in tok.stop_ids and o.finished and ref == o.tokens


def test_apply_chat_template_gives_our_prompt(stages, monkeypatch):
    """With --prompt=chat_template our prompt is transformers' rendering of the stage's template, which
    for the built-in tokenizer is Satori's prompt; model_max_length is the model's positions."""
    monkeypatch.setattr(tokenizer, "PROMPT", "chat_template")
    q = "Start with 5. Add 3. What is the result?"
    for path in stages:
        tok, hf = Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
        text = hf.apply_chat_template([{"role": "user", "content": INSTRUCTION.format(question=q)}],
                                      tokenize=False, add_generation_prompt=True)
        assert text == tok.prompt(q) == PROMPT_TEMPLATE.format(question=q)
        assert hf.encode(text, add_special_tokens=False) == tok.encode_prompt(q) and hf.model_max_length == 1024


@pytest.mark.parametrize("template_in", ["config", "jinja"])
def test_a_users_tokenizer_settings_survive(tmp_path, monkeypatch, template_in):
    """chat_template (from tokenizer_config.json or chat_template.jinja), model_max_length, bos_token and
    the harmless fields come through a save and COAT tokens; the stale added_tokens_decoder does not,
    and transformers still sees the COAT tokens as special."""
    src = user_dir(tmp_path / "user", template_in, chat_template=USER_TEMPLATE, model_max_length=2048,
                   bos_token="<|endoftext|>")
    monkeypatch.setattr(tokenizer, "PROMPT", "chat_template")
    q = "Start with 5. Add 3. What is the result?"
    for path in stage_pair(tmp_path / "out", src):
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            saved = json.load(f)
        assert saved["chat_template"] == USER_TEMPLATE and saved["model_max_length"] == 2048
        assert saved["bos_token"] == "<|endoftext|>" and saved["clean_up_tokenization_spaces"] is False
        assert "added_tokens_decoder" not in saved and not os.path.exists(os.path.join(path, "chat_template.jinja"))
        tok, hf = Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
        assert hf.chat_template == USER_TEMPLATE and hf.model_max_length == 2048 and hf.bos_token == "<|endoftext|>"
        text = hf.apply_chat_template([{"role": "user", "content": INSTRUCTION.format(question=q)}],
                                      tokenize=False, add_generation_prompt=True)
        assert text == tok.prompt(q) and text.startswith("<|endoftext|><|im_start|>system\n")
        assert text != PROMPT_TEMPLATE.format(question=q)
        coat = "2 + 3 = 5<|reflect|>Check: 2 + 3 = 5<|im_end|>"
        assert hf.encode(coat, add_special_tokens=False) == tok.encode(coat)
    assert hf.decode(tok.encode(coat), skip_special_tokens=True) == "2 + 3 = 5Check: 2 + 3 = 5"
    assert all(hf.added_tokens_decoder[i].special for i in tok.coat_ids)


def test_config_ids_are_the_tokenizers(stages):
    """config.json names the tokenizer's bos / eos / pad ids; generation_config.json stops at every
    stop id of our sampler; the critic's config.json has the ids and no generation_config.json."""
    for path in stages:
        tok, hf = Tokenizer.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == \
            (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (None, tok.eos_id, tok.pad_id)
        gen = transformers.GenerationConfig.from_pretrained(path)
        assert gen.eos_token_id == tok.stop_ids and gen.pad_token_id == tok.pad_id
    critic = os.path.join(stages[1], "critic")
    with open(os.path.join(critic, "config.json")) as f:
        assert json.load(f)["eos_token_id"] == tok.eos_id
    assert not os.path.exists(os.path.join(critic, "generation_config.json"))


def test_chat_template_prompt_needs_a_template(tmp_path, capsys):
    """--prompt=chat_template with a --model whose tokenizer has no chat template: one line, no work."""
    src, out = user_dir(tmp_path / "user"), tmp_path / "run"
    for argv, msg in (([f"--model={src}", "--prompt=chat_template"],
                       f"--prompt=chat_template: {src}'s tokenizer has no chat_template"),
                      (["--prompt=chatml"], "--prompt=chatml: expected one of satori, chat_template")):
        assert train.cli([f"--out={out}"] + argv) == 2
        assert capsys.readouterr().err == f"error: {msg}\n" and not out.exists()
