"""
Data: JSONL datasets and the built-in procedurally generated reasoning task.

  load_jsonl(path)                       -> [{"question", "answer", ...}]
  make_problem(rng, cfg)                 -> one arithmetic-chain problem
  builtin_split(cfg, n_train, n_test, seed) -> (train, test), disjoint by construction
  parse_step / solution_steps / check_steps  exact step checking (used by the COAT critic)

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
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass

from reward import coat_grammar_ok, extract_answer, grade, is_equiv

# -----------------------------------------------------------------------------
# JSONL datasets

def load_jsonl(path):
    """Records with "question" and "answer" (both str). Accepted line formats:
      {"question", "answer"}                    plain; a numeric answer is converted with str()
      {"question", "answer": "...#### 42"}      GSM8K: answer = text after the last "####",
                                                the full text is kept as "solution"
      {"problem" or "question", "solution"}     MATH: answer = last \\boxed{} of the solution
    Other keys are kept as they are. Blank lines are skipped; any other bad line (invalid JSON or
    UTF-8, not an object, missing or empty question / answer) raises ValueError("path:line: ...").
    An empty file gives []."""
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}:"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where} not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} invalid JSON ({e.msg} at column {e.colno}); expected one "
                                 'object per line like {"question": ..., "answer": ...}') from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where} expected a JSON object, got {type(obj).__name__}")
            out.append(_record(obj, where))
    return out

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
    solution = "\n".join(lines + [f"The answer is \\boxed{{{answer}}}."])
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
    if "ops" in problem and "start" in problem:
        start, ops = int(problem["start"]), [(op, int(b)) for op, b in problem["ops"]]
    else:
        parsed = parse_question(problem["question"])
        if parsed is None:
            raise ValueError(f"not a built-in task question: {problem['question']!r}")
        start, ops = parsed
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

def task_corpus(cfg=None, n=2000, seed=0):
    """Texts for training the task tokenizer: n questions and their solutions (from the train
    partition's generator stream; any problem is fine here since only the vocabulary is learned)."""
    cfg = cfg or TaskConfig()
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        p = make_problem(rng, cfg)
        texts += [p["question"], p["solution"]]
    return texts

# -----------------------------------------------------------------------------
# COAT demonstration synthesis (generator -> critic -> reward-model selection): added below.
#
# Satori's three agents: the GENERATOR (the base model) samples plain CoT solutions; the CRITIC knows
# the ground truth and, on a wrong path, names the first wrong step in a <|reflect|> step and writes
# an <|explore|> step to go on from, after which the generator continues; on a right path it may
# verify a step; at most max_rounds reflections per trajectory. SELECTION keeps, per question, one
# trajectory of each of Satori's five types (COAT_TYPES), all of them ending in the right answer.
#
# COAT text: the steps of the plain CoT (lines for the built-in task, paragraphs when the sample
# has blank lines), each step after the first preceded by a meta-action token at its start:
#   Step 1: 47 + 38 = 85.
#   <|continue|>Step 2: 85 * 3 = 245.
#   <|reflect|>Let me check step 2: 85 * 3 = 255, not 245.
#   <|explore|>Step 2: 85 * 3 = 255.
#   <|continue|>Step 3: 255 - 59 = 196.
#   <|continue|>The answer is \boxed{196}.<|im_end|>
# The final answer line is a step of its own. A verification reads
#   <|reflect|>Let me check step 1: 47 + 38 = 85. It is correct.
# followed by <|continue|> and the next step of the sample.
#
# What the generator sees when it continues: the prompt + the ACCEPTED chain in its own plain format,
# i.e. the steps before the first wrong one, then the explore step (for the built-in task the
# corrected step), with no COAT tokens, reflections or superseded steps. A base model has never seen
# COAT tokens (they are added to the vocabulary only for format tuning), and a small one continues
# only its own format reliably; the wrong steps and the reflection appear in the demonstration only.

CONTINUE, REFLECT, EXPLORE = "<|continue|>", "<|reflect|>", "<|explore|>"
COAT_TYPES = ("no_reflect", "verify", "verify_correct", "correct_once", "correct_twice")
_TYPE_OF = {(): "no_reflect", ("v",): "verify", ("v", "c"): "verify_correct",
            ("c",): "correct_once", ("c", "c"): "correct_twice"}

@dataclass
class SynthConfig:
    n_samples: int = 8           # CoT samples per question from the generator
    temperature: float = 1.0     # for the samples and the continuations
    max_new_tokens: int = 256    # per generation (first attempt, each continuation)
    keep_correct: int = 4        # Satori keeps 4 correct + 4 incorrect samples per question
    keep_incorrect: int = 4
    verify_prob: float = 0.5     # chance that a path gets a verification before anything else
    max_rounds: int = 2          # reflections (verifications + corrections) per trajectory
    reflect_delay: int = 1       # a reflection comes 0..reflect_delay steps after the step it is about,
                                 # so the model also learns to look back (RAE restarts drop 1-2 steps)
    chunk: int = 64              # questions per batch of generator calls

def split_cot(text, sep=None):
    """(steps, sep) of a plain CoT text from the generator. Steps are the non-blank paragraphs when
    the text has a blank line, else its non-blank lines (sep given: split at it), stripped. Nothing
    after a special token ("<|...") is kept, and the steps end with the first one that holds a
    \\boxed answer, cut just after that answer (so a final step ends in its \\boxed{...})."""
    text = text.split("<|", 1)[0]
    if sep is None:
        sep = "\n\n" if "\n\n" in text.strip() else "\n"
    steps = []
    for s in text.split(sep):
        s = s.strip()
        if s and "\\boxed" in s:
            steps.append(_trim_answer(s))
            break
        if s:
            steps.append(s)
    return steps, sep

_TAIL = re.compile(r"[\s.$]*(?:\\[\])][\s.$]*)?")

def _trim_answer(s):
    i = s.find("\\boxed{")
    depth = 0
    for j in range(i + 6, len(s)) if i >= 0 else ():
        depth += {"{": 1, "}": -1}.get(s[j], 0)
        if depth == 0:
            return (s[:j + 1] + _TAIL.match(s, j + 1).group()).rstrip()
    return s                     # no complete \boxed{}: graded as no answer

def render_coat(items, sep="\n"):
    """COAT text of [(meta token or None, step text), ...]: each meta token at the start of its step."""
    return items[0][1] + "".join(sep + meta + text for meta, text in items[1:])

# -----------------------------------------------------------------------------
# critics: critic(problem, steps) -> None when the steps are a right solution, else
# (k, reflection, hint): k = index of the first wrong step (== len(steps) when one is missing), the
# text of the <|reflect|> step, and the text of the <|explore|> step that the generator continues
# from (a hint holding a \boxed answer is final: nothing is generated after it).
# verifier(problem, j, step) -> text of a <|reflect|> step verifying step j, or None if it cannot.

def _task(problem):
    """(ops, values) of a built-in task problem, None for any other problem."""
    if "ops" in problem and "start" in problem:
        ops = [(op, int(b)) for op, b in problem["ops"]]
        return ops, chain_values(int(problem["start"]), ops)
    parsed = parse_question(problem["question"])
    return None if parsed is None else (parsed[1], chain_values(*parsed))

def _line(i, ops, vals):
    return f"Step {i + 1}: {vals[i]} {ops[i][0]} {ops[i][1]} = {vals[i + 1]}."

def task_critic(problem, steps):
    """Exact critic of the built-in task: the first step that is not exactly the reference line
    ("Step k: a op b = r." with the right numbers and label, then "The answer is \\boxed{v}.").
    The reflection says what is wrong; the hint is the right line."""
    ops, vals = _task(problem)
    n = len(ops)
    want = [_line(i, ops, vals) for i in range(n)] + [f"The answer is \\boxed{{{vals[-1]}}}."]
    k = next((i for i, (s, w) in enumerate(zip(steps, want)) if s != w), min(len(steps), len(want)))
    if k == len(steps) == len(want):
        return None
    if k == n:                   # the steps are right; the answer is wrong, malformed or missing
        pred = extract_answer(steps[k]) if k < len(steps) else None
        why = f"step {n} gives {vals[n]}" + (f", not {pred}" if pred and pred != str(vals[n]) else "")
        return k, f"Let me check the answer: {why}.", want[n]
    op, b = ops[k]
    s = parse_step(steps[k]) if k < len(steps) else None
    if k == len(steps) or (s is None and "\\boxed" in steps[k]):
        why = "it is missing"
    elif s is None or (s[0], s[1], s[2]) == (vals[k], op, b) and s[3] == vals[k + 1]:
        why = f"it should be {vals[k]} {op} {b} = {vals[k + 1]}"        # unparsable, or label / format
    elif s[0] != vals[k]:
        why = f"it should start from {vals[k]}, not {s[0]}"
    elif (s[1], s[2]) != (op, b):
        why = f"the question says {OP_WORDS[op].format(b)}, not {OP_WORDS[s[1]].format(s[2])}"
    else:
        why = f"{vals[k]} {op} {b} = {vals[k + 1]}, not {s[3]}"
    return k, f"Let me check step {k + 1}: {why}.", want[k]

def task_verifier(problem, j, step):
    """Verification of step j of a built-in task solution, recomputed from the question; None if
    the step is not right (a verification never vouches for a wrong step)."""
    ops, vals = _task(problem)
    if j >= len(ops) or step != _line(j, ops, vals):
        return None
    return f"Let me check step {j + 1}: {vals[j]} {ops[j][0]} {ops[j][1]} = {vals[j + 1]}. It is correct."

def answer_critic(problem, steps):
    """Critic for a user's data, which has only a final answer: a wrong (or missing) final answer is
    the wrong step, i.e. the last step. The reflection says so and the hint is "Alternatively,": the
    generator redoes the last step from the steps before it. It cannot locate an earlier error."""
    pred = extract_answer(steps[-1]) if steps else None
    if pred is not None and is_equiv(pred, problem["answer"]):
        return None
    why = f"The answer {pred} is not correct." if pred is not None else "This does not reach an answer."
    return max(len(steps) - 1, 0), why, "Alternatively,"

def default_critic(problem, steps):
    """task_critic for a built-in task problem, answer_critic for anything else."""
    return task_critic(problem, steps) if _task(problem) else answer_critic(problem, steps)

def default_verifier(problem, j, step):
    """task_verifier for a built-in task problem; None (no verification) for anything else, whose
    steps nothing here can check."""
    return task_verifier(problem, j, step) if _task(problem) else None

# -----------------------------------------------------------------------------
# the pipeline

def sampler_generator(sampler, stop_ids):
    """A generator function over a rollout.Sampler: (prompts, temperature, max_new_tokens, seed) ->
    generated ids per prompt, stop id removed. Budgets are clipped to the sampler's max_seq_len; a
    prompt that already fills it gets no tokens (the critic then rejects that continuation)."""
    stop = set(stop_ids)

    def generate(prompts, temperature, max_new_tokens, seed):
        sampler.model.eval()
        budgets = [min(max_new_tokens, sampler.max_seq_len - len(p)) for p in prompts]
        room = [i for i, b in enumerate(budgets) if b >= 1]
        outs = sampler.generate([prompts[i] for i in room], [budgets[i] for i in room],
                                temperature=temperature, stop_ids=stop_ids, seed=seed) if room else []
        res = [[] for _ in prompts]
        for i, o in zip(room, outs):
            res[i] = o.tokens[:-1] if o.tokens and o.tokens[-1] in stop else o.tokens
        return res
    return generate

def synthesize_coat(generator, tok, problems, cfg=None, critic=None, verifier=None, scorer=None,
                    seed=0, log=print):
    """COAT demonstrations for problems (dicts with "question" and "answer"; built-in task problems
    also get exact step checks). Returns records {"question", "answer", "prompt", "response",
    "type"} with response = COAT text + tok.eos_token and type one of COAT_TYPES.

    generator(prompts: list[list[int]], temperature, max_new_tokens, seed) -> list[list[int]]
        the base model (see sampler_generator); prompts are tok.encode_prompt(question) + the
        encoded plain chain to continue.
    critic, verifier: see above; default_critic / default_verifier when None.
    scorer(problem, response) -> float: picks the best trajectory of each type (Satori: a reward
        model); None = the shortest response.
      1. n_samples CoT samples per question; the critic's verdict (not just the final answer)
         splits them into right and wrong; the first keep_correct / keep_incorrect are kept.
      2. A right path is kept plain (no_reflect) or, with verify_prob, gets a verification of a
         random step before its answer (verify). A wrong path gets, with verify_prob when it has a
         right step before its first wrong one, a verification of such a step, then a correction:
         the path is cut 0..reflect_delay steps after its first wrong step, the critic's reflection
         and hint appended, and the generator continues. A wrong continuation gets a second
         correction if rounds are left (correct_twice), and is dropped otherwise.
      3. Only trajectories that end right (the critic accepts the final chain, the \\boxed answer
         grades right) and satisfy reward.coat_grammar_ok are kept; then one per type per question.
    On a user's data (answer_critic, no verifier) only no_reflect, correct_once and correct_twice
    arise, and a correction redoes the last step: the critic knows the answer, not where it went
    wrong. Pass your own critic / verifier to do better."""
    cfg = cfg or SynthConfig()
    if not 0 <= cfg.max_rounds <= 2:
        raise ValueError(f"max_rounds must be 0, 1 or 2 (Satori's five types), got {cfg.max_rounds}")
    critic, verifier = critic or default_critic, verifier or default_verifier
    rng, stats, records, t0 = random.Random(seed), Counter(), [], time.time()
    for ci, c0 in enumerate(range(0, len(problems), cfg.chunk)):
        chunk = problems[c0:c0 + cfg.chunk]
        records += _synth_chunk(generator, tok, chunk, cfg, critic, verifier, scorer, rng,
                                seed * 1_000_003 + 3 * ci, stats)
        log(f"synthesize: {c0 + len(chunk)}/{len(problems)} questions, {len(records)} "
            f"demonstrations, {time.time() - t0:.0f}s")
    s = stats
    log(f"synthesize: {s['samples']} samples, {s['right']} right; corrections: round 1 "
        f"{s['fixed1']}/{s['tried1']} fixed, round 2 {s['fixed2']}/{s['tried2']}; {s['bad']} failed the "
        f"final check; kept {dict(synthesize_stats(records))} in {time.time() - t0:.0f}s")
    return records

def _synth_chunk(generator, tok, chunk, cfg, critic, verifier, scorer, rng, seed, stats):
    prompts = [tok.encode_prompt(p["question"]) for p in chunk]
    n = cfg.n_samples
    outs = generator([ids for ids in prompts for _ in range(n)], cfg.temperature, cfg.max_new_tokens, seed)
    done, pending = [], []
    for q, p in enumerate(chunk):
        right, wrong = [], []    # no de-duplication: on the built-in task every right sample is the same text
        for ids in outs[q * n:(q + 1) * n]:
            steps, sep = split_cot(tok.decode(ids))
            stats["samples"] += 1
            if steps:
                verdict = critic(p, steps)
                (right if verdict is None else wrong).append((steps, sep, verdict))
        stats["right"] += len(right)
        for steps, sep, _ in right[:cfg.keep_correct]:
            t = _traj(q, steps, sep)
            if cfg.max_rounds >= 1 and rng.random() < cfg.verify_prob and len(steps) >= 2:
                _verify(t, p, steps, len(steps) - 2, verifier, rng, cfg)
            done.append(t)
        for steps, sep, verdict in wrong[:cfg.keep_incorrect]:
            t = _traj(q, steps, sep)
            if verdict[0] >= 1 and cfg.max_rounds >= 2 and rng.random() < cfg.verify_prob:
                _verify(t, p, steps, verdict[0] - 1, verifier, rng, cfg)
            if len(t["refl"]) < cfg.max_rounds:
                pending.append(_correct(t, steps, verdict, rng, cfg))
    for rnd in (1, 2):           # each round: one batched generator call for every continuation
        if not pending:
            break
        stats[f"tried{rnd}"] += len(pending)
        todo = [t for t in pending if "\\boxed" not in t["hint"]]     # a final hint needs no continuation
        views = [prompts[t["q"]] + tok.encode(t["sep"].join(t["prefix"] + [t["hint"]])) for t in todo]
        conts = dict(zip(map(id, todo), generator(views, cfg.temperature, cfg.max_new_tokens, seed + rnd)
                         if todo else []))
        waiting, pending = pending, []
        for t in waiting:
            cont = tok.decode(conts[id(t)]) if id(t) in conts else ""
            segs, _ = split_cot(t["hint"] + cont, t["sep"])
            k = len(t["prefix"])
            t["start"] = len(t["items"])              # the current attempt starts at the explore step
            t["items"] += [(EXPLORE if i == 0 else CONTINUE, s, k + i) for i, s in enumerate(segs)]
            chain = t["prefix"] + segs
            verdict = critic(chunk[t["q"]], chain)
            if verdict is None:
                stats[f"fixed{rnd}"] += 1
                done.append(t)
            elif len(t["refl"]) < cfg.max_rounds and verdict[0] >= k:
                pending.append(_correct(t, chain, verdict, rng, cfg))
    best = {}                    # (question, type) -> (score, response)
    for t in done:
        p = chunk[t["q"]]
        text = render_coat([(m, s) for m, s, _ in t["items"]], t["sep"])
        if grade(text, p["answer"]) is not True or not coat_grammar_ok(text):
            stats["bad"] += 1
            continue
        key = (t["q"], _TYPE_OF[tuple(t["refl"])])
        score = scorer(p, text) if scorer else -len(text)
        if key not in best or score > best[key][0]:
            best[key] = (score, text)
    return [{"question": p["question"], "answer": p["answer"], "prompt": tok.prompt(p["question"]),
             "response": best[q, typ][1] + tok.eos_token, "type": typ}
            for q, p in enumerate(chunk) for typ in COAT_TYPES if (q, typ) in best]

def _traj(q, steps, sep):
    """A trajectory under construction: items (meta, text, chain index or None for a reflection)."""
    items = [(None if i == 0 else CONTINUE, s, i) for i, s in enumerate(steps)]
    return {"q": q, "sep": sep, "items": items, "refl": [], "start": 0}

def _insert_after(t, c, item, cut=False):
    """Insert item after the step with chain index c of the current attempt (cut: drop what follows)."""
    i = next(i for i in range(t["start"], len(t["items"])) if t["items"][i][2] == c)
    t["items"][i + 1:] = [item] + ([] if cut else t["items"][i + 1:])

def _verify(t, problem, steps, last, verifier, rng, cfg):
    """Verify a random step j <= last, the reflection placed 0..reflect_delay steps after it."""
    j = rng.randint(0, last)
    text = verifier(problem, j, steps[j])
    if text is not None:
        _insert_after(t, min(j + rng.randint(0, cfg.reflect_delay), last), (REFLECT, text, None))
        t["refl"].append("v")

def _correct(t, chain, verdict, rng, cfg):
    """Cut 0..reflect_delay steps after the first wrong step k, append the critic's reflection; the
    generator will continue from chain[:k] + hint."""
    k, why, hint = verdict
    _insert_after(t, min(k + rng.randint(0, cfg.reflect_delay), len(chain) - 1), (REFLECT, why, None), cut=True)
    t["refl"].append("c")
    t["prefix"], t["hint"] = chain[:k], hint
    return t

def synthesize_stats(records):
    """Number of demonstrations of each type (all of COAT_TYPES present), plus "total" and "questions"."""
    c = Counter({typ: 0 for typ in COAT_TYPES})
    c.update(r["type"] for r in records)
    c["total"], c["questions"] = len(records), len({r["question"] for r in records})
    return c

def write_demos(path, records):
    """One JSON record per line (load_jsonl reads them back)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
