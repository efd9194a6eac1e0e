"""COAT demonstration synthesis (coat.py): scripted generators show that every trajectory type is
produced and says the right thing; a tiny random model runs the real Sampler end to end."""
import json
import random
import re
from collections import Counter

import pytest
import torch

from coat import (COAT_TYPES, SynthConfig, sampler_generator, split_cot, synthesize_coat, synthesize_stats,
                  task_critic, write_demos)
from data import TaskConfig, apply_op, builtin_split, load_jsonl, make_problem, parse_question, parse_step, problem_from
from model import ModelConfig, Transformer
from reward import coat_grammar_ok, grade, split_steps
from rollout import Sampler
from tokenizer import COAT_TOKENS, PROMPT_TEMPLATE, build_task_tokenizer

@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    texts = [t for p in (make_problem(rng, TaskConfig()) for _ in range(300)) for t in (p["question"], p["solution"])]
    texts += [PROMPT_TEMPLATE.format(question=q) for q in ("What is 2 + 3?", "Start with 5.")]
    return build_task_tokenizer(texts, vocab_size=320)

def _parse_prompt(tok, ids):
    """(question, plain chain written so far) from a generator prompt."""
    text = tok.decode(ids)
    question = text.split("Problem: ", 1)[1].split("<|im_end|>", 1)[0]
    return question, text.split("<|im_start|>assistant\n", 1)[1]

def _lines(start, ops, first, cur, slips):
    """Lines of steps first.. (from value cur), then the answer; a step in slips is off by one."""
    lines = []
    for i in range(first, len(ops)):
        op, b = ops[i]
        new = apply_op(cur, op, b) + (i in slips)
        lines.append(f"Step {i + 1}: {cur} {op} {b} = {new}.")
        cur = new
    return lines + [f"The answer is \\boxed{{{cur}}}."]

# what the scripted base model does with the i-th sample of a question
PLAN = [
    "right", "right", "right",
    ("slip", 2),            # wrong result at step 3: one correction fixes it
    ("slip", 1),            # wrong at step 2: its continuation slips at step 3 again -> two corrections
    ("slip", 0),            # wrong at step 1
    "wrong_answer",         # right steps, wrong \boxed answer: the explore step is the answer itself
    "garbage",              # unparsable; the 5th wrong sample, so keep_incorrect=4 drops it
]

def task_generator(tok):
    """Scripted base model for the built-in task. Continuations go on with the right chain, except
    from a chain of exactly 2 steps, where step 3 slips (so 'slip at step 2' needs two corrections)."""
    def generate(prompts, temperature, max_new_tokens, seed):
        outs, seen = [], Counter()
        for ids in prompts:
            question, written = _parse_prompt(tok, ids)
            start, ops = parse_question(question)
            if not written:                                   # a fresh sample
                kind = PLAN[seen[question] % len(PLAN)]
                seen[question] += 1
                if kind == "garbage":
                    text = "Step 1: 4 4 4\nStep"
                elif kind == "wrong_answer":
                    text = "\n".join(_lines(start, ops, 0, start, set())[:-1] + ["The answer is \\boxed{1}."])
                else:
                    text = "\n".join(_lines(start, ops, 0, start, {kind[1]} if kind != "right" else set()))
            else:                                             # continue the accepted chain
                given = written.split("\n")
                cur = parse_step(given[-1])[3]
                text = "\n" + "\n".join(_lines(start, ops, len(given), cur, {2} if len(given) == 2 else set()))
            outs.append(tok.encode(text))
        return outs
    return generate

def _reference_lines(problem):
    return problem["solution"].split("\n")

