import json
import random

import pytest

from data import (TaskConfig, builtin_split, check_steps, is_test, load_jsonl, make_problem,
                  parse_question, parse_step, problem_from, problem_key, solution_steps)
from reward import coat_grammar_ok, extract_answer, is_equiv

# -----------------------------------------------------------------------------
# load_jsonl

def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p

def test_load_plain_gsm8k_math(tmp_path):
    p = _write(tmp_path, [
        json.dumps({"question": "1+1?", "answer": "2", "id": 7}),
        "",
        json.dumps({"question": "Tom has 3 apples...", "answer": "He has 3 + 4 = 7 apples.\n#### 1,000"}),
        "   ",
        json.dumps({"problem": "Compute 1/2 + 1/4.", "solution": "It is $\\boxed{\\frac{3}{4}}$."}),
        json.dumps({"question": "6*7?", "answer": 42}),
    ])
    recs = load_jsonl(p)
    assert [r["question"] for r in recs] == ["1+1?", "Tom has 3 apples...", "Compute 1/2 + 1/4.", "6*7?"]
    assert [r["answer"] for r in recs] == ["2", "1,000", "\\frac{3}{4}", "42"]
    assert recs[0]["id"] == 7                                   # other keys kept
    assert recs[1]["solution"] == "He has 3 + 4 = 7 apples.\n#### 1,000"
    assert recs[2]["solution"].endswith("$.")
    assert is_equiv(recs[1]["answer"], "1000")

