"""RLT: a teacher that is shown the question AND its solution learns, by RL, to write explanations
from which a frozen student finds the solution likely; students are then fine-tuned on them.

    python train.py --stages=rlt          # after pretrain: teacher warm-up, GRPO on the RLT reward, two students

train.stage_rlt runs the three steps with the functions below; the RL itself is rl.rl_train with
reward_fn in place of Satori's reward.

The reward needs three rescored log-prob vectors. The explanation is tokenised ONCE and the same ids
are placed in both contexts, so that its tokens line up:
  teacher row: teacher_ids(question + solution) + ids(THINK) + ids(expl)
               -> teacher log-probs of the explanation [E]
  student row: ids(student_prefix(tok, question)) + ids(expl) + ids(STUDENT_SUFFIX) + ids(solution)
               -> student log-probs of the explanation [E] and of the solution [S]
(student_prompt(tok, q, expl) is exactly that student row before the solution, as one string.)
"""
import math

import torch

import parallel
import ppo
from data import answer_line, solution_text
from rollout import generate_shared, sampler_for

# the teacher's user message (tok.chat_prompt puts it in the run's prompt style)
TEACHER_MESSAGE = ("Here is a math problem and its solution. Explain step by step how to reach the solution, "
                   "so that a student who sees only the problem and your explanation can solve it. Write the "
                   "explanation between <think> and </think>.\nProblem: {question}\nSolution: {solution}")
THINK, END_THINK = "<think>", "</think>"        # the tags around an explanation
STUDENT_SUFFIX = END_THINK + "\n"


def teacher_prompt(tok, question, solution):
    """RLT's own teacher instruction (for real models: it alone is ~190 tokens)."""
    return tok.chat_prompt(TEACHER_MESSAGE.format(question=question, solution=solution))


def student_prefix(tok, question):
    """What the student reads before the explanation: Satori's prompt, then the opening tag."""
    return tok.prompt(question) + THINK


def student_prompt(tok, question, explanation):
    """The explanation as the student's own thinking; the solution follows."""
    return student_prefix(tok, question) + explanation + STUDENT_SUFFIX


def teacher_ids(tok, problem, full_prompt=False):
    """The teacher's prompt ids. full_prompt: teacher_prompt; else the question's own prompt with the
    solution appended, as the built-in base model has only seen ~130 positions."""
    if full_prompt:
        return tok.encode(teacher_prompt(tok, problem["question"], answer_line(problem)))
    return tok.encode_prompt(problem["question"] + "\nSolution: " + answer_line(problem))


def extract_explanation(text, open_tag=THINK, close_tag=END_THINK):
    """The explanation between the tags, stripped; None if malformed: not exactly one open_tag and
    one close_tag, the close before the open, or nothing but whitespace between them. Text before
    the open tag or after the close tag is ignored."""
    if text is None or text.count(open_tag) != 1 or text.count(close_tag) != 1:
        return None
    i, j = text.index(open_tag) + len(open_tag), text.index(close_tag)
    if j < i:
        return None
    return text[i:j].strip() or None


def _floats(x):
    return [float(v) for v in (x.tolist() if hasattr(x, "tolist") else x)]   # tensor, array or list


def teacher_reward(student_sol_logp, student_expl_logp, teacher_expl_logp, lam=3.0, alpha=0.01):
    """RLT teacher reward r = r_SS - lam * r_KL (float), from 1-D log-prob vectors of the real tokens:
      r_SS = mean_t(s_t) + alpha * min_t(s_t),  s_t = student log p of solution token t   [S]
      r_KL = mean_t(d_t) + alpha * max_t(d_t),  d_t = teacher_expl_logp_t - student_expl_logp_t  [E]
    r_SS: the student finds the solution likely (the min term: no token left very unlikely);
    r_KL: the explanation is not much likelier under the teacher, who saw the solution, than under
    the student, who did not (the max term: no token that only makes sense knowing the answer)."""
    s, se, te = _floats(student_sol_logp), _floats(student_expl_logp), _floats(teacher_expl_logp)
    if not s or not se or len(se) != len(te):
        raise ValueError(f"need S > 0 and E > 0 equal for both explanation vectors, got "
                         f"S={len(s)}, E={len(se)} and {len(te)}")
    d = [t - u for t, u in zip(te, se)]
    r_ss = math.fsum(s) / len(s) + alpha * min(s)
    r_kl = math.fsum(d) / len(d) + alpha * max(d)
    return r_ss - lam * r_kl


