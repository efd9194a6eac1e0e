"""The countdown task: a search whose check is one comparison.

    Use 3, 7 and 8, each once, with + - * to make 29.

Three numbers are given. An attempt combines two of them, then the result with the third; it is
checked against the target, and a failed attempt is followed by another. Worked solutions (the
pretraining corpus) are honest search traces: every value is computed, never copied from the
question, failed attempts included:
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
from itertools import combinations_with_replacement


@dataclass
class CountdownConfig:
    max_number: int = 13         # each in [1, max_number]: 5,481 problems in all
    ops: str = "+-*"
    max_target: int = 150        # targets in [1, max_target], reachable by construction
    fail_rate: float = 0.6       # a worked solution's attempts each fail with this chance, independently,
    max_failed: int = 12         # up to this many: no position in a trace says "this one is right"
    order: str = "cycle"         # the failed attempts of a trace: "cycle" (attempts()' order) or "random"
    test_fraction: float = 0.2   # share of the problems held out for testing, by hash: ~1,100
    dev_fraction: float = 0.1    # and for choosing recipes (never trained on either): ~550
    split_salt: str = "nanosatori-countdown-v1"


def apply(a, op, b):
    return a + b if op == "+" else a - b if op == "-" else a * b


# -----------------------------------------------------------------------------
# attempts: ((a, op, b, v), (left, op, right, w), v is left) for three numbers, all enumerated

def attempts(numbers, ops="+-*"):
    """Every attempt on three numbers, each once, in a fixed order: the pairs in the question's order,
    then the first operation, then the second (values never negative; a - b is the larger minus the
    smaller) -> [(step1, step2, inner_left)], each step (left, op, right, value); inner_left: the
    first step's value is step 2's left operand. A search trace walks this order (search_trace)."""
    out, seen = [], set()
    for i, j, k in ((0, 1, 2), (0, 2, 1), (1, 2, 0)):
        for op1 in ops:
            a, b, c = numbers[i], numbers[j], numbers[k]
            if op1 == "-" and a < b:
                a, b = b, a
            v = apply(a, op1, b)
            for op2 in ops:
                for inner_left in (True, False):
                    left, right = (v, c) if inner_left else (c, v)
                    if (op2 in "+*" and not inner_left) or (op2 == "-" and left < right):
                        continue
                    t = ((a, op1, b, v), (left, op2, right, apply(left, op2, right)), inner_left)
                    lines = (step_line(t[0]), step_line(t[1]))
                    if lines not in seen:          # a number given twice (or v - c with v = c) makes twins
                        seen.add(lines)
                        out.append(t)
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


def numbers_target(problem):
    """(numbers, target) of a countdown problem, from its fields or parsed from its question; None
    for any other problem."""
    if "numbers" in problem and "target" in problem:
        return list(problem["numbers"]), int(problem["target"])
    return parse_question(problem.get("question", ""))


def is_countdown(problem):
    return numbers_target(problem) is not None


def make_problem(rng, cfg=None):
    """One problem: numbers drawn uniformly, the target the value of a random attempt in range."""
    cfg = cfg or CountdownConfig()
    while True:
        numbers = [rng.randint(1, cfg.max_number) for _ in range(3)]
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


def side(problem, cfg=None):
    """"test", "dev" or "train": a fixed partition of the problem space by a hash of (sorted numbers,
    target); no seed changes it. Dev problems are never trained on either: recipes are chosen on
    them (--heldout=dev), so the test problems stay unseen until a recipe is fixed."""
    cfg = cfg or CountdownConfig()
    h = hashlib.sha256(f"{cfg.split_salt}|{problem_key(problem)}".encode()).digest()
    u = int.from_bytes(h[:8], "big") / 2 ** 64
    return "test" if u < cfg.test_fraction else "dev" if u < cfg.test_fraction + cfg.dev_fraction else "train"


def space(cfg):
    """Every problem of the task as (sorted numbers, target): each multiset of numbers with each
    target in range that an attempt reaches."""
    out = []
    for nums in combinations_with_replacement(range(1, cfg.max_number + 1), 3):
        out += [(list(nums), t) for t in sorted({a[1][3] for a in attempts(nums, cfg.ops)}) if 1 <= t <= cfg.max_target]
    return out


def split(cfg=None, n_train=1000, n_test=100, seed=0, heldout="test"):
    """(train, held-out): up to n_train problems of the train side and n_test of the `heldout` side
    ("test" or "dev") of the fixed partition (all of a side when it holds fewer), in an order and with
    number orders drawn from the seed."""
    cfg = cfg or CountdownConfig()
    rng = random.Random(seed)
    sides = {"train": [], "dev": [], "test": []}
    for nums, target in space(cfg):
        sides[side({"numbers": nums, "target": target}, cfg)].append((nums, target))
    out = []
    for name, n in (("train", n_train), (heldout, n_test)):
        rng.shuffle(sides[name])
        problems = []
        for nums, target in sides[name][:n]:
            nums = rng.sample(nums, len(nums))             # the order the question gives them in
            problems.append(problem_from(nums, target, cfg, random.Random(rng.random())))
        out.append(problems)
    return out[0], out[1]


# -----------------------------------------------------------------------------
# worked solutions: honest search traces

def search_trace(numbers, target, cfg, rng):
    """(solution text, answer expression): failed attempts, each checked against the target, then a
    right one. Their number is geometric (each attempt fails with chance fail_rate), so a comparison's
    verdict never follows from how many came before: with 0..4 failures drawn uniformly a model
    learns that the fifth comparison says yes.
    order "cycle": the attempts follow attempts()' order from a random start, wrapping round, so the
    next attempt is a function of the last one and a greedy decoder has a next attempt to take other
    than the one it just wrote. order "random": failed attempts half drawn at random, half the ones
    closest to the target; each next attempt is a near-even choice, which a greedy decoder breaks by
    copying the last attempt, and so loops."""
    every = attempts(numbers, cfg.ops)
    right = [t for t in every if t[1][3] == target]
    wrong = [t for t in every if t[1][3] != target]
    n_failed = 0
    while n_failed < min(cfg.max_failed, len(wrong)) and rng.random() < cfg.fail_rate:
        n_failed += 1
    if cfg.order == "cycle":
        hits = [i for i, t in enumerate(every) if t[1][3] == target]
        gaps = {i: (i - h - 1) % len(every) for i, h in zip(hits, hits[-1:] + hits[:-1])}   # misses since the hit before
        n_failed = min(n_failed, max(gaps.values()))        # many right attempts leave short runs of wrong ones
        end = rng.choice([i for i in hits if gaps[i] >= n_failed])
        failed = [every[(end - n_failed + m) % len(every)] for m in range(n_failed)]
        last = every[end]
    else:
        if rng.random() < 0.5:
            failed = rng.sample(wrong, n_failed)
        else:
            failed = sorted(wrong, key=lambda t: (abs(t[1][3] - target), rng.random()))[:n_failed][::-1]
        last = rng.choice(right)
    lines = []
    for t in failed + [last]:
        lines += [step_line(t[0]), step_line(t[1]), check_line(t[1][3], target)]
    answer = expression(last)
    return "\n".join(lines + [f"The answer is \\boxed{{{answer}}}."]), answer


def with_traces(problems, copies, cfg=None, seed=0):
    """Each problem `copies` times, each with its own search trace: a pretraining corpus in which an
    operation is seen in many attempts rather than one trace seen many times."""
    cfg, rng = cfg or CountdownConfig(), random.Random(seed)
    out = []
    for p in problems:
        out.append(p)
        for _ in range(copies - 1):
            solution, answer = search_trace(p["numbers"], p["target"], cfg, rng)
            out.append(dict(p, solution=solution, answer=answer))
    return out


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


# -----------------------------------------------------------------------------
# the exact critic of COAT synthesis: the first line of a trace that is not honest

_OP = re.compile(r"(\d+) ([-+*]) (\d+) = (-?\d+)\.")
_CHECK = re.compile(r"(-?\d+) vs (\d+): (yes|no)\.")
_ANSWER = re.compile(r"The answer is \\boxed\{([^{}]*)\}\.")


def _best_op(pool, target, ops="+-*"):
    """The operation on two numbers of pool that a right attempt starts with (pool: the problem's
    numbers), or, with two numbers left, the one whose result is closest to the target."""
    if len(pool) == 3:
        return next(t[0] for t in attempts(pool, ops) if t[1][3] == target)
    a, b = max(pool), min(pool)
    return min(((x, op, y, apply(x, op, y)) for op in ops for x, y in ((a, b), (b, a))
                if not (op == "-" and x < y)), key=lambda s: abs(s[3] - target))


def critic(problem, steps):
    """None when the lines are an honest search ending in a right answer; else (k, reflection, hint)
    as coat.py's critics give them: line k is the first that is not honest (an operation on numbers
    the attempt does not hold, or with a wrong result; a comparison of another value, or with a
    wrong verdict; an answer before the target was made, or one that does not make it; nothing
    where a line is due). The reflection is a re-check, or the comparison that was due; the hint,
    the line to go on from. In COAT an attempt's comparison is its <|reflect|> step (coat_tags)."""
    numbers, target = numbers_target(problem)
    pool, ops = list(numbers), []                      # the attempt's numbers left, its operations
    fresh = step_line(_best_op(numbers, target))

    def due():                                         # (reflection, hint) for the line that is due
        if len(ops) == 2:                              # the comparison, kept in the chain: it is honest
            v = ops[1][3]
            return f"Check: {v} is {'' if v == target else 'not '}{target}.", check_line(v, target)
        return f"Check: {target} is not made yet.", step_line(_best_op(pool, target)) if ops else fresh

    def answer():
        inner_left = ops[1][0] == ops[0][3]
        return f"The answer is \\boxed{{{expression((*ops, inner_left))}}}."

    for k, line in enumerate(steps):
        op, check = _OP.fullmatch(line), _CHECK.fullmatch(line)
        if op and len(ops) < 2:
            a, sign, b, v = int(op[1]), op[2], int(op[3]), int(op[4])
            rest = list(pool)
            if a in rest:
                rest.remove(a)
            if a not in pool or b not in rest:
                left = ", ".join(map(str, pool[:-1])) + f" and {pool[-1]}"
                return k, f"Check: {a} {sign} {b} does not use the numbers left, {left}.", due()[1]
            if apply(a, sign, b) != v:
                return k, f"Check: {a} {sign} {b} = {apply(a, sign, b)}, not {v}.", f"{a} {sign} {b} = {apply(a, sign, b)}."
            rest.remove(b)
            pool, ops = rest + [v], ops + [(a, sign, b, v)]
        elif check and len(ops) == 2 and line == check_line(ops[1][3], target):
            if ops[1][3] != target:
                pool, ops = list(numbers), []          # a failed attempt: the next one starts afresh
                continue
            ans = _ANSWER.fullmatch(steps[k + 1].strip()) if k + 1 < len(steps) else None
            if ans and check_answer(ans[1], numbers, target) and k + 2 == len(steps):
                return None
            return k + 1, f"Check: {target} was made, so the answer is that attempt.", answer()
        else:
            return (k, *due())
    return (len(steps), *due())


