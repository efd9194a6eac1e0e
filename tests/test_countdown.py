"""countdown.py: the grader (a parser, never eval), the problems, the honest search traces, the split."""
import itertools
import random
import time

import countdown as C
import reward


def test_grader_answers_right_and_wrong():
    nums, target = [3, 7, 8], 29
    for text in ("(3 * 7) + 8", "3*7+8", "8 + 7 * 3", "((3) * 7) + (8)", " 7 * 3 + 8 "):
        assert C.check_answer(text, nums, target), text
    for text in ("3 * 8 + 7",          # 31: the wrong value
                 "3 * 7 + 9",          # a number not given
                 "3 * 7 + 7",          # 7 twice, 8 never
                 "3 * 7 + 8 + 0",      # a number too many
                 "3 * 7",              # too few
                 "29",                 # the target itself
                 "(3 * 7 + 8", "3 * 7) + 8", "()", "3 * (7 + 8))",        # unbalanced brackets
                 "8 / 0 + 21", "3 * 7 + 8 / 1", "3 ** 7", "-3 + 32", "3 * 7 + 8 =", "x", "", "\\frac{1}{2}"):
        assert not C.check_answer(text, nums, target), text


def test_grader_is_fast_and_never_raises_on_long_input():
    for text in ("(" * 10_000, "1+" * 5_000 + "1", "9" * 10_000, ")" * 10_000, "(" * 60 + "1" + ")" * 60, "(" * 45 + "6" + ")" * 45):
        t0 = time.perf_counter()
        assert C.check_answer(text, [1, 2, 3], 6) is False
        assert time.perf_counter() - t0 < 0.01


def brute_force(numbers, ops="+-*"):
    """Every value of every expression tree over the numbers, each once, intermediate values >= 0."""
    if len(numbers) == 1:
        return {numbers[0]}
    out = set()
    for i, j in itertools.permutations(range(len(numbers)), 2):
        rest = [n for k, n in enumerate(numbers) if k not in (i, j)]
        for op in ops:
            v = C.apply(numbers[i], op, numbers[j])
            if v >= 0:
                out |= brute_force(rest + [v], ops)
    return out


def test_attempts_reach_every_value_an_expression_can():
    rng = random.Random(0)
    for _ in range(50):
        nums = [rng.randint(1, 12) for _ in range(3)]
        tries = C.attempts(nums)
        assert {t[1][3] for t in tries} == brute_force(nums), nums
        for t in tries:        # each attempt's expression is a right answer for its own value
            assert C.check_answer(C.expression(t), nums, t[1][3]), t


def test_problems_and_their_search_traces_are_honest():
    rng = random.Random(1)
    cfg = C.CountdownConfig()
    failed = []
    for _ in range(200):
        p = C.make_problem(rng, cfg)
        assert 1 <= p["target"] <= cfg.max_target and all(1 <= n <= cfg.max_number for n in p["numbers"])
        assert C.parse_question(p["question"]) == (p["numbers"], p["target"])
        assert C.check_answer(p["answer"], p["numbers"], p["target"])
        assert reward.grade(p["solution"], p) is True and reward.grade(p["solution"], {**p, "target": 0}) is False
        lines = p["solution"].split("\n")
        assert lines[-1] == f"The answer is \\boxed{{{p['answer']}}}."
        attempts = [lines[i:i + 3] for i in range(0, len(lines) - 1, 3)]
        for k, (s1, s2, check) in enumerate(attempts):
            a, op, b, v = s1.rstrip(".").replace("=", " ").split()
            assert C.apply(int(a), op, int(b)) == int(v)                   # every value computed
            x, op2, y, w = s2.rstrip(".").replace("=", " ").split()
            assert C.apply(int(x), op2, int(y)) == int(w) and v in (x, y)   # from the first result
            assert sorted([int(a), int(b), int(x) if y == v else int(y)]) == sorted(p["numbers"])
            assert check == f"{w} vs {p['target']}: {'yes' if int(w) == p['target'] else 'no'}."
            assert (int(w) == p["target"]) == (k == len(attempts) - 1)     # the last attempt alone is right
        failed.append(len(attempts) - 1)
    assert set(range(4)) <= set(failed) and max(failed) <= cfg.max_failed


