"""The countdown task: a search whose check is one comparison.

    Use 3, 7 and 8, each once, with + - * to make 29.

An attempt combines two of the numbers, then the result with the third; it is checked against the
target, and a failed attempt is followed by another. Worked solutions (the pretraining corpus) are
honest search traces: every value is computed, never copied from the question, failed attempts
included:
    8 * 3 = 24.
    24 + 7 = 31.
    31 vs 29: no.
    3 * 7 = 21.
    21 + 8 = 29.
    29 vs 29: yes.
    The answer is \\boxed{(3 * 7) + 8}.
The answer is an expression; check_answer parses it (a small parser, never eval) and checks that it
uses the given numbers, each once, and equals the target.

    from countdown import CountdownConfig, make_problem, check_answer
    p = make_problem(random.Random(0))        # {"question", "answer", "numbers", "target", "solution"}
    check_answer("(3 * 7) + 8", p["numbers"], p["target"])
"""
import hashlib
import random
import re
from collections import Counter
from dataclasses import dataclass
from itertools import permutations


@dataclass
class CountdownConfig:
    n_numbers: int = 3           # numbers given (an attempt is n_numbers - 1 operations)
    max_number: int = 12         # each in [1, max_number]
    ops: str = "+-*"
    max_target: int = 150        # targets in [1, max_target], reachable by construction
    max_failed: int = 4          # a worked solution shows 0..max_failed failed attempts before the right one
    test_fraction: float = 0.1   # share of the problem space held out for testing, by hash
    split_salt: str = "nanosatori-countdown-v1"


def apply(a, op, b):
    return a + b if op == "+" else a - b if op == "-" else a * b


# -----------------------------------------------------------------------------
# attempts: ((a, op, b, v), (left, op, right, w), v is left) for three numbers, all enumerated

def attempts(numbers, ops="+-*"):
    """Every attempt on three numbers: two of them combined, then the result with the third (on
    either side), values never negative -> [(step1, step2, inner_left)], each step (left, op, right,
    value); inner_left: the first step's value is step 2's left operand."""
    out = []
    for i, j, k in permutations(range(3)):
        a, b, c = numbers[i], numbers[j], numbers[k]
        for op1 in ops:
            if (op1 in "+*" and i > j) or (op1 == "-" and a < b):
                continue                                  # a + b and b + a are one attempt
            v = apply(a, op1, b)
            for op2 in ops:
                for inner_left in (True, False):
                    left, right = (v, c) if inner_left else (c, v)
                    if (op2 in "+*" and not inner_left) or (op2 == "-" and left < right):
                        continue
                    out.append(((a, op1, b, v), (left, op2, right, apply(left, op2, right)), inner_left))
    return out


def expression(attempt):
    """The \\boxed answer of an attempt: its first operation in brackets, e.g. "(3 * 7) + 8"."""
    (a, op1, b, _), (left, op2, right, _), inner_left = attempt
    inner = f"({a} {op1} {b})"
    return f"{inner} {op2} {right}" if inner_left else f"{left} {op2} {inner}"


def step_line(step):
    a, op, b, v = step
    return f"{a} {op} {b} = {v}."


def check_line(value, target):
    return f"{value} vs {target}: {'yes' if value == target else 'no'}."


# -----------------------------------------------------------------------------
# problems and the held-out split

def question_of(numbers, target, ops="+-*"):
    names = ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"
    return f"Use {names}, each once, with {' '.join(ops)} to make {target}."


_QUESTION = re.compile(r"Use ([\d, ]+) and (\d+), each once, with ([-+* ]+) to make (\d+)\.")


def parse_question(question):
    """(numbers, target) of a countdown question, or None for any other text."""
    m = _QUESTION.fullmatch(question.strip())
    if m is None:
        return None
    return [int(x) for x in m.group(1).split(",")] + [int(m.group(2))], int(m.group(4))


def is_countdown(problem):
    return "target" in problem and "numbers" in problem


def make_problem(rng, cfg=None):
    """One problem: numbers drawn uniformly, the target the value of a random attempt in range."""
    cfg = cfg or CountdownConfig()
    while True:
        numbers = [rng.randint(1, cfg.max_number) for _ in range(cfg.n_numbers)]
        good = [t for t in attempts(numbers, cfg.ops) if 1 <= t[1][3] <= cfg.max_target]
        if good:
            target = rng.choice(good)[1][3]
            return problem_from(numbers, target, cfg, rng)


