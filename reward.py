"""
Grading and rewards: text in, scalar out.

  extract_answer(text)  the content of the last complete \\boxed{...} (or None)
  is_equiv(pred, gold)  are two final answers the same? (exact, never eval / sympy of model text)
  is_right(pred, problem)  is pred the problem's answer (is_equiv; a countdown problem: does it solve it)
  grade(text, problem)  True / False, or None when the response has no \\boxed answer
  satori_reward(...)    Satori's sequence reward: rule + sigmoid(ORM) + reflection bonus, clipped
  coat_grammar_ok(text) does a response follow the Chain-of-Action-Thought format?
  exploration_reward    RLSP's reward for distinct reasoning steps
  expo_prompt           ExPO's prompt for a self-explanation of a known answer

is_equiv semantics (what counts as "the same answer"):
  - numbers are compared as exact rationals: "0.5" == "1/2" == "\\frac{1}{2}" == "\\dfrac12" ==
    "2/4", "-3" == "-(3)", "2^{3}" == "8", "3 \\times 4" == "12". No float tolerance: "0.333" is not
    "1/3". Simple expressions (+ - * / ^, parentheses, \\frac, \\cdot, \\times, \\div) are evaluated
    by a tiny recursive-descent parser over fractions.Fraction; implicit multiplication, \\sqrt and
    variables are not numbers and fall back to string comparison.
  - percent: a "%", "\\%" or "percent" is dropped, and an answer with it equals the bare number or
    the number / 100: "50\\%" == "50" == "50%" and "50\\%" == "0.5" (but "50\\%" != "0.5\\%").
  - "1,000" (comma groups of exactly 3 digits, no space) is one thousand; "1, 000" and "1,2" are lists.
  - dropped: $ and \\$, \\left \\right, LaTeX spacing (\\! \\, \\; \\: \\quad ~), \\text{}-style
    wrappers (their content kept), degree signs, a trailing ".", a leading "x =" (single variable),
    and units after a number: a trailing \\text{...} of letters ("5\\text{ cm}") or trailing words of
    2+ letters ("18 dollars", "5cm^2"). A single bare letter is kept: "2x" is not "2".
  - tuples / intervals "(1, 2)", "[0, 1)" compare element-wise in order with the same brackets.
  - everything else: whitespace-free string comparison after the normalisation above.
Adversarial input is bounded: extract_answer is linear in the text length, answers longer than
_MAX_LEN characters are only compared verbatim, and the parser caps nesting depth, exponents and the
size of intermediate numbers (so 9^9^9^9 is "not a number" instead of a hang).
"""
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from itertools import accumulate, repeat

import countdown
from tokenizer import COAT_TOKENS, EXPLORE, REFLECT

# -----------------------------------------------------------------------------
# answer extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_DELTA = {"{": 1, "}": -1}

def _close_brace(text, i, end):
    """Index of the '}' that closes an already-open '{' (depth 1 at text[i]), looking in
    text[i:end]; -1 if it does not close there. Works in chunks, all loops in C: a chunk whose '}'
    count cannot bring the depth to 0 is skipped with str.count; otherwise a running depth
    (itertools.accumulate) is searched for its first 0."""
    depth = 1
    while i < end:
        j = min(i + 4096, end)
        closes = text.count("}", i, j)
        if closes < depth:
            depth += text.count("{", i, j) - closes
        else:
            run = list(accumulate(map(_DELTA.get, text[i:j], repeat(0)), initial=depth))
            if 0 in run:
                return i + run.index(0) - 1
            depth = run[-1]
        i = j
    return -1

def extract_answer(text):
    """Content (stripped) of the last complete \\boxed{...} (or \\fbox{...}) in text, braces
    balanced; None if there is none. "Last" = the latest-starting one that closes: in
    "\\boxed{1} ... \\boxed{2" (truncated) the answer is "1"; nested "\\boxed{\\boxed{3}}" gives "3".
    The brace-less form "\\boxed 5" is not recognised.
    Linear time: once a \\boxed is known not to close, no earlier \\boxed can close after it, so
    each earlier one is only scanned up to it."""
    if not text:
        return None
    starts = [m.end() for m in _BOXED.finditer(text)]
    limit = len(text)
    for s in reversed(starts):
        e = _close_brace(text, s, limit)
        if e >= 0:
            return text[s:e].strip()
        limit = s
    return None

# -----------------------------------------------------------------------------
# exact rational parser: + - * / ^ ( ) { } \frac \cdot \times \div, unary +/-

_MAX_LEN = 1000     # characters; longer answers are compared verbatim only
_MAX_DEPTH = 32     # nesting of parentheses / unary signs / exponents
_MAX_BITS = 4096    # size cap on every intermediate numerator and denominator