def check_record(rec, problem):
    """Every claim of a built-in task trajectory is true; returns its reflection kinds."""
    text = rec["response"]
    assert text.endswith("<|im_end|>") and rec["prompt"] == PROMPT_TEMPLATE.format(question=problem["question"])
    body = text[:-len("<|im_end|>")]
    assert coat_grammar_ok(text) and grade(text, problem) is True
    for m in COAT_TOKENS:                                     # COAT tokens only at step starts
        for i in [x.start() for x in re.finditer(re.escape(m), body)]:
            assert body[i - 1] == "\n" and re.match(r"(Step \d+: |Let me check |The answer is )", body[i + len(m):])
    ref, kinds, chain = _reference_lines(problem), [], []
    steps = [(m, s.strip()) for m, s in split_steps(body)]
    assert steps[0][0] is None
    for i, (meta, s) in enumerate(steps):
        if meta in (None, "<|continue|>"):
            chain.append(s)
        elif meta == "<|reflect|>" and s.endswith("It is correct."):
            j = int(re.match(r"Let me check step (\d+): ", s).group(1)) - 1
            a, op, b, r = parse_step(s[len(f"Let me check step {j + 1}: "):-len(" It is correct.")])
            assert chain[:j + 1] == ref[:j + 1] and ref[j] == f"Step {j + 1}: {a} {op} {b} = {r}."
            kinds.append("v")
        elif meta == "<|reflect|>":
            m = re.match(r"Let me check (?:step (\d+)|the answer): ", s)
            k = int(m.group(1)) - 1 if m.group(1) else len(ref) - 1
            first_wrong = next(x for x, (c, w) in enumerate(zip(chain + [None], ref)) if c != w)
            assert k == first_wrong and chain[k:], (s, chain)   # names THE first wrong step, already written
            assert steps[i + 1] == ("<|explore|>", ref[k])      # and the hint is the right step
            chain = chain[:k]
            kinds.append("c")
        else:
            assert meta == "<|explore|>"
            chain.append(s)
    assert chain == ref                                         # every step after the last correction is right
    return kinds

TYPE_OF = {(): "no_reflect", ("v",): "verify", ("v", "c"): "verify_correct", ("c",): "correct_once",
           ("c", "c"): "correct_twice"}

def test_task_all_types_and_every_claim_true(tok, tmp_path):
    train, _ = builtin_split(n_train=12, n_test=1, seed=3)
    problems = [p for p in train if len(p["ops"]) == 3][:12]
    gen = task_generator(tok)
    cfg = SynthConfig(group=len(PLAN), keep_correct=4, keep_incorrect=4, max_new_tokens=64, chunk=5)
    records = synthesize_coat(gen, tok, problems, cfg, seed=0, log=lambda *a: None)
    stats = synthesize_stats(records)
    assert all(stats[t] > 0 for t in COAT_TYPES), stats
    assert stats["total"] == len(records) and stats["questions"] == len(problems)
    by_q = {p["question"]: p for p in problems}
    per_q = Counter((r["question"], r["type"]) for r in records)
    assert max(per_q.values()) == 1                              # at most one of each type per question
    for r in records:
        p = by_q[r["question"]]
        assert r["answer"] == p["answer"]
        assert TYPE_OF[tuple(check_record(r, p))] == r["type"]
    # the wrong-final-answer sample: the correction is about the answer, the explore step is final
    assert any("Let me check the answer: step 3 gives" in r["response"] for r in records)
    # written and read back
    path = tmp_path / "s" / "demos.jsonl"
    write_demos(str(path), records)
    back = load_jsonl(path)
    assert [json.dumps(b, sort_keys=True) for b in back] == [json.dumps(r, sort_keys=True) for r in records]

def test_task_deterministic_and_rounds(tok):
    train, _ = builtin_split(n_train=6, n_test=1, seed=4)
    problems = [p for p in train if len(p["ops"]) == 3]
    cfg = SynthConfig(group=len(PLAN), max_new_tokens=64)
    quiet = lambda *a: None
    a = synthesize_coat(task_generator(tok), tok, problems, cfg, seed=1, log=quiet)
    assert a == synthesize_coat(task_generator(tok), tok, problems, cfg, seed=1, log=quiet)
    # a scorer picks within each type; same seed = same candidates, so the longest beats the shortest
    longest = synthesize_coat(task_generator(tok), tok, problems, cfg, scorer=lambda p, r: len(r), seed=1, log=quiet)
    short = {(r["question"], r["type"]): len(r["response"]) for r in a}
    assert {(r["question"], r["type"]) for r in longest} == set(short)
    assert all(len(r["response"]) >= short[r["question"], r["type"]] for r in longest)
    assert any(len(r["response"]) > short[r["question"], r["type"]] for r in longest)
    one = synthesize_coat(task_generator(tok), tok, problems, SynthConfig(group=len(PLAN), max_rounds=1,
                                                                           verify_prob=1.0), log=quiet)
    assert {r["type"] for r in one} <= {"verify", "correct_once"}
    none = synthesize_coat(task_generator(tok), tok, problems, SynthConfig(group=len(PLAN), verify_prob=0.0),
                           log=quiet)
    assert {r["type"] for r in none} == {"no_reflect", "correct_once", "correct_twice"}
    with pytest.raises(ValueError):
        synthesize_coat(task_generator(tok), tok, problems, SynthConfig(max_rounds=3), log=quiet)

