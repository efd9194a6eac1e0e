"""Problems: JSONL datasets, the built-in arithmetic-chain task, and the problem sets of a run.

  load_jsonl(path)                          -> [{"question", "answer", ...}]
  solution_text(problem)                    -> its worked solution, ending in \\boxed{answer}
  load_demos(path)                          -> a user's demonstrations [{"question", "response"}]
  load_problems(cfg)                        -> (train, test, rl) problem lists of a run
  make_problem(rng, cfg)                    -> one arithmetic-chain problem
  builtin_split(cfg, n_train, n_test, seed) -> (train, test), disjoint by construction
  task_chain / check_steps                  exact step checking (the COAT critic, evaluation)

The built-in task (exact formats; the critic and RAE parse them):
  question: "Start with 47. Add 38, then multiply by 3, then subtract 59. What is the result?"
  solution: "Step 1: 47 + 38 = 85.\\nStep 2: 85 * 3 = 255.\\nStep 3: 255 - 59 = 196.\\n"
            "The answer is \\boxed{196}."
Every intermediate value stays in [0, max_value] by construction (no negatives, no fractions), so
each step is a small exact fact that can be checked, and one slip anywhere makes the answer wrong:
verifying steps and backtracking to the first wrong one genuinely pays.
"""
import hashlib
import json
import random
import re
from dataclasses import dataclass, fields

import countdown
from reward import extract_answer

# -----------------------------------------------------------------------------
# JSONL datasets

MAX_REPORTED = 10    # bad lines listed by one error; the rest are counted


def load_jsonl(path, record=None):
    """Records with "question" and "answer" (both str). Accepted line formats:
      {"question", "answer"}                    plain; a numeric answer is converted with str()
      {"question", "answer": "...#### 42"}      GSM8K: answer = text after the last "####",
                                                the full text is kept as "solution"
      {"problem" or "question", "solution"}     MATH: answer = last \\boxed{} of the solution
    Other keys are kept as they are. Blank lines are skipped; bad lines (invalid JSON or UTF-8, not an
    object, missing or empty question / answer) raise one ValueError with a "path:line: ..." line
    for each of the first MAX_REPORTED and a count of the rest. An empty file gives [].
    record(obj, where) -> dict reads one object instead (load_demos' formats)."""
    out, bad = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                rec = _parse_line(raw, lineno, f"{path}:{lineno}:", record or _record)
            except ValueError as e:
                bad.append(str(e))
                continue
            if rec is not None:
                out.append(rec)
    if bad:
        more = [f"{path}: {len(bad) - MAX_REPORTED} more bad lines"] if len(bad) > MAX_REPORTED else []
        raise ValueError("\n".join(bad[:MAX_REPORTED] + more))
    return out

def _parse_line(raw, lineno, where, record):
    """The record of one line, None for a blank one; ValueError("path:line: ...") for a bad one."""
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} invalid JSON ({e.msg} at column {e.colno}); expected one "
                         'object per line like {"question": ..., "answer": ...}') from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where} expected a JSON object, got {type(obj).__name__}")
    return record(obj, where)

def _record(obj, where):
    rec = dict(obj)
    q = obj.get("question", obj.get("problem"))
    if not isinstance(q, str) or not q.strip():
        raise ValueError(f"{where} expected a non-empty string 'question' (or 'problem'), "
                         f"got {_show(q)}")
    rec["question"] = q
    if "answer" in obj:
        a = obj["answer"]
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            a = str(a)
        if not isinstance(a, str):
            raise ValueError(f"{where} expected 'answer' to be a string or a number, got {_show(a)}")
        if "####" in a:                       # GSM8K: reasoning, then "#### final"
            rec.setdefault("solution", a)
            a = a.rsplit("####", 1)[1]
        a = a.strip()
        if not a:
            raise ValueError(f"{where} expected a non-empty 'answer'")
    elif "solution" in obj:
        sol = obj["solution"]
        if not isinstance(sol, str):
            raise ValueError(f"{where} expected 'solution' to be a string, got {_show(sol)}")
        a = extract_answer(sol)
        if not a:
            raise ValueError(f"{where} expected the 'solution' to end in a non-empty \\boxed{{...}} "
                             "answer (no 'answer' field given)")
    else:
        raise ValueError(f"{where} expected an 'answer' field (or a 'solution' with \\boxed{{...}}); "
                         f"keys are {sorted(obj)}")
    rec["answer"] = a
    return rec