_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|(\\frac|\\cdot|\\times|\\div|[-+*/^(){}]))")

class _NotANumber(Exception):
    pass

def _tokenize(s):
    toks, i = [], 0
    while i < len(s):
        m = _TOKEN.match(s, i)
        if m is None:
            if s[i:].strip():
                raise _NotANumber
            break
        toks.append(Fraction(m.group(1)) if m.group(1) else m.group(2))
        i = m.end()
    return toks

def _small(x):
    if x.numerator.bit_length() > _MAX_BITS or x.denominator.bit_length() > _MAX_BITS:
        raise _NotANumber
    return x

class _Parser:
    """Recursive descent over _tokenize's tokens, one method per grammar rule; depth counts nesting
    so that adversarial input fails fast instead of exhausting the stack."""

    def __init__(self, toks):
        self.toks, self.pos = toks, 0

    def peek(self):
        return self.toks[self.pos] if self.pos < len(self.toks) else None

    def take(self, expected=None):
        if self.pos >= len(self.toks) or (expected is not None and self.toks[self.pos] != expected):
            raise _NotANumber
        self.pos += 1
        return self.toks[self.pos - 1]

    def expr(self, depth):               # term (('+'|'-') term)*
        v = self.term(depth)
        while self.peek() in ("+", "-"):
            op, w = self.take(), self.term(depth)
            v = _small(v + w if op == "+" else v - w)
        return v

    def term(self, depth):               # unary (('*'|'/') unary)*
        v = self.unary(depth)
        while self.peek() in ("*", "/", "\\cdot", "\\times", "\\div"):
            op, w = self.take(), self.unary(depth)
            if op in ("/", "\\div"):
                if w == 0:
                    raise _NotANumber
                v = _small(v / w)
            else:
                v = _small(v * w)
        return v

    def unary(self, depth):              # ('+'|'-') unary | power ; so -2^2 = -(2^2)
        if depth > _MAX_DEPTH:
            raise _NotANumber
        if self.peek() in ("+", "-"):
            op, v = self.take(), self.unary(depth + 1)
            return -v if op == "-" else v
        return self.power(depth)

    def power(self, depth):              # atom ('^' unary)? ; right-associative: 2^3^2 = 2^9
        base = self.atom(depth)
        if self.peek() != "^":
            return base
        self.take()
        e = self.unary(depth + 1)
        if e.denominator != 1:
            raise _NotANumber            # 4^{1/2} would need roots
        bits = max(base.numerator.bit_length(), base.denominator.bit_length(), 1)
        if abs(e) > _MAX_BITS or bits * abs(e.numerator) > _MAX_BITS:
            raise _NotANumber            # 9^9^9 and friends: refuse before computing
        if base == 0 and e < 0:
            raise _NotANumber
        return base ** int(e)

    def atom(self, depth):               # number | (expr) | {expr} | \frac{expr}{expr}
        tok = self.take()
        if isinstance(tok, Fraction):
            return tok
        if tok in ("(", "{"):
            v = self.expr(depth + 1)
            self.take(")" if tok == "(" else "}")
            return v
        if tok == "\\frac":
            self.take("{"); num = self.expr(depth + 1); self.take("}")
            self.take("{"); den = self.expr(depth + 1); self.take("}")
            if den == 0:
                raise _NotANumber
            return _small(num / den)
        raise _NotANumber

def parse_number(s):
    """Exact value of a normalised numeric expression as a Fraction, or None if it is not one."""
    if not s or len(s) > _MAX_LEN:
        return None
    try:
        p = _Parser(_tokenize(s))
        v = p.expr(0)
        if p.pos != len(p.toks):
            raise _NotANumber
        return v
    except (_NotANumber, ZeroDivisionError, ValueError, OverflowError, RecursionError):
        return None

# -----------------------------------------------------------------------------
# normalisation and equivalence

_UNICODE = {"\u2212": "-", "\u00d7": "\\times ", "\u00f7": "\\div ", "\u00b7": "\\cdot ", "\u00b0": ""}
_SPACING = re.compile(r"\\[!,;: ]|\\q?quad(?![a-zA-Z])|\\displaystyle|\\left(?![a-zA-Z])|"
                      r"\\right(?![a-zA-Z])|~|\\\$|\$")
_TEXT_UNIT = re.compile(r"(?<=[\d})])\s*\\(?:text|textrm|mbox|mathrm)\s*\{\s*[A-Za-z][A-Za-z .]*\}"
                        r"(?:\s*\^\s*\{?\d\}?)?\s*$")
