"""RLSP exploration reward, RLT teacher reward, ExPO term: hand-computed values."""
import pytest
import torch

import ppo
import rl
import config
from model import ModelConfig, Transformer
from rae import RestartState
from reward import expo_prompt, exploration_reward, reasoning_steps, rlsp_coef
from rlt import extract_explanation, student_prompt as rlt_student_prompt, teacher_prompt as rlt_teacher_prompt
from rlt import reward_fn as rlt_reward_fn, teacher_reward as rlt_reward
from rollout import Completion
from tokenizer import PROMPT_TEMPLATE, build_task_tokenizer

# -----------------------------------------------------------------------------
# RLSP exploration reward

C, R, E = "<|continue|>", "<|reflect|>", "<|explore|>"
COAT4 = f"First, 2 + 3 = 5.{C}Then 5 * 4 = 20.{R}Check: 20 / 4 = 5, correct.{C}So the answer is \\boxed{{20}}."


def test_exploration_counts_distinct_coat_steps():
    assert exploration_reward(COAT4) == 4 / 8
    more = COAT4.replace(f"{R}Check", f"{R}Wait, is 5 * 4 right?{E}Add 5 four times: 20.{R}Check")
    assert exploration_reward(more) == 6 / 8 > exploration_reward(COAT4)


def test_exploration_padding_earns_nothing():
    padded = (f"First, 2 + 3 = 5.{C}Then 5 * 4 = 20.{R}Check: 20 / 4 = 5, correct."
              f"{R}Check:  20 / 4 = 5,\ncorrect.{R}Check: 20 / 4 = 5, correct."   # verbatim repeats
              f"{C}   \n\n {C}{C}{C}"                                              # empty steps
              f"{C}........{C}x = 3.{C}<|im_end|><|im_end|>"                       # filler, too short
              f"{C}So the answer is \\boxed{{20}}.   \n\n<|im_end|>")               # trailing whitespace
    assert reasoning_steps(padded) == reasoning_steps(COAT4)
    assert exploration_reward(padded) == exploration_reward(COAT4) == 0.5


def test_exploration_plain_text_lines_and_coat_flag():
    plain = ("Step 1: add 2 and 3 to get 5.\nStep 2: multiply by 4 to get 20.\n\n\n"
             "Step 2: multiply by 4 to get 20.\n   \nok.\nThe answer is \\boxed{20}.\n")
    assert exploration_reward(plain) == 3 / 8
    assert exploration_reward(plain, coat=True) == 1 / 8   # no meta tokens: one COAT step
    assert exploration_reward("") == exploration_reward(None) == exploration_reward("   \n") == 0.0


def test_exploration_cap_and_max_steps():
    text = "Start: let n be 0 now." + "".join(f"{C}Add {i} to n, giving n = {i * (i + 1) // 2}." for i in range(1, 12))
    assert len(reasoning_steps(text)) == 12
    assert exploration_reward(text) == 1.0                     # capped at max_steps = 8
    assert exploration_reward(text, max_steps=16) == 12 / 16
    with pytest.raises(ValueError):
        exploration_reward(text, max_steps=0)


@pytest.fixture(scope="module")
def tok():
    return build_task_tokenizer([COAT4, PROMPT_TEMPLATE.format(question="What is 2 + 3?")] * 3, vocab_size=300)


def test_rlsp_reward_is_paid_right_or_wrong(tok):
    """rl.rewards adds coef * exploration_reward to Satori's reward whatever the outcome."""
    outs = [Completion(tokens=tok.encode(COAT4), finish_reason="stop")] * 2
    s = rl.Samples(states=[RestartState(0, [1], 0)], outs=outs, correct=[True, False], seed=0)
    r = ppo.make_rollouts([[1], [1]], [o.tokens for o in outs], tok.pad_id)
    reward = lambda **kw: rl.rewards(config.Config(orm=False, **kw), tok, s, r, 2, 0, 10).tolist()
    assert reward(rlsp_coef=0.5) == pytest.approx([0.25, -0.75])        # 0 / -1 rule + 0.5 * 4/8 steps
    assert reward(rlsp_coef=0.0) == [0.0, -1.0]
    assert reward(rlsp_coef=1.0, rlsp_max_steps=4) == pytest.approx([1.0, 0.0])


def test_rlsp_coef_schedules():
    assert [rlsp_coef(s, 100, 0.3) for s in (0, 50, 1000)] == [0.3, 0.3, 0.3]
    got = [rlsp_coef(s, 100, 0.2, "linear_decay") for s in (0, 25, 100, 150)]
    assert got == pytest.approx([0.2, 0.15, 0.0, 0.0])
    with pytest.raises(ValueError):
        rlsp_coef(0, 100, 0.2, "cosine")
    with pytest.raises(ValueError):
        rlsp_coef(0, 0, 0.2, "linear_decay")

# -----------------------------------------------------------------------------
# RLT teacher reward


