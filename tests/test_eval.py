"""eval.py: self-correction counting on hand-made responses, evaluate with a fake sampler."""
import pytest

import data
import eval as evaluation
from eval import reflect_start_state, score_responses
from tokenizer import CONTINUE as C, EXPLORE as E, REFLECT as R

# a built-in problem: 47 + 38 = 85, 85 * 3 = 255, 255 - 59 = 196
P = data.problem_from(47, [("+", 38), ("*", 3), ("-", 59)])
S1, S2, S3 = "Step 1: 47 + 38 = 85.", "Step 2: 85 * 3 = 255.", "Step 3: 255 - 59 = 196."
BAD2 = "Step 2: 85 * 3 = 245."


def test_reflect_start_state():
    assert reflect_start_state(f"{S1}\n{S2}\n{S3}\nThe answer is \\boxed{{196}}.", P) is None   # no reflect
    # 1. a boxed answer before the reflection: that answer is graded
    assert reflect_start_state(f"{S1}\n{S2}\n{S3}\nThe answer is \\boxed{{196}}.{R}Check.", P) is True
    assert reflect_start_state(f"\\boxed{{5}}{R}Hm.", P) is False
    # 2. built-in task, no answer yet: right so far iff every written step is right
    assert reflect_start_state(f"{S1}\n{C}{S2}\n{R}Verify step 2.", P) is True
    assert reflect_start_state(f"{S1}\n{C}{BAD2}\n{R}In step 2 ...", P) is False
    assert reflect_start_state(f"{R}nothing yet", P) is None
    # 3. a user's problem without an answer before the reflection: unknown
    assert reflect_start_state(f"x = 3 {R} hmm \\boxed{{3}}", {"question": "Solve x", "answer": "3"}) is None


def test_score_responses_self_correction_counts():
    texts = [
        # wrong step, reflect, fixed: wrong -> right
        f"{S1}\n{C}{BAD2}\n{R}In step 2, 85 * 3 is 255.{E}{S2}\n{C}{S3}\nThe answer is \\boxed{{196}}.",
        # wrong boxed answer, reflect, corrected: wrong -> right
        f"{S1}\n{S2}\nThe answer is \\boxed{{200}}.{R}Step 3 is missing.{E}{S3}\nThe answer is \\boxed{{196}}.",
        # right so far, reflect, then broken: right -> wrong
        f"{S1}\n{C}{S2}\n{R}Verify: fine.{C}Step 3: 255 - 59 = 197.\nThe answer is \\boxed{{197}}.",
        # right so far, verified, right: no change
        f"{S1}\n{C}{S2}\n{R}Verify: fine.{C}{S3}\nThe answer is \\boxed{{196}}.",
        # wrong boxed answer changed to another wrong one: a change, neither direction
        f"\\boxed{{1}}{R}No.{E}The answer is \\boxed{{2}}.",
        # no reflection at all, correct
        f"{S1}\n{S2}\n{S3}\nThe answer is \\boxed{{196}}.",
        # no answer at all
        "Step 1: I do not know.",
    ]
    m = score_responses(texts, [P] * len(texts), lengths=[10, 20, 30, 40, 50, 60, 70])
    assert m["n"] == 7 and m["n_changed"] == 4
    assert m["wrong_to_right"] == pytest.approx(2 / 4) and m["right_to_wrong"] == pytest.approx(1 / 4)
    assert m["pass_at_1"] == pytest.approx(4 / 7)
    assert m["reflect_rate"] == pytest.approx(5 / 7) and m["explore_rate"] == pytest.approx(3 / 7)
    assert m["boxed_rate"] == pytest.approx(6 / 7) and m["mean_length"] == pytest.approx(40)
    assert m["mean_steps"] == pytest.approx((5 + 3 + 4 + 4 + 3 + 1 + 1) / 7)
    assert m["grammar_ok"] == pytest.approx(6 / 7)      # all but the one without an answer
    assert score_responses([texts[-2]], [P])["n_changed"] == 0
    assert score_responses([texts[3]], [P])["wrong_to_right"] == 0.0


class Canned:
    """A fake Sampler: returns fixed token sequences, one per prompt, in order."""
    def __init__(self, outs):
        self.outs = outs

    def generate(self, prompts, max_new_tokens, temperature=1.0, top_p=1.0, stop_ids=None, seed=None):
        assert temperature == 0.0 and len(prompts) == len(self.outs)
        from rollout import Completion
        return [Completion(tokens=t, logprobs=[0.0] * len(t), finish_reason="stop") for t in self.outs]


def test_evaluate_with_fake_sampler():
    from tokenizer import PROMPT_TEMPLATE, build_task_tokenizer
    tok = build_task_tokenizer([PROMPT_TEMPLATE.format(question=P["question"]) + P["solution"]] * 5, vocab_size=300)
    right = tok.encode(P["solution"]) + [tok.eos_id]
    wrong = tok.encode("Step 1: 1 + 1 = 2.\nThe answer is \\boxed{2}.") + [tok.eos_id]
    m, texts = evaluation.evaluate(None, tok, [P, P], sampler=Canned([right, wrong]), return_texts=True)
    assert m["pass_at_1"] == 0.5 and m["boxed_rate"] == 1.0
    assert m["mean_length"] == (len(right) + len(wrong)) / 2
    assert texts[0] == P["solution"]                   # stop token stripped from the text