def verifier(problem, j, step):
    """A <|reflect|> step re-checking operation line `step` (its index j unused: a line says all it
    needs), or None when the line is not a right operation (a check never vouches for a wrong one)."""
    op = _OP.fullmatch(step)
    if op is None or apply(int(op[1]), op[2], int(op[3])) != int(op[4]):
        return None
    return f"Check: {op[1]} {op[2]} {op[3]} = {op[4]}. It is right."


def honest(line, problem):
    """False for a line that states something false: an operation with a wrong result, a comparison
    with the wrong target or verdict, an answer that does not make the target, or a line that is
    none of these (a sampled "29 vs 29: yes.0 + 3 = 4."). The critic's reflections ("Check: ...")
    are true by construction. Format tuning learns the reflections on false lines, not them."""
    (numbers, target), line = numbers_target(problem), line.strip()
    op, check, answer = _OP.fullmatch(line), _CHECK.fullmatch(line), _ANSWER.fullmatch(line)
    if op:
        return apply(int(op[1]), op[2], int(op[3])) == int(op[4])
    if check:
        return line == check_line(int(check[1]), target) and int(check[2]) == target
    if answer:
        return check_answer(answer[1], numbers, target)
    return line.startswith("Check: ")


# -----------------------------------------------------------------------------
# COAT on this task: the comparison is the reflection, the next attempt the exploration

