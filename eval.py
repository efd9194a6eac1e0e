"""Evaluation: greedy pass@1 on held-out problems, COAT statistics and self-correction counts, and
the results table of a run.

    python train.py --stages=eval --out=runs/a        # every stage model in runs/a -> results.json, results.md,
                                                      # responses.jsonl (every response, graded)
    m = evaluate(model, tok, problems)                # {"pass_at_1", "reflect_rate", ...}

Self-correction is counted as Satori does: among answers with a <|reflect|>, those whose answer
changed because of it, and the shares of them that went wrong -> right and right -> wrong.
"""
import json
import os
import time

import countdown
import data
import reward
from rollout import generate_shared, sampler_for
from tokenizer import COAT_TOKENS, EXPLORE, REFLECT

# the columns of results.md, in order
TABLE = ("pass_at_1", "wrong_to_right", "right_to_wrong", "reflect_rate", "explore_rate", "grammar_ok",
         "boxed_rate", "mean_steps", "mean_length")


def reflect_start_state(text, problem):
    """Was the response right BEFORE its first <|reflect|>? True / False, or None when there is no
    <|reflect|> or nothing committed before it.
      1. The text before the first <|reflect|> holds a \\boxed{} answer: that answer, graded against
         problem["answer"] (Satori's case: answer, then reflect on it).
      2. Otherwise, for a built-in task problem: the chain is right so far iff every step written
         before the reflection is correct (data.check_steps): a reflection that interrupts a
         correct partial chain starts from "right", one that follows a wrong step from "wrong".
         (The last "= N" alone would call every mid-chain verification "wrong", which it is not.)
         On countdown: did the first attempt make the target honestly (countdown.right_before)?
      3. Otherwise (a user's problem, no answer yet): None, excluded from the counts."""
    i = text.find(REFLECT)
    if i < 0:
        return None
    before = text[:i]
    ans = reward.extract_answer(before)
    if ans is not None:
        return reward.is_right(ans, problem)
    for t in COAT_TOKENS:
        before = before.replace(t, "\n")
    if countdown.is_countdown(problem):
        return countdown.right_before([l.strip() for l in before.split("\n") if l.strip()], problem)
    if data.task_chain(problem) is not None:
        steps = data.solution_steps(before)
        if not steps:
            return None
        first_wrong = data.check_steps(problem, steps)
        return first_wrong is None or first_wrong >= len(steps)
    return None


def graded(text, problem):
    """(the \\boxed answer of a response or None, whether it is right)."""
    pred = reward.extract_answer(text)
    return pred, reward.is_right(pred, problem)


def score_responses(texts, problems, lengths=None):
    """Metrics of a set of responses (texts, one per problem). Self-correction: among responses with
    a <|reflect|> whose state before it is known (reflect_start_state), those whose answer CHANGES:
    the right/wrong state flips, or, with a \\boxed answer before the reflection, the final answer
    differs from it (wrong -> another wrong counts as a change too). wrong_to_right and
    right_to_wrong are shares of those changes (0 when there are none)."""
    n = len(texts)
    correct = [graded(t, p)[1] for t, p in zip(texts, problems)]
    changed = w2r = r2w = 0
    for t, p, ok in zip(texts, problems, correct):
        before = reflect_start_state(t, p)
        if before is None:
            continue
        early = reward.extract_answer(t[:t.find(REFLECT)])
        if before != ok or (early is not None and not reward.is_equiv(early, reward.extract_answer(t))):
            changed += 1
            w2r += (not before) and ok
            r2w += before and not ok
    mean = lambda xs: sum(xs) / max(n, 1)
    return {"n": n,
            "pass_at_1": mean(correct),
            "wrong_to_right": w2r / changed if changed else 0.0,
            "right_to_wrong": r2w / changed if changed else 0.0,
            "n_changed": changed,
            "reflect_rate": mean(REFLECT in t for t in texts),
            "explore_rate": mean(EXPLORE in t for t in texts),
            "mean_steps": mean(len(reward.split_steps(t)) for t in texts),
            "grammar_ok": mean(reward.coat_grammar_ok(t) for t in texts),
            "boxed_rate": mean(reward.extract_answer(t) is not None for t in texts),
            "mean_length": mean(lengths) if lengths is not None else mean(len(t) for t in texts)}


def evaluate(model, tok, problems, sampler=None, max_new_tokens=160, batch_size=64, return_texts=False, log=None,
             name="eval"):
    """Greedy (temperature 0) pass@1 on held-out problems plus COAT statistics (score_responses);
    mean_length is in generated tokens (stop token included). Under torchrun every process answers
    its share of the problems and every process gets the metrics of all of them. log: a callable
    that gets a progress line ("<name>: 512/1000 problems, 12s, eta 11s") at each quarter."""
    prompts = [tok.encode_prompt(p["question"]) for p in problems]
    if sampler is None:
        sampler = sampler_for(model.eval(), prompts, max_new_tokens, batch_size)
    kw = {"progress": progress_lines(log, name, len(problems))} if log else {}
    outs = generate_shared(sampler, prompts, max_new_tokens, seed=0, temperature=0.0, stop_ids=tok.stop_ids, **kw)
    texts = [tok.decode(o.body) for o in outs]
    m = score_responses(texts, problems, [len(o.tokens) for o in outs])
    return (m, texts) if return_texts else m


def progress_lines(log, name, n):
    """progress(done, total) for Sampler.generate, which calls it at each look at its lanes: a line
    with an ETA when another quarter of the problems is answered. Under torchrun the sampler sees
    this process's share (total), which stands for all n problems."""
    t0, quarters = time.time(), [0]

    def progress(done, total):
        q = 4 * done // max(total, 1)
        if quarters[0] < q < 4:
            quarters[0], dt = q, time.time() - t0
            log(f"{name}: {round(n * done / total)}/{n} problems, {dt:.0f}s, eta {dt * (total - done) / done:.0f}s")
    return progress


def response_rows(model, problems, texts):
    """The rows of responses.jsonl for one model's responses (texts, one per problem)."""
    rows = []
    for p, t in zip(problems, texts):
        pred, ok = graded(t, p)
        rows.append({"model": model, "question": p["question"], "answer": p["answer"], "response": t,
                     "pred": pred, "correct": ok})
    return rows


def cell(key, value):
    """A value of the results table as text: shares to 3 decimals, counts and lengths to 1."""
    return f"{value:.3f}" if key.endswith(("rate", "ok", "1", "right", "wrong")) else f"{value:.1f}"


def write_results(out, rows, responses=None):
    """out/results.json ({"stages": rows}, each row {"name", **metrics, "stale": [inputs remade
    since it was made]}), out/results.md (the TABLE columns, stale rows marked) and, given
    response_rows, out/responses.jsonl -> the table."""
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"stages": rows}, f, indent=2)
    if responses is not None:
        with open(os.path.join(out, "responses.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in responses)
    lines = ["| stage | " + " | ".join(TABLE) + " |", "|" + "---|" * (len(TABLE) + 1)]
    name = lambda r: r["name"] + (f" (stale via {', '.join(r['stale'])})" if r.get("stale") else "")
    lines += ["| " + name(r) + " | " + " | ".join(cell(k, r[k]) for k in TABLE) + " |" for r in rows]
    table = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    return table
