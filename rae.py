"""
Restart-and-Explore (RAE), on token ids.

A COAT response is a sequence of steps; every step after the first starts with a meta-action token
(<|continue|>, <|reflect|>, <|explore|>). For each question with both correct and incorrect samples,
pick one of each, backtrack: drop its last t steps (1 <= t <= max_back), and append <|reflect|>. The
prefix becomes part of a new prompt ("restart state") from which the policy must verify / repair:
  status +1: built from a correct trajectory   (D+; a wrong finish costs the -0.5 bonus in reward.py)
  status -1: built from an incorrect trajectory (D-; a correct finish earns +0.5)
  status  0: the original question.
Satori builds the buffer offline, once, before RL (an online buffer drifts to mostly-correct
states); so does train.py's orm stage, which writes it to out/orm/rae.jsonl for the rl stage.
"""
import json
import os
import random
from dataclasses import asdict, dataclass

# -----------------------------------------------------------------------------
# steps

@dataclass
class RestartState:
    question_id: int
    prompt_ids: list   # the full prompt to sample from: question prompt (+ kept prefix + reflect)
    status: int        # reflect status: 0 original, +1 from a correct, -1 from an incorrect trajectory

def step_starts(response_ids, meta_ids):
    """Start index of each step: step 0 starts at 0, every meta-action token starts a new step.
    [] for an empty response. E.g. ids a b C c d R e (C, R meta) -> [0, 2, 5]."""
    if len(response_ids) == 0:
        return []
    return [0] + [i for i, tok in enumerate(response_ids) if i > 0 and tok in meta_ids]

def backtrack(response_ids, meta_ids, max_back, rng, stop_ids=()):
    """Drop the last t steps of a response, t uniform in 1..min(max_back, n_steps - 1): the prefix
    always keeps the first step and ends just before a meta token (a step boundary).
    A one-step response (or max_back 0) has nothing to drop without dropping everything, so t = 0:
    the whole response is kept and the model reflects on its finished attempt. Trailing stop
    tokens (EOS, <|im_end|>) are stripped first, so they never end up inside a prompt."""
    ids = list(response_ids)
    while ids and ids[-1] in stop_ids:
        ids.pop()
    starts = step_starts(ids, meta_ids)
    t_max = min(max_back, len(starts) - 1)
    if t_max < 1:
        return ids
    t = rng.randint(1, t_max)
    return ids[:starts[len(starts) - t]]

# -----------------------------------------------------------------------------
# restart states

def restart_states(question_id, prompt_ids, samples, meta_ids, reflect_id, max_back=2, rng=None,
                   stop_ids=()):
    """Restart states of one question from its sampled (response_ids, correct) pairs.
    [] if the samples are all correct or all incorrect (the question is dropped). Otherwise
    [original (status 0), from one random correct (+1), from one random incorrect (-1)], where a
    restart prompt = prompt_ids + backtracked response + [reflect_id]. rng: random.Random (seeded by
    the caller for reproducibility; None = Random(0))."""
    rng = random.Random(0) if rng is None else rng
    correct = [list(ids) for ids, ok in samples if ok]
    wrong = [list(ids) for ids, ok in samples if not ok]
    if not correct or not wrong:
        return []
    prompt_ids = list(prompt_ids)
    states = [RestartState(question_id, prompt_ids, 0)]
    for status, pool in ((+1, correct), (-1, wrong)):
        kept = backtrack(rng.choice(pool), meta_ids, max_back, rng, stop_ids)
        states.append(RestartState(question_id, prompt_ids + kept + [reflect_id], status))
    return states

def plain_states(problems, tok):
    """Every question of problems as a status-0 state: the plain prompts RL draws from."""
    return [RestartState(q, tok.encode_prompt(p["question"]), 0) for q, p in enumerate(problems)]

def build_buffer(questions, meta_ids, reflect_id, max_back=2, seed=0, stop_ids=()):
    """Offline restart buffer (Satori's default) over many questions.
    questions: iterable of (question_id, prompt_ids, samples) with samples [(response_ids, correct)].
    Returns (states, counts) with counts = {"kept", "dropped", "all_correct", "all_wrong"}
    (questions; dropped = all_correct + all_wrong). Deterministic for a given seed and order."""
    rng = random.Random(seed)
    states, counts = [], {"kept": 0, "dropped": 0, "all_correct": 0, "all_wrong": 0}
    for qid, prompt_ids, samples in questions:
        s = restart_states(qid, prompt_ids, samples, meta_ids, reflect_id, max_back, rng, stop_ids)
        if s:
            counts["kept"] += 1
            states.extend(s)
        else:
            counts["dropped"] += 1
            counts["all_correct" if any(ok for _, ok in samples) else "all_wrong"] += 1
    return states, counts

# -----------------------------------------------------------------------------
# the buffer on disk: one JSON state per line

def write_buffer(path, states):
    with open(path, "w") as f:
        f.writelines(json.dumps(asdict(s)) + "\n" for s in states)


def read_buffer(path):
    if not os.path.isfile(path):
        raise SystemExit(f"rl: {path} does not exist; run --stages=orm first (or --rae=false)")
    with open(path) as f:
        return [RestartState(**json.loads(line)) for line in f if line.strip()]
