"""COAT demonstrations: synthesised from the base model, then turned into format-tuning examples.

    from coat import SynthConfig, sampler_generator, synthesize_coat, demo_example
    records = synthesize_coat(sampler_generator(sampler, tok.stop_ids), tok, problems, SynthConfig())
    prompt_ids, response_ids, loss_mask = demo_example(tok, records[0])

Chain-of-Action-Thought (COAT) text is a chain of steps; every step after the first starts with a
meta-action token: <|continue|> goes on, <|reflect|> checks what came before, <|explore|> tries
another way after a reflection found a flaw. On the built-in task:
    Step 1: 47 + 38 = 85.
    <|continue|>Step 2: 85 * 3 = 245.
    <|reflect|>Let me check step 2: 85 * 3 = 255, not 245.
    <|explore|>Step 2: 85 * 3 = 255.
    <|continue|>Step 3: 255 - 59 = 196.
    <|continue|>The answer is \\boxed{196}.<|im_end|>
The final answer line is a step of its own. A verification reads
    <|reflect|>Let me check step 1: 47 + 38 = 85. It is correct.
followed by <|continue|> and the next step.

Synthesis uses three agents: the GENERATOR (the base model) samples plain chain-of-thought
solutions; the CRITIC knows the ground truth and, on a wrong path, names the first wrong step in a
<|reflect|> step and writes an <|explore|> step to go on from, after which the generator continues;
on a right path it may verify a step. SELECTION keeps, per question, one trajectory of each of the
five types (COAT_TYPES), every one ending in the right answer.

When the generator continues, it sees the prompt + the ACCEPTED chain in its own plain format (the
steps before the first wrong one, then the explore step), without COAT tokens, reflections or
superseded steps: a base model has never seen COAT tokens (they join the vocabulary only for format
tuning), and a small one continues only its own format reliably. The wrong steps and the reflection
appear in the demonstration only.
"""
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass

import countdown
import data
from reward import answer_end, coat_grammar_ok, extract_answer, grade, is_right, split_steps
from tokenizer import CONTINUE, EXPLORE, REFLECT

COAT_TYPES = ("no_reflect", "verify", "verify_correct", "correct_once", "correct_twice")
_TYPE_OF = {(): "no_reflect", ("v",): "verify", ("v", "c"): "verify_correct",
            ("c",): "correct_once", ("c", "c"): "correct_twice"}


@dataclass
class SynthConfig:
    group: int = 8               # CoT samples per question from the generator
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
            end = answer_end(s)
            steps.append(s[:end].rstrip() if end >= 0 else s)    # no complete \boxed{}: graded as no answer
            break
        if s:
            steps.append(s)
    return steps, sep


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
    chain = data.task_chain(problem)
    return None if chain is None else (chain[1], data.chain_values(*chain))


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
    s = data.parse_step(steps[k]) if k < len(steps) else None
    if k == len(steps) or (s is None and "\\boxed" in steps[k]):
        why = "it is missing"
    elif s is None or (s[0], s[1], s[2]) == (vals[k], op, b) and s[3] == vals[k + 1]:
        why = f"it should be {vals[k]} {op} {b} = {vals[k + 1]}"        # unparsable, or label / format
    elif s[0] != vals[k]:
        why = f"it should start from {vals[k]}, not {s[0]}"
    elif (s[1], s[2]) != (op, b):
        why = f"the question says {data.OP_WORDS[op].format(b)}, not {data.OP_WORDS[s[1]].format(s[2])}"
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
    if pred is not None and is_right(pred, problem):
        return None
    why = f"The answer {pred} is not correct." if pred is not None else "This does not reach an answer."
    return max(len(steps) - 1, 0), why, "Alternatively,"


def default_critic(problem, steps):
    """task_critic for a chain task problem, countdown.critic for a countdown one, answer_critic for
    anything else."""
    if countdown.is_countdown(problem):
        return countdown.critic(problem, steps)
    return task_critic(problem, steps) if _task(problem) else answer_critic(problem, steps)