def _show(x):
    r = repr(x)
    return r if len(r) <= 40 else r[:37] + "..."


def answer_line(problem):
    """The last line of every solution we train on; the grader reads the \\boxed{} in it."""
    return f"The answer is \\boxed{{{problem['answer']}}}."


def solution_text(problem):
    """The worked solution a base model is pretrained on, always ending in a \\boxed{} answer, so that
    a base pretrained on any of load_jsonl's formats answers the way the grader reads:
      a solution with \\boxed{} (MATH, the built-in task)  as it is
      a GSM8K solution "... #### 42"                     its reasoning (calculator notes <<6*7=42>>
                                                         removed), then "The answer is \\boxed{42}."
      any other solution                                 it, then that line
      no solution (plain question / answer)              that line alone"""
    final = answer_line(problem)
    sol = problem.get("solution")
    if not isinstance(sol, str) or not sol.strip():
        return final
    if extract_answer(sol) is not None:
        return sol
    if "####" in sol:
        sol = re.sub(r"<<[^<>]*>>", "", sol.rsplit("####", 1)[0])
    return sol.rstrip() + "\n" + final if sol.strip() else final

# -----------------------------------------------------------------------------
# demonstrations for format tuning: a user's own instead of synthesized ones

def load_demos(path):
    """A user's demonstrations ({"question", "response"} records) from a JSONL file in any of:
      {"question" or "prompt", "response" or "completion"}   the question is wrapped in the run's
                                                             prompt, as every question is
      {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}   one exchange
    Bad lines raise one ValueError as in load_jsonl."""
    return load_jsonl(path, _demo_record)

def _demo_record(obj, where):
    if "messages" in obj:
        msgs = obj["messages"]
        roles = [m.get("role") if isinstance(m, dict) else None for m in msgs] if isinstance(msgs, list) else None
        if roles != ["user", "assistant"] or not all(isinstance(m.get("content"), str) for m in msgs):
            raise ValueError(f"{where} expected 'messages' to be one user message and one assistant message, "
                             f"each with a string 'content', got roles {roles}")
        q, r = msgs[0]["content"], msgs[1]["content"]
    else:
        q = obj.get("question", obj.get("prompt"))
        r = obj.get("response", obj.get("completion"))
        if not isinstance(q, str) or not isinstance(r, str):
            raise ValueError(f"{where} expected string fields 'question' (or 'prompt') and 'response' (or "
                             f"'completion'), or 'messages'; keys are {sorted(obj)}")
    if not q.strip() or not r.strip():
        raise ValueError(f"{where} expected a non-empty question and response")
    return {**{k: v for k, v in obj.items() if k not in ("messages", "prompt", "completion")},
            "question": q, "response": r, "type": obj.get("type", "user")}

# -----------------------------------------------------------------------------
# the built-in task: an arithmetic chain

@dataclass
class TaskConfig:
    n_steps: int = 3             # operations per problem
    min_steps: int = 0           # if > 0, the number of operations is uniform in [min_steps, n_steps]
    ops: str = "+-*"             # allowed operations, any of "+-*/" (/ only when exact)
    start_max: int = 99          # start value in [1, start_max]
    max_operand: int = 99        # operand of + and - in [1, max_operand]
    mul_max: int = 9             # operand of * and / in [2, mul_max]: small, so a tiny model can learn them
    max_value: int = 999         # every intermediate value stays in [0, max_value]
    test_fraction: float = 0.1   # share of the problem space reserved for test; keep fixed across runs
    split_salt: str = "nanosatori-v1"   # changing it reshuffles the train / test partition