_RESTATED = re.compile(r"Check: -?\d+ is (not )?\d+\.")      # the critic on a comparison (critic's due())


def coat_items(items, reflect, explore):
    """The COAT steps of a synthesised trajectory, items [(meta, text, chain index or None for a
    critic's reflection)]: each comparison becomes a <|reflect|> step and the first line after a
    failed one an <|explore|> step. A critic's reflection on a comparison gives way to the honest
    comparison that follows it (its hint), which says the same."""
    out = []
    for i, (meta, text, idx) in enumerate(items):
        nxt = items[i + 1][1] if i + 1 < len(items) else ""
        if meta == reflect and idx is None and _RESTATED.fullmatch(text) and _CHECK.fullmatch(nxt):
            continue
        if _CHECK.fullmatch(text) and out:
            meta = reflect
        elif out and out[-1][1].endswith(": no.") and _CHECK.fullmatch(out[-1][1]):
            meta = explore
        out.append((meta, text, idx))
    return out


def coat_type(items, reflect, explore):
    """Satori's type of a countdown trajectory: explorations are corrections (a failed attempt
    redone, or a critic's fix); reflections that are not followed by one are verifications."""
    fixes = sum(m == explore for m, _, _ in items)
    checks = sum(m == reflect for m, _, _ in items) - fixes
    if fixes == 0:
        return "verify" if checks else "no_reflect"
    if fixes == 1:
        return "verify_correct" if any(m == reflect and t.endswith("It is right.") for m, t, _ in items) \
            else "correct_once"
    return "correct_twice"


def right_before(lines, problem):
    """Had the lines before a response's first reflection made the target honestly? The state that
    self-correction metrics start from: a first attempt that failed, or one that succeeded; None
    when no attempt was complete (a re-check of its first operation)."""
    ops = [_OP.fullmatch(l) for l in lines if _OP.fullmatch(l)]
    if len(ops) < 2:
        return None
    return all(honest(l, problem) for l in lines) and int(ops[-1][4]) == numbers_target(problem)[1]