def default_verifier(problem, j, step):
    """task_verifier for a chain task problem, countdown.verifier for a countdown one; None (no
    verification) for anything else, whose steps nothing here can check."""
    if countdown.is_countdown(problem):
        return countdown.verifier(problem, j, step)
    return task_verifier(problem, j, step) if _task(problem) else None

# -----------------------------------------------------------------------------
# the pipeline

def sampler_generator(sampler, stop_ids):
    """A generator function over a rollout.Sampler: (prompts, temperature, max_new_tokens, seed) ->
    generated ids per prompt, stop id removed. Budgets are clipped to the sampler's max_seq_len; a
    prompt that already fills it gets no tokens (the critic then rejects that continuation)."""
    def generate(prompts, temperature, max_new_tokens, seed):
        sampler.model.eval()
        budgets = [min(max_new_tokens, sampler.max_seq_len - len(p)) for p in prompts]
        room = [i for i, b in enumerate(budgets) if b >= 1]
        outs = sampler.generate([prompts[i] for i in room], [budgets[i] for i in room],
                                temperature=temperature, stop_ids=stop_ids, seed=seed) if room else []
        res = [[] for _ in prompts]
        for i, o in zip(room, outs):
            res[i] = o.body
        return res
    return generate


def synthesize_coat(generator, tok, problems, cfg=None, critic=None, verifier=None, scorer=None,
                    seed=0, log=print, stats=None):
    """COAT demonstrations for problems (dicts with "question" and "answer"; built-in task problems
    also get exact step checks). Returns records {"question", "answer", "prompt", "response",
    "type"} with response = COAT text + tok.eos_token and type one of COAT_TYPES.

    generator(prompts: list[list[int]], temperature, max_new_tokens, seed) -> list[list[int]]
        the base model (see sampler_generator); prompts are tok.encode_prompt(question) + the
        encoded plain chain to continue.
    critic, verifier: see above; default_critic / default_verifier when None.
    scorer(problem, response) -> float: picks the best trajectory of each type (Satori: a reward
        model); None = the shortest response.
      1. `group` CoT samples per question; the critic's verdict (not just the final answer)
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
    wrong. Pass your own critic / verifier to do better. stats: a Counter that receives the counts
    (samples; boxed: samples with a \\boxed{} answer; right; corrections tried and fixed; ...)."""
    cfg = cfg or SynthConfig()
    if not 0 <= cfg.max_rounds <= 2:
        raise ValueError(f"max_rounds must be 0, 1 or 2 (Satori's five types), got {cfg.max_rounds}")
    critic, verifier = critic or default_critic, verifier or default_verifier
    stats = Counter() if stats is None else stats
    rng, records, t0 = random.Random(seed), [], time.time()
    for ci, c0 in enumerate(range(0, len(problems), cfg.chunk)):
        chunk = problems[c0:c0 + cfg.chunk]
        prompts = [tok.encode_prompt(p["question"]) for p in chunk]
        seed_c = seed * 1_000_003 + 3 * ci
        done, pending = _first_attempts(generator, tok, chunk, prompts, cfg, critic, verifier, rng, seed_c, stats)
        done += _corrections(generator, tok, chunk, prompts, pending, cfg, critic, rng, seed_c, stats)
        records += _best_per_type(tok, chunk, done, scorer, stats)
        eta = (time.time() - t0) / (c0 + len(chunk)) * (len(problems) - c0 - len(chunk))
        log(f"synthesize: {c0 + len(chunk)}/{len(problems)} questions, {len(records)} "
            f"demonstrations, {time.time() - t0:.0f}s, eta {eta:.0f}s")
    s = stats
    log(f"synthesize: {s['samples']} samples, {s['boxed']} with a \\boxed{{}} answer, {s['right']} right; corrections: round 1 "
        f"{s['fixed1']}/{s['tried1']} fixed, round 2 {s['fixed2']}/{s['tried2']}; {s['bad']} failed the "
        f"final check; kept {dict(synthesize_stats(records))} in {time.time() - t0:.0f}s")
    return records