def test_task_critic_messages():
    p = problem_from(47, [("+", 38), ("*", 3), ("-", 59)])
    ref = p["solution"].split("\n")
    assert task_critic(p, ref) is None
    cases = [
        (["Step 1: 47 + 38 = 85.", "Step 2: 85 * 3 = 245."], 1, "Let me check step 2: 85 * 3 = 255, not 245."),
        (["Step 1: 47 + 38 = 85.", "Step 2: 86 * 3 = 258."], 1, "Let me check step 2: it should start from 85, not 86."),
        (["Step 1: 47 + 39 = 86."], 0, "Let me check step 1: the question says add 38, not add 39."),
        (["Step 1: 47 + 38 = 85.", "The answer is \\boxed{85}."], 1, "Let me check step 2: it is missing."),
        (["Step 1: 47 + 38 = 85"], 0, "Let me check step 1: it should be 47 + 38 = 85."),
        (ref[:3], 3, "Let me check the answer: step 3 gives 196."),
        (ref[:3] + ["The answer is \\boxed{195}."], 3, "Let me check the answer: step 3 gives 196, not 195."),
    ]
    for steps, k, why in cases:
        assert task_critic(p, steps) == (k, why, ref[k])

def test_split_cot():
    assert split_cot("Step 1: 1 + 1 = 2.\n\nThe answer is \\boxed{2}. Then more\nStep 9") == (
        ["Step 1: 1 + 1 = 2.", "The answer is \\boxed{2}."], "\n\n")
    assert split_cot("a\nb $\\boxed{\\frac{1}{2}}$. c<|im_start|>x") == (["a", "b $\\boxed{\\frac{1}{2}}$."], "\n")
    assert split_cot("x<|im_end|>\nStep") == (["x"], "\n")

def test_user_data_answer_critic(tok):
    """A user's problems (question + answer only): no step checks, so no verification; a wrong final
    answer is corrected by redoing the last step ("Alternatively," and the generator continues)."""
    problems = [{"question": f"What is {a} + 3?", "answer": str(a + 3)} for a in range(6)]
    tries = Counter()

    def generate(prompts, temperature, max_new_tokens, seed):
        outs = []
        for i, ids in enumerate(prompts):
            question, written = _parse_prompt(tok, ids)
            a = int(question.split()[2])
            if not written:
                ans = a + 3 if i % 4 == 0 else a + 4                  # 1 in 4 samples right
                outs.append(tok.encode(f"We add 3 to {a}.\n\nSo it is $\\boxed{{{ans}}}$."))
            else:
                assert written.endswith("Alternatively,") and "boxed" not in written
                tries[question] += 1
                ans = a + 3 if (a % 2 == 0 or tries[question] % 2 == 0) else a + 5   # odd a: wrong first
                outs.append(tok.encode(f" I recount: {a} + 3 is \\boxed{{{ans}}}."))
        return outs

    cfg = SynthConfig(group=8, verify_prob=1.0, reflect_delay=0)
    records = synthesize_coat(generate, tok, problems, cfg, log=lambda *a: None)
    assert set(synthesize_stats(records)) >= set(COAT_TYPES)
    assert {r["type"] for r in records} == {"no_reflect", "correct_once", "correct_twice"}
    for r in records:
        assert coat_grammar_ok(r["response"]) and grade(r["response"], r) is True
        if r["type"] != "no_reflect":
            assert "\n\n<|reflect|>The answer " in r["response"] and "is not correct.\n\n<|explore|>Alternatively, I recount" in r["response"]
        n_reflect = {"no_reflect": 0, "correct_once": 1, "correct_twice": 2}[r["type"]]
        assert r["response"].count("<|reflect|>") == r["response"].count("<|explore|>") == n_reflect