def problem_from(numbers, target, cfg=None, rng=None):
    """The problem dict of numbers and a reachable target, with a worked solution (search_trace)."""
    cfg = cfg or CountdownConfig()
    rng = rng or random.Random(f"{numbers}|{target}")
    solution, answer = search_trace(numbers, target, cfg, rng)
    return dict(question=question_of(numbers, target, cfg.ops), answer=answer, solution=solution,
                numbers=list(numbers), target=target)


def problem_key(problem):
    return ",".join(map(str, sorted(problem["numbers"]))) + f"={problem['target']}"


def is_test(problem, cfg=None):
    """Fixed partition of the problem space by a hash of (sorted numbers, target): no seed changes it."""
    cfg = cfg or CountdownConfig()
    h = hashlib.sha256(f"{cfg.split_salt}|{problem_key(problem)}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64 < cfg.test_fraction


def split(cfg=None, n_train=1000, n_test=100, seed=0):
    """(train, test): distinct problems on each side of the fixed partition, deterministic for a seed."""
    cfg = cfg or CountdownConfig()
    rng, train, test, seen = random.Random(seed), [], [], set()
    for _ in range(1000 + 200 * (n_train + n_test)):
        if len(train) >= n_train and len(test) >= n_test:
            return train, test
        p = make_problem(rng, cfg)
        if problem_key(p) in seen:
            continue
        seen.add(problem_key(p))
        bucket, want = (test, n_test) if is_test(p, cfg) else (train, n_train)
        if len(bucket) < want:
            bucket.append(p)
    raise ValueError(f"could not draw {n_train} train + {n_test} test distinct countdown problems from {cfg}")


# -----------------------------------------------------------------------------
# worked solutions: honest search traces

def search_trace(numbers, target, cfg, rng):
    """(solution text, answer expression): 0..cfg.max_failed failed attempts, each checked against
    the target, then a right one. Failed attempts are half drawn at random, half the ones whose
    value comes closest to the target (a search a model can learn to order better)."""
    every = attempts(numbers, cfg.ops)
    right = [t for t in every if t[1][3] == target]
    wrong = [t for t in every if t[1][3] != target]
    n_failed = min(rng.randint(0, cfg.max_failed), len(wrong))
    if rng.random() < 0.5:
        failed = rng.sample(wrong, n_failed)
    else:
        failed = sorted(wrong, key=lambda t: (abs(t[1][3] - target), rng.random()))[:n_failed][::-1]
    lines = []
    for t in failed + [rng.choice(right)]:
        lines += [step_line(t[0]), step_line(t[1]), check_line(t[1][3], target)]
    answer = expression(t)
    return "\n".join(lines + [f"The answer is \\boxed{{{answer}}}."]), answer


# -----------------------------------------------------------------------------
# the grader: a small parser of + - * ( ) over integers, never eval

_TOKEN = re.compile(r"\s*(\d+|[-+*()])")
MAX_ANSWER = 100     # characters: longer answers are wrong without being parsed


def evaluate(text):
    """(value, numbers used) of an expression of integers, + - * and brackets, or None if it is not
    one. Exact integers; precedence as usual; no unary minus."""
    if len(text) > MAX_ANSWER:
        return None
    pos, tokens = 0, []
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            return None
        tokens.append(m.group(1))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    used = []

    def atom(i):
        if i < len(tokens) and tokens[i].isdigit():
            used.append(int(tokens[i]))
            return int(tokens[i]), i + 1
        if i < len(tokens) and tokens[i] == "(":
            v, i = expr(i + 1)
            if v is None or i >= len(tokens) or tokens[i] != ")":
                return None, i
            return v, i + 1
        return None, i

    def term(i):
        v, i = atom(i)
        while v is not None and i < len(tokens) and tokens[i] == "*":
            w, i = atom(i + 1)
            v = None if w is None else v * w
        return v, i

    def expr(i):
        v, i = term(i)
        while v is not None and i < len(tokens) and tokens[i] in "+-":
            op = tokens[i]
            w, i = term(i + 1)
            v = None if w is None else apply(v, op, w)
        return v, i

    value, end = expr(0)
    return None if value is None or end != len(tokens) else (value, used)


def check_answer(text, numbers, target):
    """Does the expression use exactly the given numbers (each once) and equal the target?"""
    got = evaluate(text)
    return got is not None and got[0] == target and Counter(got[1]) == Counter(numbers)