_TEXT = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox|operatorname)"
                   r"\s*\{([^{}]*)\}")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|\\degree")
_PERCENT = re.compile(r"\\?%|\s*\bpercent\b")
# unit words must be whitespace-separated, so a run of letters splits one way only (no blow-up)
_UNIT = r"[A-Za-z]{2,}\.?(?:\s*\^\s*\{?\d\}?)?"
_WORD_UNIT = re.compile(rf"(?<=[\d}})])\s*{_UNIT}(?:\s+{_UNIT})*\s*$")
_LHS = re.compile(r"^\s*[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?\s*=\s*")
_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d]|,\d)")
_FRAC_SHORT = [(re.compile(r"\\[dt]frac(?![a-zA-Z])"), r"\\frac"),
               (re.compile(r"\\frac\s*(\d)\s*(\d)"), r"\\frac{\1}{\2}"),
               (re.compile(r"\\frac\s*(\{[^{}]*\})\s*(\d)"), r"\\frac\1{\2}"),
               (re.compile(r"\\frac\s*(\d)\s*\{"), r"\\frac{\1}{"),
               (re.compile(r"\\sqrt\s*(\w)"), r"\\sqrt{\1}")]

def _normalize(s):
    """(normalised string, had a percent sign). Pure string rewriting, no evaluation."""
    if "\\boxed" in s or "\\fbox" in s:
        s = extract_answer(s) or s
    for k, v in _UNICODE.items():
        s = s.replace(k, v)
    s = _SPACING.sub("", s)              # "1\\,000" -> "1000"
    s = _DEGREE.sub("", s)
    pct = False
    if _PERCENT.search(s):
        s, pct = _PERCENT.sub("", s), True
    s = s.strip().rstrip(".").strip()
    for _ in range(3):                   # units first (they need to know they were in \text)
        s = _TEXT_UNIT.sub("", s).strip()
    for _ in range(3):                   # then unwrap the remaining \text{...}: keep the content
        s = _TEXT.sub(r" \1 ", s)
    s = s.strip().rstrip(".").strip()
    if s.count("=") == 1:                # "x = 5" -> "5"
        s = _LHS.sub("", s)
    s = _WORD_UNIT.sub("", s)
    for pattern, repl in _FRAC_SHORT:
        s = pattern.sub(repl, s)
    s = _THOUSANDS.sub(lambda m: m.group().replace(",", ""), s)
    return s.strip(), pct

def _compact(s):
    s = "".join(s.split())
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}" and _close_brace(s, 1, len(s)) == len(s) - 1:
        s = s[1:-1]
    return s