def reward_fn(cfg, tok, problems, student, dev):
    """reward_fn(teacher, states, outs) -> [reward per sample] for rl.rl_train: teacher_reward from the
    frozen student's and the current teacher's log-probs; cfg.rlt_missing_tags_reward for a sample
    without well-formed tags (or one that never stopped)."""
    def score(teacher, states, outs):
        rewards = [cfg.rlt_missing_tags_reward] * len(outs)
        rows = []          # (sample index, teacher prompt, student prompt, expl ids, suffix ids, solution ids)
        for i, (s, o) in enumerate(zip(states, outs)):
            expl = extract_explanation(tok.decode(o.body)) if o.finished else None
            if expl is not None:
                p = problems[s.question_id]
                rows.append((i, teacher_ids(tok, p, cfg.rlt_full_prompt) + tok.encode(THINK),
                             tok.encode(student_prefix(tok, p["question"])), tok.encode(expl),
                             tok.encode(STUDENT_SUFFIX), tok.encode(answer_line(p))))
        if not rows:
            if teacher is not None and parallel.is_sharded(teacher):     # its forward: a collective all join
                with torch.no_grad():
                    ppo.response_logprobs(teacher, ppo.stand_in(teacher))
            return rewards
        with torch.no_grad():
            t = ppo.make_rollouts([tp for _, tp, _, e, _, _ in rows], [e for *_, e, _, _ in rows], tok.pad_id, dev)
            t_lp = ppo.response_logprobs(teacher, t)
            st = ppo.make_rollouts([sp for _, _, sp, *_ in rows], [e + suf + sol for *_, e, suf, sol in rows],
                                   tok.pad_id, dev)
            s_lp = ppo.response_logprobs(student, st)
        for k, (i, _, _, e, suf, sol) in enumerate(rows):
            n, m = len(e), len(e) + len(suf)
            rewards[i] = teacher_reward(s_lp[k, m:m + len(sol)], s_lp[k, :n], t_lp[k, :n], cfg.rlt_lambda,
                                        cfg.rlt_alpha)
        return rewards
    return score


def warmup_examples(tok, problems, qids, full_prompt=False):
    """The teacher's format warm-up: (teacher prompt, <think> reference steps </think> + eos)."""
    steps = lambda p: solution_text(p).rsplit("\n", 1)[0]
    return [(teacher_ids(tok, problems[q], full_prompt), tok.encode(THINK + steps(problems[q]) + END_THINK)
             + [tok.eos_id]) for q in qids]


def explain(teacher, tok, problems, qids, cfg):
    """The teacher's texts for the questions qids (None where it never stopped), each process
    sampling its share -> all of them on every process."""
    prompts = [teacher_ids(tok, problems[q], cfg.rlt_full_prompt) for q in qids]
    outs = generate_shared(sampler_for(teacher, prompts, cfg.rlt_max_new_tokens, cfg.gen_batch), prompts,
                           cfg.rlt_max_new_tokens, cfg.seed + 7, temperature=cfg.rlt_temperature, stop_ids=tok.stop_ids)
    return [tok.decode(o.body) if o.finished else None for o in outs]


def student_examples(tok, problems, qids, texts):
    """The two students' data from the teacher's texts (None: it never stopped): for each well-formed
    explanation, (question prompt, <think> explanation </think> answer line + eos) for the RLT
    student and (question prompt, reference solution + eos) for the plain one -> (rlt, plain)."""
    rlt_ex, plain_ex = [], []
    for q, text in zip(qids, texts):
        expl = extract_explanation(text) if text is not None else None
        if expl is None:
            continue
        p = tok.encode_prompt(problems[q]["question"])
        rlt_ex.append((p, tok.encode(THINK + expl + STUDENT_SUFFIX + answer_line(problems[q])) + [tok.eos_id]))
        plain_ex.append((p, tok.encode(solution_text(problems[q])) + [tok.eos_id]))
    return rlt_ex, plain_ex