def _first_attempts(generator, tok, chunk, prompts, cfg, critic, verifier, rng, seed, stats):
    """`group` samples per question, judged by the critic -> (finished trajectories, trajectories that
    await a correction): right paths maybe with a verification, wrong ones cut at a reflection."""
    n = cfg.group
    outs = generator([ids for ids in prompts for _ in range(n)], cfg.temperature, cfg.max_new_tokens, seed)
    done, pending = [], []
    for q, p in enumerate(chunk):
        right, wrong = [], []    # no de-duplication: on the built-in task every right sample is the same text
        for ids in outs[q * n:(q + 1) * n]:
            text = tok.decode(ids)
            steps, sep = split_cot(text)
            stats["samples"] += 1
            stats["boxed"] += extract_answer(text) is not None
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
    return done, pending


def _corrections(generator, tok, chunk, prompts, pending, cfg, critic, rng, seed, stats):
    """Up to two rounds of continuations from the critic's hints, one batched generator call per
    round -> the trajectories the critic accepts at the end of a round."""
    done = []
    for rnd in (1, 2):
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
    return done


def _best_per_type(tok, chunk, done, scorer, stats):
    """One record per (question, type): the trajectories that end right and follow the grammar,
    the best by scorer (default: the shortest)."""
    best = {}                    # (question, type) -> (score, response)
    for t in done:
        p = chunk[t["q"]]
        for typ, items in _typed(p, t):
            text = render_coat([(m, s) for m, s, _ in items], t["sep"])
            if grade(text, p) is not True or not coat_grammar_ok(text):
                stats["bad"] += 1
                continue
            score = scorer(p, text) if scorer else -len(text)
            if (t["q"], typ) not in best or score > best[t["q"], typ][0]:
                best[t["q"], typ] = (score, text)
    return [{"question": p["question"], "answer": p["answer"], "prompt": tok.prompt(p["question"]),
             "response": best[q, typ][1] + tok.eos_token, "type": typ}
            for q, p in enumerate(chunk) for typ in COAT_TYPES if (q, typ) in best]


def _typed(problem, t):
    """[(type, items)] of a finished trajectory. On countdown the comparisons in the base's own
    search are the reflections (countdown.coat_items), and a single right attempt also gives a
    no_reflect demonstration without its comparison."""
    if not countdown.is_countdown(problem):
        return [(_TYPE_OF[tuple(t["refl"])], t["items"])]
    items = countdown.coat_items(t["items"], REFLECT, EXPLORE)
    typ = countdown.coat_type(items, REFLECT, EXPLORE)
    if typ != "verify" or not all(countdown.honest(s, problem) for m, s, _ in items if m != REFLECT):
        return [(typ, items)]          # without its reflections a false line would go unanswered
    return [(typ, items), ("no_reflect", [(m, s, i) for m, s, i in items if m != REFLECT])]


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

# -----------------------------------------------------------------------------
# demonstrations on disk, and the examples format tuning learns from

def write_demos(path, records):
    """One JSON record per line."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_demos(path):
    """The records of a demos.jsonl ({"question", "response", ...} per line)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def demo_example(tok, demo):
    """(prompt ids, response ids ending in eos, loss mask) of a COAT demonstration. The lines that a
    demonstration later corrects are context, not targets, so that the model learns to reflect and
    correct, not to make the base model's mistakes: on the chain task any step line that is not a
    line of the reference solution, on countdown a line that states something false
    (countdown.honest). Reflections and the rest are targets."""
    chain, search = data.task_chain({"question": demo["question"]}), countdown.is_countdown(demo)
    if search:                            # reflections included: a comparison can be false too
        honest = lambda meta, line: countdown.honest(line, demo)
    elif chain:
        good = set(data.problem_from(*chain)["solution"].split("\n"))
        honest = lambda meta, line: meta == REFLECT or line.strip() in good
    else:                                 # a user's data: nothing here can tell
        honest = lambda meta, line: True
    ids, keep = [], []
    for meta, text in split_steps(demo["response"]):
        piece = tok.encode((meta or "") + text)
        ok = all(honest(meta, line) for line in text.replace(tok.eos_token, "").split("\n") if line.strip())
        ids += piece
        keep += [ok] * len(piece)
    if ids[-1:] != [tok.eos_id]:
        ids, keep = ids + [tok.eos_id], keep + [True]
    return tok.encode_prompt(demo["question"]), ids, keep