def test_rlt_reward_three_token_example():
    sol = torch.tensor([-0.5, -1.0, -2.0])
    s_expl, t_expl = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-0.5, -1.0, -1.0])
    # r_SS = mean(sol) + .01 * min(sol) = -7/6 - .02;  d = [.5, 1, -.5]: r_KL = 1/3 + .01 * 1
    r_ss, r_kl = -7 / 6 - 0.02, 1 / 3 + 0.01
    assert rlt_reward(sol, s_expl, t_expl) == pytest.approx(r_ss - 3 * r_kl)   # = -2.21667
    assert rlt_reward(sol, s_expl, t_expl) == pytest.approx(-13 / 6 - 0.05)
    assert rlt_reward(sol.tolist(), s_expl.tolist(), t_expl.tolist(), lam=0.0) == pytest.approx(r_ss)
    assert rlt_reward(sol, s_expl, t_expl, lam=1.0, alpha=0.0) == pytest.approx(-7 / 6 - 1 / 3)
    # an explanation the student finds as likely as the teacher does: no KL penalty
    assert rlt_reward(sol, s_expl, s_expl) == pytest.approx(r_ss)
    with pytest.raises(ValueError):
        rlt_reward(sol, s_expl, t_expl[:2])
    with pytest.raises(ValueError):
        rlt_reward([], s_expl, t_expl)


def test_extract_explanation_and_missing_tags():
    assert extract_explanation("<think> add, then multiply </think> done") == "add, then multiply"
    assert extract_explanation("[a]x[/a]", "[a]", "[/a]") == "x"
    for bad in ("no tags", "<think> open only", "close only </think>", "</think> reversed <think>",
                "<think>a</think><think>b</think>", "<think> \n </think>", None):
        assert extract_explanation(bad) is None, bad



def test_rlt_reward_without_tags_or_stop(tok):
    """A sample without well-formed tags, or one that never stopped, gets rlt_missing_tags_reward
    (no model is run for them)."""
    cfg = config.Config(rlt_missing_tags_reward=-7.0)
    problems = [{"question": "What is 2 + 3?", "answer": "5"}]
    outs = [Completion(tokens=tok.encode("forgot the tags") + [tok.eos_id], finish_reason="stop"),
            Completion(tokens=tok.encode("<think> 2 + 3 = 5 </think>"), finish_reason="length")]
    score = rlt_reward_fn(cfg, tok, problems, None, "cpu")
    assert score(None, [RestartState(0, [1], 0)] * 2, outs) == [-7.0, -7.0]


def test_rlt_and_expo_prompts(tok):
    q, sol, expl = "What is 2 + 3?", "2 + 3 = \\boxed{5}", "Count {two} then three more."
    tp = rlt_teacher_prompt(tok, q, sol)
    assert q in tp and sol in tp and "<think>" in tp and tp.endswith("<|im_start|>assistant\n")
    # the student reads Satori's prompt, then the explanation as its own thinking
    assert rlt_student_prompt(tok, q, expl) == tok.prompt(q) + "<think>" + expl + "</think>\n"
    ep = expo_prompt(tok, q, "5")
    assert q in ep and "The correct final answer is 5." in ep and "\\boxed{}" in ep

# -----------------------------------------------------------------------------
# ExPO

CFG = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


def test_expo_loss_matches_full_forward_and_has_gradient():
    torch.manual_seed(0)
    m = Transformer(CFG)
    prompts = [[1, 5, 9], [2, 3], [4, 4, 4, 7, 8]]      # question-only prompts
    expl = [[6, 7, 8, 9, 10], [11], [12, 13, 3]]          # self-explanations ending in the answer
    r = ppo.make_rollouts(prompts, expl, pad_id=0)
    rows = []
    with torch.no_grad():
        for p, s in zip(prompts, expl):                   # independent reference: full logits
            lp = torch.log_softmax(m(torch.tensor([p + s]))[0, len(p) - 1:-1], -1)
            rows.append(lp.gather(-1, torch.tensor(s)[:, None])[:, 0])
    loss, info = ppo.expo_loss(m, r, beta=0.04)
    ref = torch.cat(rows).mean()
    assert loss.item() == pytest.approx(-0.04 * ref.item(), abs=1e-6)
    assert info["expo_logp"].item() == pytest.approx(ref.item(), abs=1e-5)
    loss_seq, _ = ppo.expo_loss(m, r, beta=0.5, agg="seq_mean")
    assert loss_seq.item() == pytest.approx(-0.5 * torch.stack([x.mean() for x in rows]).mean().item(), abs=1e-6)
    loss.backward()
    g = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
    assert g.abs().sum() > 0 and torch.isfinite(g).all()


def test_expo_select():
    r = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    assert ppo.expo_select(r, 4).tolist() == [True, False, False]
    # Satori's 0 / -1 rule reward: all wrong = mean -1
    assert ppo.expo_select(torch.tensor([-1.0, -1.0, 0.0, -1.0]), 2, threshold=-1.0).tolist() == [True, False]
    assert ppo.expo_select(torch.tensor([0.0, 1.0, 0.0]), 1).tolist() == [True, False, True]
    assert ppo.expo_select(torch.full((8,), 0.1), 8, threshold=0.1).tolist() == [True]   # float32 noise
    with pytest.raises(ValueError):
        ppo.expo_select(torch.zeros(5), 2)
