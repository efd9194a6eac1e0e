"""
Restart-and-Explore (Satori, arXiv 2502.02508), on token ids.

A COAT response is a sequence of steps; every step after the first starts with a meta-action token
(<|continue|>, <|reflect|>, <|explore|>). For each question with both correct and incorrect samples,
pick one of each, backtrack: drop its last t steps (1 <= t <= max_back), and append <|reflect|>. The
prefix becomes part of a new prompt ("restart state") from which the policy must verify / repair:
  status +1: built from a correct trajectory   (D+; a wrong finish costs the -0.5 bonus in reward.py)
  status -1: built from an incorrect trajectory (D-; a correct finish earns +0.5)
  status  0: the original question.
Satori builds the buffer offline, once, before RL (an online buffer drifted to mostly-correct
states); RestartBuffer below is the minimal online variant.
"""
import random
from dataclasses import dataclass

# -----------------------------------------------------------------------------
# steps

@dataclass
class RestartState:
    question_id: int
    prompt_ids: list   # the full prompt to sample from: question prompt (+ kept prefix + reflect)
    status: int        # reflect status: 0 original, +1 from a correct, -1 from an incorrect trajectory

def split_steps(response_ids, meta_ids):
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
    starts = split_steps(ids, meta_ids)
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

class RestartBuffer:
    """Online variant: restart states per question, refreshed from each new rollout.
    add() replaces a question's states when the new samples are balanced and leaves them unchanged
    otherwise (so a question does not vanish once the policy solves it every time)."""

    def __init__(self, meta_ids, reflect_id, max_back=2, seed=0, stop_ids=()):
        self.meta_ids, self.reflect_id, self.max_back = set(meta_ids), reflect_id, max_back
        self.stop_ids = set(stop_ids)
        self.rng = random.Random(seed)
        self.by_question = {}  # question_id -> list[RestartState]

    def add(self, question_id, prompt_ids, samples):
        s = restart_states(question_id, prompt_ids, samples, self.meta_ids, self.reflect_id,
                           self.max_back, self.rng, self.stop_ids)
        if s:
            self.by_question[question_id] = s
        return bool(s)

    def states(self):
        return [s for qs in self.by_question.values() for s in qs]

    def __len__(self):
        return sum(len(qs) for qs in self.by_question.values())