OP_WORDS = {"+": "add {}", "-": "subtract {}", "*": "multiply by {}", "/": "divide by {}"}
WORD_OPS = {"add": "+", "subtract": "-", "multiply by": "*", "divide by": "/"}

def apply_op(a, op, b):
    if op == "+": return a + b
    if op == "-": return a - b
    if op == "*": return a * b
    if op == "/": return a // b if b and a % b == 0 else None
    raise ValueError(f"unknown operation {op!r}")

def chain_values(start, ops):
    """[start, v1, ..., vn]: the value after each operation."""
    vals = [start]
    for op, b in ops:
        vals.append(apply_op(vals[-1], op, b))
    return vals

def _choices(cur, cfg):
    """(op, lo, hi) options whose result stays an integer in [0, max_value]."""
    out = []
    for op in cfg.ops:
        if op == "+" and cur < cfg.max_value:
            out.append(("+", 1, min(cfg.max_operand, cfg.max_value - cur)))
        elif op == "-" and cur >= 1:
            out.append(("-", 1, min(cfg.max_operand, cur)))
        elif op == "*" and 2 * cur <= cfg.max_value and cur > 0 and cfg.mul_max >= 2:
            out.append(("*", 2, min(cfg.mul_max, cfg.max_value // cur)))
        elif op == "/" and cur > 0 and any(cur % d == 0 for d in range(2, cfg.mul_max + 1)):
            out.append(("/", 2, cfg.mul_max))
    return out

def make_problem(rng, cfg=None):
    """One problem: dict(question, answer, solution, ops=[(op, operand), ...], start).
    rng: a random.Random."""
    cfg = cfg or TaskConfig()
    if not set(cfg.ops) <= set("+-*/") or not cfg.ops or cfg.n_steps < 1 or cfg.max_value < 1:
        raise ValueError(f"bad TaskConfig: {cfg}")
    for _ in range(1000):                     # retry the rare dead ends (e.g. ops="*" at a large value)
        n = rng.randint(cfg.min_steps, cfg.n_steps) if 0 < cfg.min_steps <= cfg.n_steps else cfg.n_steps
        start = rng.randint(1, min(cfg.start_max, cfg.max_value))
        cur, ops = start, []
        for _ in range(n):
            choices = _choices(cur, cfg)
            if not choices:
                break
            op, lo, hi = rng.choice(choices)
            if op == "/":
                b = rng.choice([d for d in range(2, cfg.mul_max + 1) if cur % d == 0])
            else:
                b = rng.randint(lo, hi)
            ops.append((op, b))
            cur = apply_op(cur, op, b)
        if len(ops) == n:
            return problem_from(start, ops)
    raise ValueError(f"TaskConfig admits no {cfg.n_steps}-step problems: {cfg}")

def problem_from(start, ops):
    """The problem dict for a given start value and operation list (texts derived here only)."""
    ops = [(op, int(b)) for op, b in ops]
    vals = chain_values(start, ops)
    phrases = [OP_WORDS[op].format(b) for op, b in ops]
    chain = ", then ".join(phrases)
    question = f"Start with {start}. {chain[0].upper()}{chain[1:]}. What is the result?"
    lines = [f"Step {i + 1}: {vals[i]} {op} {b} = {vals[i + 1]}." for i, (op, b) in enumerate(ops)]
    answer = str(vals[-1])
    solution = "\n".join(lines + [answer_line({"answer": answer})])
    return dict(question=question, answer=answer, solution=solution, ops=ops, start=start)

_QUESTION = re.compile(r"Start with (\d+)\. (.*)\. What is the result\?")
_PHRASE = re.compile(r"(add|subtract|multiply by|divide by) (\d+)")

def parse_question(question):
    """(start, ops) back from a question text, or None if it is not a built-in task question."""
    m = _QUESTION.fullmatch(question.strip())
    if m is None:
        return None
    ops = []
    for phrase in m.group(2).split(", then "):
        p = _PHRASE.fullmatch(phrase.strip().lower())
        if p is None:
            return None
        ops.append((WORD_OPS[p.group(1)], int(p.group(2))))
    return int(m.group(1)), ops

def task_chain(problem):
    """(start, ops) of a built-in task problem, from its own fields or parsed from its question;
    None for any other problem (a user's data)."""
    if "ops" in problem and "start" in problem:
        return int(problem["start"]), [(op, int(b)) for op, b in problem["ops"]]
    return parse_question(problem["question"])

# -----------------------------------------------------------------------------
# step checking

_STEP = re.compile(r"\s*(?:Step\s*\d+\s*:\s*)?(-?\d+)\s*([-+*/])\s*(\d+)\s*=\s*(-?\d+)\s*\.?\s*")

def parse_step(line):
    """"Step 2: 85 * 3 = 255." -> (85, "*", 3, 255); the "Step k:" prefix and the final "." are
    optional. None if the line is not a step."""
    m = _STEP.fullmatch(line)
    if m is None:
        return None
    return int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))

def solution_steps(text):
    """The step lines of a solution text: its non-blank lines up to (not including) the first line
    holding the answer (\\boxed or "The answer is")."""
    steps = []
    for line in text.split("\n"):
        if "\\boxed" in line or line.strip().lower().startswith("the answer is"):
            break
        if line.strip():
            steps.append(line.strip())
    return steps

def check_steps(problem, steps):
    """Index (0-based) of the first wrong step, or None if steps are exactly the complete, correct
    chain. Step i is wrong if it does not parse, does not start from the previous result (the start
    value for i = 0), uses another operation or operand than operation i of the question, or gets
    the arithmetic wrong. Missing steps: index len(steps); extra steps: index n_ops.
    problem: a dict from make_problem (or any dict whose question parses with parse_question);
    steps: list of step lines (see solution_steps) or of parse_step tuples."""
    chain = task_chain(problem)
    if chain is None:
        raise ValueError(f"not a built-in task question: {problem['question']!r}")
    start, ops = chain
    vals = chain_values(start, ops)
    for i, step in enumerate(steps):
        if i >= len(ops):
            return i
        s = parse_step(step) if isinstance(step, str) else (None if step is None else tuple(step))
        if s is None or s != (vals[i], ops[i][0], ops[i][1], vals[i + 1]):
            return i
    return None if len(steps) == len(ops) else len(steps)

# -----------------------------------------------------------------------------
# deterministic train / test split

def problem_key(problem):
    """Canonical identity of a problem: its start value and operations."""
    return f"{problem['start']}|" + ",".join(f"{op}{b}" for op, b in problem["ops"])

def is_test(problem, cfg=None):
    """Fixed partition of the problem space: sha256(salt + key) as a number in [0, 1) below
    test_fraction means test. It depends on the problem only, never on a seed, so train and test
    sets drawn with any seeds can never share a problem."""
    cfg = cfg or TaskConfig()
    h = hashlib.sha256(f"{cfg.split_salt}|{problem_key(problem)}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2 ** 64 < cfg.test_fraction

def builtin_split(cfg=None, n_train=1000, n_test=100, seed=0):
    """(train, test): n_train and n_test distinct problems, disjoint, deterministic for a seed;
    different seeds give different samples of the same fixed partition."""
    cfg = cfg or TaskConfig()
    rng = random.Random(seed)
    train, test, seen = [], [], set()
    budget = 1000 + 200 * (n_train + n_test)
    while len(train) < n_train or len(test) < n_test:
        budget -= 1
        if budget < 0:
            raise ValueError(f"could not draw {n_train} train + {n_test} test distinct problems "
                             f"(got {len(train)} + {len(test)}); the problem space of {cfg} is too "
                             "small")
        p = make_problem(rng, cfg)
        key = problem_key(p)
        if key in seen:
            continue
        seen.add(key)
        bucket = test if is_test(p, cfg) else train
        if len(bucket) < (n_test if bucket is test else n_train):
            bucket.append(p)
    return train, test

# -----------------------------------------------------------------------------
# the problem sets of a run

def task_config(cfg):
    """The TaskConfig of a run's --task_* options."""
    return TaskConfig(**{f.name[5:]: getattr(cfg, f.name) for f in fields(cfg) if f.name.startswith("task_")})

def countdown_config(cfg):
    """The CountdownConfig of a run's --countdown_* options."""
    return countdown.CountdownConfig(fail_rate=cfg.countdown_fail_rate, order=cfg.countdown_order)


def n_test(cfg, n_data=None):
    """Held-out problems of a run: --n_test, or with --n_test=0 (the default) 1,000 for the built-in
    task, all of --test_data, or a tenth of --data (1 to 1,000) when --data also gives the test set."""
    if cfg.n_test:
        return cfg.n_test
    if not cfg.data:
        return 1000
    return n_data if cfg.test_data else max(1, min(1000, n_data // 10))


def load_problems(cfg, need_solutions=False):
    """(train, test, rl) lists of {"question", "answer", ...}: the user's JSONL (--data, --test_data;
    rl is train), or the built-in task, whose RL questions are n_rl problems beyond the n_train
    (0: rl is train). A user's data that cannot serve the run (bad lines, too few problems, no
    worked solutions where need_solutions) is refused with SystemExit before any work."""
    if cfg.data:
        train = read_user_file(cfg.data, "data")
        n = sum(not isinstance(p.get("solution"), str) for p in train)
        if need_solutions and n:
            raise SystemExit(f"--data={cfg.data}: {n} of its {len(train)} problems have no 'solution'; RLT's "
                             "teacher explains worked solutions: add them (MATH or GSM8K style)")
        if cfg.test_data:
            test = read_user_file(cfg.test_data, "test_data")
            if cfg.n_test > len(test):
                raise SystemExit(f"--n_test={cfg.n_test}: --test_data={cfg.test_data} has {len(test)} problems")
            return train, test[:n_test(cfg, len(test))], train
        k = n_test(cfg, len(train))
        if k >= len(train):
            held = f"--n_test={k}" if cfg.n_test else f"{k} (a tenth, at least 1)"
            raise SystemExit(f"--data={cfg.data}: {len(train)} problems, and {held} of them are held "
                             "out for testing: give a smaller --n_test or a --test_data file")
        random.Random(cfg.seed).shuffle(train)
        train, test = train[:-k], train[-k:]
        return train, test, train
    # the splits fill train in stream order, so the first n_train are the same with or without n_rl
    try:
        if cfg.task == "countdown":
            problems, test = countdown.split(countdown_config(cfg), cfg.n_train + cfg.n_rl, n_test(cfg), cfg.seed,
                                             cfg.heldout)
        else:
            problems, test = builtin_split(task_config(cfg), cfg.n_train + cfg.n_rl, n_test(cfg), cfg.seed)
    except ValueError as e:                  # the --task_* options admit too few problems
        raise SystemExit(f"the built-in task: {e}") from None
    train, rl_questions = problems[:cfg.n_train], problems[cfg.n_train:]
    return train, test, rl_questions or train

def read_user_file(path, option, load=load_jsonl, what="problems"):
    """load(path) of the file an option names; a file that cannot serve (unreadable, bad lines, empty)
    raises SystemExit with the lines that say why."""
    try:
        records = load(path)
    except OSError as e:
        raise SystemExit(f"--{option}={path}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if not records:
        raise SystemExit(f"--{option}={path}: no {what} in it")
    return records