def test_a_trace_s_length_does_not_give_its_verdict_away():
    """Reaching the k-th comparison leaves the same chance that it says yes, for every k: a base
    must compare to know, not count attempts."""
    cfg, rng = C.CountdownConfig(), random.Random(0)
    failed = [C.search_trace([3, 7, 8], 29, cfg, rng)[0].count(": no.") for _ in range(4000)]
    for k in range(4):
        reached = [f for f in failed if f >= k]
        assert abs(sum(f == k for f in reached) / len(reached) - (1 - cfg.fail_rate)) < 0.07, k


def test_a_trace_walks_the_fixed_order_and_never_repeats_an_attempt():
    """order "cycle": each attempt is the one after the last in attempts()' order (wrapping round),
    so the next attempt follows from the last; order "random" draws them without that order."""
    rng = random.Random(3)
    follows = {"cycle": [], "random": []}
    for order in follows:
        cfg = C.CountdownConfig(order=order)
        for _ in range(300):
            p = C.make_problem(rng, cfg)
            every = [C.expression(t) for t in C.attempts(p["numbers"])]
            assert len(set(every)) == len(every)
            lines = p["solution"].split("\n")[:-1]
            tried = []
            for s1, s2, _ in (lines[i:i + 3] for i in range(0, len(lines), 3)):
                a, op, b, v = s1.rstrip(".").replace("=", " ").split()
                x, op2, y, _ = s2.rstrip(".").replace("=", " ").split()
                inner = f"({a} {op} {b})"
                tried.append(f"{inner} {op2} {y}" if x == v else f"{x} {op2} {inner}")
            assert len(set(tried)) == len(tried) and set(tried) <= set(every)
            at = [every.index(e) for e in tried]
            follows[order] += [(j - i) % len(every) == 1 for i, j in zip(at, at[1:])]
    assert follows["cycle"] and all(follows["cycle"])
    assert sum(follows["random"]) < 0.2 * len(follows["random"])


def test_split_is_by_hash_and_deterministic():
    train, test = C.split(n_train=300, n_test=60, seed=0)
    assert not {C.problem_key(p) for p in train} & {C.problem_key(p) for p in test}
    assert all(C.side(p) == "test" for p in test) and all(C.side(p) == "train" for p in train)
    dev_train, dev = C.split(n_train=300, n_test=60, seed=0, heldout="dev")
    assert all(C.side(p) == "dev" for p in dev) and [p["question"] for p in dev_train] == [p["question"] for p in train]
    again, _ = C.split(n_train=300, n_test=60, seed=0)
    assert [p["question"] for p in again] == [p["question"] for p in train]
    other, other_test = C.split(n_train=300, n_test=60, seed=1)
    assert [p["question"] for p in other] != [p["question"] for p in train]
    assert not {C.problem_key(p) for p in other} & {C.problem_key(p) for p in test}


P = {"numbers": [3, 7, 8], "target": 29}


def test_critic_accepts_every_honest_trace():
    rng = random.Random(2)
    for _ in range(200):
        p = C.make_problem(rng)
        assert C.critic(p, p["solution"].split("\n")) is None, p["solution"]


def test_critic_finds_the_first_dishonest_line():
    fail = ["8 * 3 = 24.", "24 + 7 = 31.", "31 vs 29: no."]
    win = ["3 * 7 = 21.", "21 + 8 = 29.", "29 vs 29: yes.", "The answer is \\boxed{(3 * 7) + 8}."]
    assert C.critic(P, fail + win) is None
    k, why, hint = C.critic(P, ["8 * 3 = 23."] + fail[1:] + win)                # wrong arithmetic
    assert (k, why, hint) == (0, "Check: 8 * 3 = 24, not 23.", "8 * 3 = 24.")
    k, why, hint = C.critic(P, fail[:2] + ["31 vs 29: yes.", "The answer is \\boxed{(8 * 3) + 7}."])  # a false yes
    assert (k, why, hint) == (2, "Check: 31 is not 29.", "31 vs 29: no.")
    k, why, hint = C.critic(P, win[:2] + ["29 vs 29: no."])                     # a false no
    assert (k, why, hint) == (2, "Check: 29 is 29.", "29 vs 29: yes.")
    assert C.critic(P, win[:3] + ["The answer is \\boxed{31}."])[2] == win[3]   # the answer of that attempt
    k, why, _ = C.critic(P, ["8 * 8 = 64."])                                    # a number used twice
    assert k == 0 and "does not use the numbers left, 3, 7 and 8" in why
    k, why, _ = C.critic(P, ["3 * 7 = 21.", "21 + 9 = 30."])                    # a number not given
    assert k == 1 and "8 and 21" in why
    assert C.critic(P, fail + ["The answer is \\boxed{(8 * 3) + 7}."])[:2] == (3, "Check: 29 is not made yet.")
    assert C.critic(P, fail[:2] + ["3 * 7 = 21."])[::2] == (2, "31 vs 29: no.")          # no comparison
    assert C.critic(P, win[:3] + ["The answer is \\boxed{(8 * 3) + 7}."])[0] == 3       # not the attempt
    assert C.critic(P, fail)[0] == 3 and C.critic(P, [])[0] == 0                         # no answer yet
    # following the hints from any line on ends in an honest solution
    for bad in (["8 * 3 = 23."], fail[:2] + ["31 vs 29: yes."], ["8 * 8 = 64."], fail + ["x"]):
        steps = bad
        for _ in range(12):
            verdict = C.critic(P, steps)
            if verdict is None:
                break
            k, why, hint = verdict
            steps = steps[:k] + [hint]
        assert verdict is None, steps