def _split_top(s):
    """Split at top-level commas (outside any bracket). Brackets of all kinds count together so that
    half-open intervals like [0, 1) work."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return parts

def _as_tuple(s):
    """(open, close, items) if s is a tuple / interval / bare list of >= 2 items, else None."""
    s = s.strip()
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        depth = 0
        for i, c in enumerate(s):
            depth += (c in "([{") - (c in ")]}")
            if depth == 0:
                break
        if depth == 0 and i == len(s) - 1:   # the first bracket encloses everything
            items = _split_top(s[1:-1])
            return (s[0], s[-1], items) if len(items) >= 2 else None
    items = _split_top(s)
    return ("", "", items) if len(items) >= 2 else None

def _equal(p, g, p_pct=False, g_pct=False):
    pv, gv = parse_number(p), parse_number(g)
    if pv is not None and gv is not None:
        if pv == gv:
            return True
        # a side with % may also be read as a fraction ("50%" == "0.5"); if both have it, this
        # divides both and changes nothing ("50%" != "0.5%")
        return (pv / 100 if p_pct else pv) == (gv / 100 if g_pct else gv)
    pt, gt = _as_tuple(p), _as_tuple(g)
    if pt is not None and gt is not None:
        return (pt[0] == gt[0] and pt[1] == gt[1] and len(pt[2]) == len(gt[2])
                and all(_equal(a.strip(), b.strip()) for a, b in zip(pt[2], gt[2])))
    return _compact(p) == _compact(g)

def is_equiv(pred, gold):
    """True if the answer pred means the same as the reference answer gold (see the module doc).
    None or empty answers are never equivalent to anything."""
    if pred is None or gold is None:
        return False
    pred, gold = str(pred).strip(), str(gold).strip()
    if not pred or not gold:
        return False
    if pred == gold:
        return True
    if len(pred) > _MAX_LEN or len(gold) > _MAX_LEN:
        return False
    (p, p_pct), (g, g_pct) = _normalize(pred), _normalize(gold)
    return bool(p) and bool(g) and _equal(p, g, p_pct, g_pct)

def is_right(pred, problem):
    """Is the answer pred right for problem? On a countdown problem: an expression that makes the
    target from the given numbers (countdown.check_answer); otherwise is_equiv(pred, its answer)."""
    task = countdown.numbers_target(problem)
    if task is not None:
        return pred is not None and countdown.check_answer(pred, *task)
    return is_equiv(pred, problem["answer"])

def grade(text, problem):
    """Grade a full response to problem: None if it has no \\boxed answer, else is_right(answer, problem)."""
    pred = extract_answer(text)
    return None if pred is None else is_right(pred, problem)

# -----------------------------------------------------------------------------
# Satori's reward

@dataclass
class RewardConfig:
    wrong: float = -1.0          # r_rule for a wrong answer or no \boxed answer
    right: float = 0.0           # r_rule for a correct answer
    use_orm: bool = True         # add orm_coef * sigmoid(ORM score) when a score is given
    orm_coef: float = 1.0
    reflect_bonus: float = 0.5   # magnitude of the restart-state bonus (0 disables it)
    clip: float = 10.0           # final reward clipped to [-clip, clip]

def satori_reward(correct, orm_score=None, restart_status=0, cfg=None):
    """Satori's sequence reward, placed on the last token by the caller:
        r = r_rule + orm_coef * sigmoid(orm_score) + r_bonus, clipped to +-clip
    correct: True / False, or None for "no \\boxed answer" (counts as wrong).
    restart_status (same convention as rae.py):
        0   the original question                              -> no bonus
        -1  restart state built from an INCORRECT trajectory   -> +reflect_bonus if now correct
        +1  restart state built from a CORRECT trajectory      -> -reflect_bonus if now wrong
    i.e. fixing a wrong attempt is rewarded and breaking a right one is punished."""
    cfg = cfg or RewardConfig()
    if restart_status not in (-1, 0, 1):
        raise ValueError(f"restart_status must be -1, 0 or +1, got {restart_status!r}")
    ok = correct is True
    r = cfg.right if ok else cfg.wrong
    if cfg.use_orm and orm_score is not None:
        r += cfg.orm_coef * _sigmoid(float(orm_score))
    if restart_status == -1 and ok:
        r += cfg.reflect_bonus
    elif restart_status == 1 and not ok:
        r -= cfg.reflect_bonus
    return max(-cfg.clip, min(cfg.clip, r))

def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))

# -----------------------------------------------------------------------------
# COAT grammar

_META = re.compile("(" + "|".join(map(re.escape, COAT_TOKENS)) + ")")
_SPECIAL = re.compile(r"<\|[A-Za-z_]+\|>")
_END_TOKENS = re.compile(r"(?:\s*(?:<\|im_end\|>|<\|endoftext\|>))+\s*$")
_ANSWER_TAIL = re.compile(r"[\s.$]*(?:\\[\])][\s.$]*)?")

def split_steps(text):
    """COAT steps of a response: [(meta_token or None, step_text), ...]. The first step has no meta
    token; each later one starts at a meta token (the token itself not included in step_text).
    Lossless: "".join((m or "") + s for m, s in split_steps(t)) == t. A response that starts with a
    meta token gives a first step (None, "")."""
    parts = _META.split(text)
    return [(None, parts[0])] + [(parts[i], parts[i + 1]) for i in range(1, len(parts), 2)]

def coat_grammar_ok(text):
    """Is the response well-formed Chain-of-Action-Thought?
      - a first step without a meta token, then zero or more steps each starting with
        <|continue|>, <|reflect|> or <|explore|>; no step is empty or whitespace-only;
      - <|explore|> only directly after a <|reflect|> step (reflect finds the flaw, explore tries
        another way); <|continue|> and <|reflect|> may follow anything;
      - the last step holds exactly one complete \\boxed{...}, and nothing but whitespace,
        '.', '$', '\\]' or '\\)' follows it. Earlier steps may hold \\boxed answers too (a first
        answer that a later <|reflect|> verifies or corrects); the graded answer is the last one;
      - no other special tokens, except trailing <|im_end|> / <|endoftext|>, which are ignored."""
    text = _END_TOKENS.sub("", text)
    if _SPECIAL.search(_META.sub("", text)):
        return False
    steps = split_steps(text)
    if any(not s.strip() for _, s in steps):
        return False
    for (prev, _), (meta, _) in zip(steps, steps[1:]):
        if meta == EXPLORE and prev != REFLECT:
            return False
    last = steps[-1][1]
    return len(_BOXED.findall(last)) == 1 and answer_end(last) == len(last)


def answer_end(text):
    """Index just past the first \\boxed{...} of text and the punctuation that may follow an answer
    (whitespace, '.', '$', a closing \\] or \\)); -1 when no \\boxed{ closes."""
    m = _BOXED.search(text)
    end = _close_brace(text, m.end(), len(text)) if m else -1
    return -1 if end < 0 else _ANSWER_TAIL.match(text, end + 1).end()

# -----------------------------------------------------------------------------
# RLSP exploration reward

# RLSP adds an exploration signal to the verifier's reward, decoupled from it and
# weighted by a coefficient with a schedule; its simplest form rewards more intermediate steps. A raw
# step count is trivially farmed (newlines, repeated lines, empty <|continue|>s), so only DISTINCT,
# INFORMATIVE steps count, and the count is capped: the bonus is bounded by coef whatever the length.

_MIN_STEP_CHARS = 8     # non-whitespace characters a step needs to count ("x = 3." is too short)

def reasoning_steps(text, coat=None):
    """The steps that exploration_reward counts, in order, each whitespace-normalised.
    Splitting: COAT text (coat=True, or coat=None and a meta token is present) splits at the meta
    tokens (split_steps: the first step plus one per <|continue|> / <|reflect|> / <|explore|>);
    plain text splits into lines. Trailing <|im_end|> / <|endoftext|> are dropped first, and any
    other special token inside a step is treated as whitespace. A step counts only if
      - after collapsing every whitespace run to one space, it has >= _MIN_STEP_CHARS non-whitespace
        characters and at least one letter or digit (so "", "   ", "...", "ok." never count), and
      - its normalised text differs from every step counted before it (a verbatim repeat, even with
        other spacing or line breaks, counts once)."""
    text = _END_TOKENS.sub("", text or "")
    if coat is None:
        coat = _META.search(text) is not None
    raw = [s for _, s in split_steps(text)] if coat else text.splitlines()
    steps, seen = [], set()
    for s in raw:
        s = " ".join(_SPECIAL.sub(" ", s).split())
        if len(s) - s.count(" ") < _MIN_STEP_CHARS or not any(c.isalnum() for c in s) or s in seen:
            continue
        seen.add(s)
        steps.append(s)
    return steps

def exploration_reward(text, max_steps=8, coat=None):
    """RLSP's exploration reward in [0, 1]: min(#distinct informative steps, max_steps) / max_steps,
    steps as in reasoning_steps. How each kind of padding earns nothing:
      - whitespace (spaces, blank lines, trailing newlines): collapsed, so no step gets longer or new;
        blank lines are empty steps;
      - empty steps (a meta token followed by nothing, "<|continue|><|continue|>", blank lines):
        fewer than _MIN_STEP_CHARS characters, so they do not count;
      - repeated steps or lines (verbatim, up to whitespace): counted once;
      - punctuation or special-token filler ("......", "<|im_end|>" mid-text): no letter or digit;
      - length itself: the reward depends on the count of distinct steps only, and is capped at 1
        after max_steps of them, so tokens beyond that earn nothing.
    What remains farmable is writing max_steps distinct, non-trivial steps: that is bounded by the
    cap, and rlsp_coef weights (and can decay) it. For a COAT policy pass coat=True, so that dropping
    the meta tokens and writing lines does not earn more than the meta-token steps would."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    return min(len(reasoning_steps(text, coat)), max_steps) / max_steps

def rlsp_coef(step, total, coef0, schedule="constant"):
    """Weight of the exploration reward at RL step `step` of `total`.
    constant:     coef0 throughout.
    linear_decay: coef0 * max(0, 1 - step / total): coef0 at step 0, 0 from step total on, so the
                  exploration bonus shapes early behaviour and the verifier's reward has the last word."""
    if schedule == "constant":
        return coef0
    if schedule == "linear_decay":
        if total <= 0:
            raise ValueError(f"linear_decay needs total > 0, got {total}")
        return coef0 * max(0.0, 1.0 - step / total)
    raise ValueError(f"unknown rlsp schedule {schedule!r} (expected 'constant' or 'linear_decay')")

# -----------------------------------------------------------------------------
# ExPO self-explanation prompt (the loss term is ppo.expo_loss)

def expo_prompt(tok, question, answer):
    """The policy's prompt for a self-explanation c~ given the question AND the correct answer a*:
    Satori's prompt (tok.prompt) with the answer and the request after the question. c~ (ending in
    \\boxed{a*}) is then scored under the question-only prompt by ppo.expo_loss."""
    return tok.prompt(f"{question}\nThe correct final answer is {answer}. Write a solution that "
                      "explains how to reach it.")