def test_load_empty_file(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text("\n\n")
    assert load_jsonl(p) == []

@pytest.mark.parametrize("bad,lineno,words", [
    ('{"question": "q", "answer": ', 2, "invalid JSON"),
    ('["question", "answer"]', 2, "JSON object"),
    ('{"question": "q"}', 2, "'answer'"),
    ('{"answer": "1"}', 2, "'question'"),
    ('{"question": "  ", "answer": "1"}', 2, "'question'"),
    ('{"question": "q", "answer": ""}', 2, "non-empty 'answer'"),
    ('{"question": "q", "answer": "work #### "}', 2, "non-empty 'answer'"),
    ('{"question": "q", "answer": null}', 2, "string or a number"),
    ('{"question": "q", "answer": true}', 2, "string or a number"),
    ('{"problem": "q", "solution": "no box"}', 2, "\\boxed"),
    ('{"problem": "q", "solution": "\\\\boxed{}"}', 2, "\\boxed"),
])
def test_load_errors_name_path_and_line(tmp_path, bad, lineno, words):
    p = _write(tmp_path, [json.dumps({"question": "ok", "answer": "1"}), bad, "{}"])
    with pytest.raises(ValueError) as e:
        load_jsonl(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:{lineno}:")
    assert words in msg

def test_load_error_line_counts_blank_lines(tmp_path):
    p = _write(tmp_path, ["", json.dumps({"question": "q", "answer": "1"}), "", "not json"])
    with pytest.raises(ValueError, match=r":4: invalid JSON"):
        load_jsonl(p)

def test_load_bad_utf8(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_bytes(b'{"question": "q", "answer": "1"}\n{"question": "\xff", "answer": "1"}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl:2: not valid UTF-8"):
        load_jsonl(p)

# -----------------------------------------------------------------------------
# the built-in task

def test_problem_format_exact():
    p = problem_from(47, [("+", 38), ("*", 3), ("-", 59)])
    assert p["question"] == "Start with 47. Add 38, then multiply by 3, then subtract 59. What is the result?"
    assert p["solution"] == ("Step 1: 47 + 38 = 85.\nStep 2: 85 * 3 = 255.\nStep 3: 255 - 59 = 196.\n"
                             "The answer is \\boxed{196}.")
    assert p["answer"] == "196" and p["start"] == 47 and p["ops"] == [("+", 38), ("*", 3), ("-", 59)]
    assert problem_from(8, [("/", 4)])["question"] == "Start with 8. Divide by 4. What is the result?"
    assert parse_question(p["question"]) == (47, [("+", 38), ("*", 3), ("-", 59)])
    assert parse_question("What is 2 + 2?") is None

def test_make_problem_invariants():
    rng = random.Random(0)
    for cfg in (TaskConfig(), TaskConfig(ops="+-*/", n_steps=6, min_steps=2, max_value=500),
                TaskConfig(ops="*", n_steps=2, start_max=9), TaskConfig(ops="-", n_steps=4)):
        lengths = set()
        for _ in range(200):
            p = make_problem(rng, cfg)
            lengths.add(len(p["ops"]))
            v = p["start"]
            assert 1 <= v <= cfg.start_max
            for op, b in p["ops"]:
                assert op in cfg.ops
                if op in "*/":
                    assert 2 <= b <= cfg.mul_max
                else:
                    assert 1 <= b <= cfg.max_operand
                assert op != "/" or v % b == 0                      # exact division only
                v = {"+": v + b, "-": v - b, "*": v * b, "/": v // b}[op]
                assert 0 <= v <= cfg.max_value                     # no negatives, bounded
            assert p["answer"] == str(v)
            assert extract_answer(p["solution"]) == p["answer"]
            assert coat_grammar_ok(p["solution"])
            assert check_steps(p, solution_steps(p["solution"])) is None
            assert parse_question(p["question"]) == (p["start"], p["ops"])
        assert lengths == set(range(cfg.min_steps or cfg.n_steps, cfg.n_steps + 1))

def test_make_problem_bad_config():
    with pytest.raises(ValueError):
        make_problem(random.Random(0), TaskConfig(ops="+x"))
    with pytest.raises(ValueError):
        make_problem(random.Random(0), TaskConfig(ops="/", mul_max=1))

@pytest.mark.parametrize("line,want", [
    ("Step 2: 85 * 3 = 255.", (85, "*", 3, 255)),
    ("Step 10: 5 - 9 = -4", (5, "-", 9, -4)),
    ("  12 + 3 = 15 ", (12, "+", 3, 15)),
    ("Step 1: 8 / 4 = 2.", (8, "/", 4, 2)),
    ("The answer is \\boxed{2}.", None),
    ("Step 1: 8 / 4 = two.", None),
    ("Step 1: 8 / 4", None),
])
def test_parse_step(line, want):
    assert parse_step(line) == want

def test_check_steps_finds_first_wrong_step():
    p = problem_from(47, [("+", 38), ("*", 3), ("-", 59)])
    ok = ["Step 1: 47 + 38 = 85.", "Step 2: 85 * 3 = 255.", "Step 3: 255 - 59 = 196."]
    assert solution_steps(p["solution"]) == ok
    assert check_steps(p, ok) is None
    assert check_steps({"question": p["question"]}, ok) is None          # from the question text
    assert check_steps(p, [parse_step(s) for s in ok]) is None            # parsed tuples work too
    cases = [
        (["Step 1: 47 + 38 = 84.", ok[1], ok[2]], 0),                      # arithmetic slip
        ([ok[0], "Step 2: 85 * 3 = 245.", "Step 3: 245 - 59 = 186."], 1),  # error carried forward
        ([ok[0], "Step 2: 85 * 4 = 340.", "Step 3: 340 - 59 = 281."], 1),  # wrong operand
        ([ok[0], "Step 2: 85 + 3 = 88.", "Step 3: 88 - 59 = 29."], 1),     # wrong operation
        ([ok[0], ok[1], "Step 3: 254 - 59 = 195."], 2),                    # not the previous result
        ([ok[0], ok[1], "Step 3: 255 - 59 = 196 maybe"], 2),               # unparsable
        ([ok[0], ok[2], ok[1]], 1),                                        # out of order
        (["Step 1: 38 + 47 = 85.", ok[1], ok[2]], 0),                      # operands swapped
        ([ok[0], ok[1]], 2),                                               # missing last step
        ([], 0),
        (ok + ["Step 4: 196 + 1 = 197."], 3),                              # extra step
        ([ok[0], None, ok[2]], 1),
    ]
    for steps, want in cases:
        assert check_steps(p, steps) == want, steps

def test_split_disjoint_deterministic_and_seeded():
    cfg = TaskConfig()
    tr, te = builtin_split(cfg, 300, 60, seed=0)
    assert len(tr) == 300 and len(te) == 60
    ktr, kte = {problem_key(p) for p in tr}, {problem_key(p) for p in te}
    assert len(ktr) == 300 and len(kte) == 60                     # deduplicated
    assert not ktr & kte                                           # disjoint
    assert not {p["question"] for p in tr} & {p["question"] for p in te}
    assert all(is_test(p, cfg) for p in te) and not any(is_test(p, cfg) for p in tr)
    tr2, te2 = builtin_split(cfg, 300, 60, seed=0)
    assert tr2 == tr and te2 == te                                 # deterministic
    tr3, te3 = builtin_split(cfg, 300, 60, seed=1)
    assert [p["question"] for p in tr3] != [p["question"] for p in tr]   # seeds differ
    k3tr, k3te = {problem_key(p) for p in tr3}, {problem_key(p) for p in te3}
    assert not k3tr & kte and not ktr & k3te                       # disjoint across seeds too
    frac = sum(is_test(make_problem(random.Random(i), cfg), cfg) for i in range(2000)) / 2000
    assert 0.07 < frac < 0.13                                      # test_fraction = 0.1

def test_split_fails_loudly_on_a_tiny_space():
    cfg = TaskConfig(n_steps=1, ops="+", start_max=2, max_operand=2)   # only 4 problems exist
    with pytest.raises(ValueError, match="too small"):
        builtin_split(cfg, 10, 10, seed=0)

# -----------------------------------------------------------------------------
# what a base is pretrained on, whatever the source format

def test_solution_text_always_ends_in_a_boxed_answer(tmp_path):
    from data import solution_text
    p = _write(tmp_path, [
        json.dumps({"question": "1+1?", "answer": "2"}),
        json.dumps({"question": "Tom?", "answer": "He has 3 + 4 = <<3+4=7>>7 apples.\nSo 7.\n#### 7"}),
        json.dumps({"problem": "Half?", "solution": "It is $\\boxed{\\frac{1}{2}}$."}),
        json.dumps({"question": "6*7?", "answer": 42, "solution": "Six sevens are 42."}),
    ])
    texts = [solution_text(r) for r in load_jsonl(p)]
    assert texts == ["The answer is \\boxed{2}.",
                     "He has 3 + 4 = 7 apples.\nSo 7.\nThe answer is \\boxed{7}.",   # calculator notes dropped
                     "It is $\\boxed{\\frac{1}{2}}$.",
                     "Six sevens are 42.\nThe answer is \\boxed{42}."]
    assert [extract_answer(t) for t in texts] == ["2", "7", "\\frac{1}{2}", "42"]
    built_in = make_problem(random.Random(0))
    assert solution_text(built_in) == built_in["solution"]


# -----------------------------------------------------------------------------
# a user's demonstrations

def test_load_demos_formats(tmp_path):
    from data import load_demos
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4 <|reflect|> \\boxed{4}"}]
    p = _write(tmp_path, [
        json.dumps({"question": "1+1?", "response": "\\boxed{2}", "answer": "2", "type": "verify"}),
        json.dumps({"prompt": "3+3?", "completion": "\\boxed{6}"}),
        json.dumps({"messages": msgs}),
    ])
    recs = load_demos(p)
    assert [(r["question"], r["response"], r["type"]) for r in recs] == [
        ("1+1?", "\\boxed{2}", "verify"), ("3+3?", "\\boxed{6}", "user"), ("2+2?", "4 <|reflect|> \\boxed{4}", "user")]
    assert recs[0]["answer"] == "2" and "messages" not in recs[2]


@pytest.mark.parametrize("obj,words", [
    ({"question": "q"}, "expected string fields 'question' (or 'prompt') and 'response'"),
    ({"prompt": "q", "response": " "}, "expected a non-empty question and response"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]}, "got roles ['system', 'user', 'assistant']"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]}, "string 'content'"),
])
def test_load_demos_errors_name_path_and_line(tmp_path, obj, words):
    from data import load_demos
    p = _write(tmp_path, [json.dumps({"question": "ok", "response": "fine"}), json.dumps(obj)])
    with pytest.raises(ValueError) as e:
        load_demos(p)
    assert str(e.value).startswith(f"{p}:2: ") and words in str(e.value)


def test_n_test_adapts_to_the_data(tmp_path):
    from config import Config
    from data import load_problems, n_test
    assert n_test(Config()) == 1000 and n_test(Config(n_test=7)) == 7
    p = _write(tmp_path, [json.dumps({"question": f"q{i}", "answer": str(i)}) for i in range(45)])
    t = _write(tmp_path, [json.dumps({"question": f"t{i}", "answer": str(i)}) for i in range(30)], "t.jsonl")
    tr, te, _ = load_problems(Config(data=str(p)))
    assert (len(tr), len(te)) == (41, 4)                     # a tenth held out
    assert {r["question"] for r in tr}.isdisjoint(r["question"] for r in te)
    assert len(load_problems(Config(data=str(p), test_data=str(t)))[1]) == 30        # all of --test_data
    assert len(load_problems(Config(data=str(p), test_data=str(t), n_test=5))[1]) == 5
    one = _write(tmp_path, [json.dumps({"question": "q", "answer": "1"})], "one.jsonl")
    with pytest.raises(SystemExit, match=r"1 problems, and 1 \(a tenth, at least 1\) of them are held out"):
        load_problems(Config(data=str(one)))
    with pytest.raises(SystemExit, match=f"--n_test=31: --test_data={t} has 30 problems"):
        load_problems(Config(data=str(p), test_data=str(t), n_test=31))
