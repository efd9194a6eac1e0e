"""Tokenizer: COAT tokens never split, the Satori template, HF-format round trip."""
import pytest

import tokenizer
from tokenizer import COAT_TOKENS, PROMPT_TEMPLATE, Tokenizer, build_task_tokenizer

CORPUS = [PROMPT_TEMPLATE.format(question=f"Start with {a}. Add {b}. What is the result?")
          + f"Step 1: {a} + {b} = {a + b}.\nThe answer is \\boxed{{{a + b}}}.<|im_end|>"
          for a in range(10, 60) for b in range(3, 9)]


@pytest.fixture(scope="module")
def tok():
    t = build_task_tokenizer(CORPUS, vocab_size=320)
    t.add_coat_tokens()
    return t


def test_round_trip_and_digits_split(tok):
    text = CORPUS[7] + "<|reflect|>Check step 1: 10 + 5 = 15.<|explore|>x<|continue|>y"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    pieces = [tok.decode([i]) for i in tok.encode("12345")]
    assert pieces == ["1", "2", "3", "4", "5"]


def test_whole_numbers_become_single_tokens():
    t = build_task_tokenizer(CORPUS, vocab_size=700, whole_numbers=True)
    assert t.decode(t.encode(CORPUS[7])) == CORPUS[7]
    assert [t.decode([i]) for i in t.encode(" 42 + 5 = 47")] == [" ", "42", " +", " ", "5", " =", " ", "47"]
    assert len(t.encode("98765")) > 1          # a number the corpus never had is still spelled out


def test_coat_tokens_are_single_special_tokens(tok):
    ids = {t: tok.token_id(t) for t in COAT_TOKENS}
    assert len(set(ids.values())) == 3 and tok.coat_ids == set(ids.values())
    assert (tok.continue_id, tok.reflect_id, tok.explore_id) == tuple(ids[t] for t in COAT_TOKENS)
    for t, i in ids.items():
        # never split, even glued to other text
        assert tok.encode(f"ab{t}cd").count(i) == 1
        assert i in tok.encode(t) and len(tok.encode(t)) == 1
    assert tok.add_coat_tokens() == 0   # idempotent


def test_prompt_template_is_satoris(tok, monkeypatch):
    satori = ("<|im_start|>user\nSolve the following math problem efficiently and clearly.\n"
              "Please reason step by step, and put your final answer within \\boxed{}.\n"
              "Problem: What is {1+1}?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.prompt("What is {1+1}?") == satori
    assert "{question}" in PROMPT_TEMPLATE
    # the built-in chat template renders exactly Satori's prompt: --prompt changes nothing on the built-in task
    monkeypatch.setattr(tokenizer, "PROMPT", "chat_template")
    assert tok.prompt("What is {1+1}?") == satori
    with pytest.raises(ValueError, match="no chat_template"):
        Tokenizer(tok.tk).prompt("x")


def test_save_load_and_transformers_agree(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    text = CORPUS[3] + "<|continue|>Step 2"
    assert again.encode(text) == tok.encode(text)
    assert again.eos_id == tok.token_id("<|im_end|>") and again.stop_ids == tok.stop_ids
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.decode(tok.encode(text)) == text


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