def test_pretraining_copies_are_different_honest_searches():
    problems = C.split(n_train=20, n_test=0, seed=0)[0]
    corpus = C.with_traces(problems, 5, seed=0)
    assert len(corpus) == 100 and corpus[::5] == problems
    for i, p in enumerate(problems):
        copies = corpus[5 * i:5 * i + 5]
        assert all(c["question"] == p["question"] and C.critic(c, c["solution"].split("\n")) is None for c in copies)
        assert len({c["solution"] for c in copies}) > 1


def test_tiny_countdown_pipeline(tmp_path):
    """--task=countdown through pretrain, format tuning on a demonstration, the ORM, RL and eval on a
    toy scale (a random model solves nothing, so distillation has nothing to distil)."""
    import json
    import os
    import train
    from test_train import TINY
    demo = ("8 * 3 = 24.\n<|continue|>24 + 7 = 31.\n<|reflect|>31 vs 29: no.\n<|explore|>3 * 7 = 21.\n"
            "<|continue|>21 + 8 = 29.\n<|reflect|>29 vs 29: yes.\n<|continue|>The answer is \\boxed{(3 * 7) + 8}.")
    (tmp_path / "demos.jsonl").write_text(json.dumps({"question": C.question_of([3, 7, 8], 29), "response": demo}) + "\n")
    out = str(tmp_path / "run")
    train.main([f"--out={out}", "--task=countdown", "--base=", f"--demos={tmp_path / 'demos.jsonl'}",
                "--stages=pretrain,synthesize,sft,orm,rl,eval", "--whole_numbers", "--rae_questions=4",
                "--rae_group=2", "--rl_batch=4", "--minibatch_size=2", "--micro_batch=1", "--rl_max_new_tokens=8",
                "--rl_steps=2", "--heldout=dev"] + TINY)
    res = json.load(open(os.path.join(out, "results.json")))
    assert [r["name"] for r in res["stages"]] == ["base", "format_tuned", "rl_round1"] and res["stages"][0]["n"] == 4
    rows = [json.loads(l) for l in open(os.path.join(out, "responses.jsonl"))]
    held = [C.parse_question(r["question"]) for r in rows]
    assert all(C.side({"numbers": nums, "target": t}) == "dev" for nums, t in held)     # scored on dev


def test_self_correction_starts_from_the_first_attempt():
    from eval import reflect_start_state, score_responses
    q = {"question": C.question_of([3, 7, 8], 29)}
    fail = "8 * 3 = 24.\n<|continue|>24 + 7 = 31.\n<|reflect|>31 vs 29: no.\n<|explore|>"
    win = "3 * 7 = 21.\n<|continue|>21 + 8 = 29.\n<|reflect|>29 vs 29: yes.\n<|continue|>The answer is \\boxed{(3 * 7) + 8}."
    lie = "8 * 3 = 24.\n<|continue|>24 + 7 = 29.\n<|reflect|>29 vs 29: yes.\n<|continue|>The answer is \\boxed{(8 * 3) + 7}."
    assert reflect_start_state(fail + win, q) is False and reflect_start_state(win, q) is True
    assert reflect_start_state(lie, q) is False                    # made "29" only by a false sum
    assert reflect_start_state("3 * 7 = 21.\n<|reflect|>Check: 3 * 7 = 21. It is right.\n<|continue|>", q) is None
    m = score_responses([fail + win, win, lie], [q] * 3)
    assert m["pass_at_1"] == 2 / 3 and m["wrong_to_right"] == 1.0 and m["right_to_wrong"] == 0.0