def test_random_model_through_sampler(tok):
    """End to end with the real Sampler: a random model writes garbage, which drives the correction paths."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=512))
    sampler = Sampler(model, max_batch=16, block_size=16, max_seq_len=192)
    sample, calls = sampler_generator(sampler, tok.stop_ids), []

    def gen(prompts, temperature, max_new_tokens, seed):
        outs = sample(prompts, temperature, max_new_tokens, seed)
        assert len(outs) == len(prompts) and all(not o or o[-1] not in tok.stop_ids for o in outs)
        calls.append(len(prompts))
        return outs

    train, _ = builtin_split(n_train=2, n_test=1, seed=0)
    records = synthesize_coat(gen, tok, train, SynthConfig(group=4, max_new_tokens=16), log=lambda *a: None)
    assert calls[0] == 8 and len(calls) == 3        # samples, then two rounds of continuations of garbage
    for r in records:
        assert r["type"] in COAT_TYPES and coat_grammar_ok(r["response"]) and grade(r["response"], r)


def test_sampler_generator_skips_prompts_without_room(tok):
    """A prompt that already fills the sampler's max_seq_len gets no tokens instead of an error; the
    others are generated with budgets clipped to the room they have."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=64))
    sample = sampler_generator(Sampler(model, max_batch=4, block_size=8, max_seq_len=40), stop_ids=[])
    outs = sample([[1] * 40, [2] * 35, [3] * 10, [4] * 50], 1.0, 8, 0)
    assert [len(o) for o in outs] == [0, 5, 8, 0]


def test_countdown_synthesis_yields_each_type_and_masks_false_lines():
    """Countdown: the base's comparisons are the reflections, the attempt after a failed one the
    exploration; its false lines (a wrong product, a false 'yes') get the critic's correction and
    are context, not targets, in format tuning."""
    import countdown
    from coat import demo_example
    problems = countdown.split(n_train=6, n_test=0, seed=3)[0]
    ctok = build_task_tokenizer([PROMPT_TEMPLATE.format(question=p["question"]) + p["solution"] for p in problems] * 5,
                                vocab_size=400)
    ctok.add_coat_tokens()

    def honest_from(p, lines):               # the critic's hints, followed to an answer: an honest search
        for _ in range(40):
            verdict = countdown.critic(p, lines)
            if verdict is None:
                return lines
            lines = lines[:verdict[0]] + [verdict[2]]
        raise AssertionError(lines)

    def generate(prompts, temperature, max_new_tokens, seed):
        outs = []
        for i, ids in enumerate(prompts):
            question, written = _parse_prompt(ctok, ids)
            p = next(p for p in problems if p["question"] == question)
            done = [l for l in written.split("\n") if l.strip()]
            if done:                                         # a continuation: go on honestly
                lines = honest_from(p, done)[len(done):]
            else:
                fails = [t for t in countdown.attempts(p["numbers"]) if t[1][3] != p["target"]]
                lines = []
                for t in fails[:i % 3]:                      # 0, 1 or 2 failed attempts first
                    lines += [countdown.step_line(t[0]), countdown.step_line(t[1]),
                              countdown.check_line(t[1][3], p["target"])]
                if i % 4 == 3:                               # a false 'yes' on a failed attempt
                    t = fails[-1]
                    lines = [countdown.step_line(t[0]), countdown.step_line(t[1]), f"{t[1][3]} vs {p['target']}: yes.",
                             f"The answer is \\boxed{{{countdown.expression(t)}}}."]
                else:
                    lines = honest_from(p, lines)
                if p is problems[0]:                         # a garbled line, as sampling makes them
                    lines[2] += "0 + 3 = 4."
            outs.append(ctok.encode(("\n" if done else "") + "\n".join(lines)))
        return outs

    records = synthesize_coat(generate, ctok, problems, SynthConfig(group=8, verify_prob=0.5, reflect_delay=0),
                              log=lambda *a: None, seed=1)
    assert {r["type"] for r in records} == set(COAT_TYPES)
    for r in records:
        text = r["response"]
        assert coat_grammar_ok(text) and grade(text, r) is True, text
        steps = split_steps(text.replace(ctok.eos_token, ""))
        for (m0, s0), (m1, s1) in zip(steps, steps[1:]):       # every comparison is a reflection ...
            assert (m1 == "<|reflect|>") == (s1.strip().endswith(("yes.", "no.", "It is right.")) or s1.startswith("Check"))
            assert (m1 == "<|explore|>") == (s0.strip().endswith(": no.") or (m0 == "<|reflect|>" and "not" in s0))
        _, ids, keep = demo_example(ctok, r)                    # ... and a false line is context
        false = [l for m, s in steps for l in s.split("\n") if l.strip() and not countdown.honest(l, r)]
        if r["type"] == "no_reflect":                           # with no reflection to answer it
            lines = [l for m, s in steps for l in s.split("\n") if l.strip()]
            assert "<|reflect|>" not in text and not false, text
            assert all(re.fullmatch(r"\d+ [-+*] \d+ = -?\d+\.|-?\d+ vs \d+: (yes|no)\.|The answer is .*", l) for l in lines), text
        assert (all(keep) if not false else not all(keep)), (text, false)
