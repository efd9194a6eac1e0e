import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rae  # noqa: E402

C, R, E, EOS = 101, 102, 103, 0   # <|continue|>, <|reflect|>, <|explore|>, end token
META = {C, R, E}
PROMPT = [7, 8, 9]
# 4 steps: [1 2] [C 3 4] [C 5 6] [R 7 EOS] -> starts 0, 2, 5, 8
GOOD = [1, 2, C, 3, 4, C, 5, 6, R, 7, EOS]
# 3 steps: [11] [E 12] [C 13 EOS]
BAD = [11, E, 12, C, 13, EOS]


def test_step_starts():
    assert rae.step_starts(GOOD, META) == [0, 2, 5, 8]
    assert rae.step_starts(BAD, META) == [0, 1, 3]
    assert rae.step_starts([C, 1, 2, R, 3], META) == [0, 3]  # leading meta token: still one step 0
    assert rae.step_starts([1, 2, 3], META) == [0]
    assert rae.step_starts([], META) == []


def test_backtrack_cuts_at_step_boundaries():
    seen = set()
    for seed in range(50):
        kept = rae.backtrack(GOOD, META, max_back=2, rng=random.Random(seed))
        assert tuple(kept) in {tuple(GOOD[:8]), tuple(GOOD[:5])}  # dropped 1 or 2 steps
        assert GOOD[len(kept)] in META  # the cut is right before a meta token
        seen.add(len(kept))
    assert seen == {5, 8}  # both t = 1 and t = 2 happen
    # max_back 1 -> always exactly the last step; 2 steps -> only the first kept
    assert rae.backtrack(GOOD, META, 1, random.Random(0)) == GOOD[:8]
    assert rae.backtrack([1, 2, C, 3], META, 2, random.Random(0)) == [1, 2]


def test_backtrack_single_step_keeps_all_but_stop():
    assert rae.backtrack([1, 2, 3, EOS], META, 2, random.Random(0), stop_ids={EOS}) == [1, 2, 3]
    assert rae.backtrack(GOOD, META, 0, random.Random(0), stop_ids={EOS}) == GOOD[:-1]


def test_restart_states_statuses_and_prompts():
    samples = [(GOOD, True), (BAD, False), (GOOD, True)]
    states = rae.restart_states(5, PROMPT, samples, META, R, max_back=2, rng=random.Random(0))
    assert [s.status for s in states] == [0, 1, -1]
    assert all(s.question_id == 5 for s in states)
    assert states[0].prompt_ids == PROMPT
    pos, neg = states[1].prompt_ids, states[2].prompt_ids
    assert pos[:3] == PROMPT and neg[:3] == PROMPT
    assert pos[-1] == R and neg[-1] == R
    assert pos[3:-1] in (GOOD[:5], GOOD[:8])
    assert neg[3:-1] == BAD[:1] or neg[3:-1] == BAD[:3]
    assert EOS not in pos and EOS not in neg


def test_unbalanced_questions_dropped():
    assert rae.restart_states(0, PROMPT, [(GOOD, True), (GOOD, True)], META, R) == []
    assert rae.restart_states(0, PROMPT, [(BAD, False)], META, R) == []
    assert rae.restart_states(0, PROMPT, [], META, R) == []


def test_build_buffer_counts_and_determinism():
    questions = [
        (0, PROMPT, [(GOOD, True), (BAD, False)]),
        (1, [4], [(GOOD, True)] * 3),
        (2, [5], [(BAD, False)] * 2),
        (3, [6], [(BAD, False), (GOOD, True), ([1, C, 2, C, 3], True)]),
    ]
    states, counts = rae.build_buffer(questions, META, R, seed=3)
    assert counts == {"kept": 2, "dropped": 2, "all_correct": 1, "all_wrong": 1}
    assert [(s.question_id, s.status) for s in states] == [(0, 0), (0, 1), (0, -1), (3, 0), (3, 1), (3, -1)]
    again, _ = rae.build_buffer(questions, META, R, seed=3)
    assert again == states
    # different seeds eventually pick different correct samples / cut points for question 3
    variants = {tuple(rae.build_buffer(questions, META, R, seed=s)[0][4].prompt_ids) for s in range(30)}
    assert len(variants) > 1
