"""The CLI and the stage loop of nanosatori: pretrain -> synthesize -> sft -> orm -> rl -> distill ->
rl2 -> eval (and rlt, outside the default chain).

    python train.py                                   # the whole chain on the built-in task, out/
    python train.py --stages=pretrain,eval --base=    # pretrain a new base model, then its accuracy
    python train.py --stages=rl,eval --algo=grpo      # RL round 1 again with another method
    python train.py --stages=eval --out=runs/a        # evaluate every stage model found in runs/a
    python train.py --model=path/to/Qwen2.5-0.5B --data=train.jsonl --test_data=test.jsonl
    torchrun --nproc_per_node=8 train.py              # the same on 8 GPUs (gloo on CPU)
    python train.py --resume=true                     # after a crash: on from the newest checkpoint

Options are the fields of `Config` below, as --key=value (bools: --key=true/false, tuples:
--key=0.9,0.95). Every stage writes a complete HF model directory into out/<name>/ (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json) and reads its input model from there, so
any stage runs alone on the output of an earlier run. Progress goes to stdout, metrics to
out/metrics.jsonl, and the eval stage writes out/results.json and out/results.md.
"""
import dataclasses
import faulthandler
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch

import checkpoint
import data
import parallel
import rae
import reward
import rl
from model import ModelConfig, Transformer, ValueModel, load_config, num_params
from rollout import Sampler
from sft import SFTConfig, orm_train, sft_train
from tokenizer import Tokenizer, build_task_tokenizer


@dataclass
class Config:
    stages: str = ""              # comma-separated stage names; "" = every stage in STAGES, in order
    out: str = "out"              # everything of a run goes here
    seed: int = 0
    device: str = ""              # "" = cuda when available, else cpu
    resume: bool = False          # skip the stages out/progress.json marks done, resume the current one
    ckpt_every: int = 100         # SFT-like loops (pretrain, sft, orm, distill): steps between checkpoints
    rl_ckpt_every: int = 5        # RL loops: steps between checkpoints
    ckpt_keep: int = 2            # newest checkpoints kept per stage (a finished stage keeps its output only)
    min_free_gb: float = 1.0      # refuse to start with less free disk under --out
    # a user's model / data instead of the built-in ones
    model: str = ""               # HF Qwen2 directory used as the base model (skips pretraining)
    data: str = ""                # JSONL of training questions ({"question","answer"} per line)
    test_data: str = ""           # JSONL of held-out questions; "" = the last n_test of `data`
    # the built-in task (data.TaskConfig): a chain of arithmetic operations
    task_n_steps: int = 3
    task_min_steps: int = 2       # > 0: the number of operations is uniform in [min_steps, n_steps]
    task_ops: str = "+-*"
    task_start_max: int = 99
    task_max_operand: int = 20
    task_mul_max: int = 5
    task_max_value: int = 99      # with the model below: 0.695 greedy pass@1 after pretraining (seed 0)
    n_train: int = 20000          # problems with solutions: pretraining, COAT synthesis, format tuning
    n_test: int = 1000            # held-out problems: 1000 gives a standard error of ~1.4 points on pass@1 ~0.7
    n_rl: int = 30000             # further training questions, answers only: ORM/RAE, RL and distillation
                                  # (Satori's RL set is far larger than its demonstrations); 0 or --data:
                                  # the n_train. The base model memorises its training problems (per-step
                                  # error on them ~1/4 of held-out), so RL on them learns little (README)
    # the built-in base model (a small Qwen2): the shipped one, or pretrained by stage pretrain
    base: str = "assets/base"     # shipped base model, used when trained with this task/model/pretrain config;
                                  # --base= pretrains one (assets/base/nanosatori.json says how it was made)
    vocab_size: int = 384         # BPE vocabulary of the task tokenizer (chat tokens included)
    hidden_size: int = 128        # 0.54M parameters: 2 layers learn this task faster per second than 4
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    # pretraining of the base model: SFT on (prompt, CoT solution + eos)
    pretrain_lr: float = 3e-3
    pretrain_steps: int = 2000    # ~4M tokens (over half of them prompt); ~2.5 min on 2 idle CPU cores
    pretrain_batch_tokens: int = 2048
    pretrain_weight_decay: float = 0.1
    # COAT demonstration synthesis (data.SynthConfig)
    synth_questions: int = 1000   # training questions to synthesize from (up to 5 demos each)
    synth_samples: int = 4        # CoT samples per question from the base model
    synth_temperature: float = 1.0
    synth_max_new_tokens: int = 128
    # format tuning on COAT demonstrations
    sft_lr: float = 1e-3          # Satori: 2e-5 for a 7B model; a tiny model wants far more
    sft_epochs: float = 10.0      # greedy pass@1 (base 0.695), seed 0: 3 epochs 0.525, 6: 0.595, 10: 0.690
    sft_batch_tokens: int = 2048
    sft_weight_decay: float = 0.0
    # shared by every SFT-like stage
    warmup_frac: float = 0.03
    min_lr_ratio: float = 0.1
    grad_accum: int = 1
    clip: float = 1.0
    betas: tuple = (0.9, 0.95)
    log_every: int = 25
    # ORM + Restart-and-Explore: the format-tuned model samples rae_samples answers to each of the
    # first rae_questions RL questions; the same samples train the ORM and seed RAE
    rae: bool = True              # RL round 1 starts from RAE restart states (false: plain questions)
    rae_mix: float = 0.1          # share of RL round 1 prompts drawn from the RAE buffer; the rest are plain
                                  # RL questions (the buffer covers only rae_questions questions: at 0.5 each
                                  # state was drawn ~20 times in 400 steps and held-out fell, README)
    rae_questions: int = 256
    rae_samples: int = 8          # Satori: 8
    rae_temperature: float = 1.0
    rae_max_back: int = 2         # drop up to T steps before appending <|reflect|> (Satori: 2)
    orm: bool = True              # train the ORM; the critic starts from it
    orm_reward: bool = True       # add sigmoid(ORM score) to the reward
    orm_lr: float = 3e-4
    orm_epochs: float = 2.0
    orm_batch_tokens: int = 4096
    orm_margin: float = 2.0       # Bradley-Terry margin (Satori: 2)
    # RL (PPO + GAE), round 1 from format_tuned, round 2 from distilled
    rl_steps: int = 160           # what the 15-minute run has room for; gains still grow at 400 (README)
    rl_batch: int = 64            # sampled responses per PPO step
    rl_temperature: float = 1.2   # Satori: 0.6 in round 1; our policy is far more peaked (entropy ~0.01). Seed 0,
                                  # held-out after 160 steps: 0.6 0.649, 1.0 0.776, 1.2 0.778, 1.5 0.767 (README)
    rl_samples: int = 1           # PPO round 1: samples per prompt (Satori: 1)
    rl_max_new_tokens: int = 128
    sampler_dtype: str = "auto"   # weights the RL sampler decodes with: auto = a bf16 copy on GPU, the policy on CPU
    actor_lr: float = 2e-4        # Satori: 2e-7 for 7B; a tiny model wants far more
    critic_lr: float = 5e-4
    gamma: float = 1.0
    lam: float = 1.0              # Satori: 0.95; our critic (from the ORM) is still poor and GAE at 0.95 leans
                                  # on it: seed 0 RL round 1 0.675 with 0.95, 0.730 with 1.0 (README)
    clip_eps: float = 0.2
    value_clip: float = 0.2
    kl_coef: float = 0.0          # per-token KL penalty to the starting policy (Satori: 0)
    ppo_epochs: int = 1
    minibatch_size: int = 32      # responses per optimizer step
    micro_batch: int = 16         # responses per forward/backward (gradient accumulation)
    no_eos_penalty: float = -1.0  # reward of a response that never stops
    reward_clip: float = 10.0     # sequence rewards clipped to +-this (Satori: 10; 0 = off)
    reflect_bonus: float = 0.5    # RAE reflection bonus (Satori: 0.5)
    # the methods beside Satori's PPO (rl.algo_config; REFERENCE.md)
    algo: str = "ppo"             # ppo | grpo | drgrpo | dapo
    group_size: int = 8           # GRPO family: samples per prompt (rl_batch // group_size prompts a step)
    grpo_kl: float = 0.04         # GRPO / Dr. GRPO: beta of the k3 KL to the starting policy in the loss
    dapo_clip_high: float = 0.28  # DAPO: upper clip eps (the lower one is clip_eps)
    dapo_overlong_buffer: int = 32  # DAPO: soft length penalty over the last N tokens of rl_max_new_tokens
    dapo_max_refills: int = 4     # DAPO: extra sampling rounds to replace all-right / all-wrong groups
    rlsp_coef: float = 0.0        # RLSP: weight of the exploration reward (0 = off; any algo)
    rlsp_schedule: str = "constant"   # constant | linear_decay
    rlsp_max_steps: int = 8       # RLSP: distinct steps that earn the full exploration reward
    expo: bool = False            # ExPO: add beta * log pi(self-explanation | question) where a group fails
    expo_beta: float = 0.04       # ExPO: 0.04 best in the paper, 0.5 worse than plain GRPO
    expo_threshold: float = 0.0   # ExPO: groups with accuracy <= this get a self-explanation
    # RLT (--stages=rlt): teacher warm-up, GRPO on the RLT reward, two students
    rlt_questions: int = 256      # teacher questions (format warm-up and RL)
    rlt_full_prompt: bool = False  # RLT's own teacher instruction (real models); false: a short one
    rlt_warm_lr: float = 2e-3
    rlt_warm_epochs: float = 10.0
    rlt_warm_batch_tokens: int = 4096
    rlt_steps: int = 20
    rlt_group: int = 8            # RLT: 64 samples per prompt for a 7B teacher
    rlt_temperature: float = 0.7
    rlt_lr: float = 2e-4
    rlt_kl: float = 0.0
    rlt_lambda: float = 3.0
    rlt_missing_tags_reward: float = -10.0  # RLT: -1; our tiny student's log-probs of a wrong answer go to
                                  # about -5 per token, so -1 would pay the teacher for dropping the tags
    rlt_alpha: float = 0.01
    rlt_max_new_tokens: int = 96
    rlt_distill_questions: int = 512
    rlt_student_steps: int = 100
    # iterative self-improvement: distil the round-1 policy's solved questions into the base model, RL again
    distill_questions: int = 2048  # ~2,800 correct answers (seed 0); 256 (keep 0.5) gave ~300, distilled 0.255
    distill_samples: int = 2      # 4 (keep 0.5): distilled 0.747 instead of 0.677 (seed 0), 43 s more of the run
    distill_keep: float = 1.0     # share of the solved questions kept, hardest first. With 2 samples the pass rate
                                  # has two levels; keeping the hardest half (0.5) left ~1200 answers and the
                                  # distilled model underfit: seed 0, 0.677 against 0.769 with all (README)
    distill_lr: float = 1e-3
    distill_epochs: float = 3.0
    distill_batch_tokens: int = 4096
    rl2_steps: int = 20
    rl2_temperature: float = 1.0  # Satori round 2: 1.2; from a 0.690 distilled model (seed 0) 1.2 gave 0.555, 1.0 0.640, 0.6 0.610
    rl2_samples: int = 4          # samples per prompt (Satori: 8)
    rl2_actor_lr: float = 1e-4    # from a 0.769 distilled model (seed 0) 2e-4 lost 7.5 points, 1e-4 gave 0.775;
                                  # seeds 0-2: 0.776 -> 0.754 on average (README)
    # evaluation: greedy pass@1 on the held-out set
    eval_max_new_tokens: int = 160
    gen_batch: int = 64           # sequences decoded at once by synthesis and the RLT teacher
    eval_batch: int = 256         # sequences decoded at once by evaluation (greedy: the same answers, 1.4-1.8x faster)


# -----------------------------------------------------------------------------
# --key=value overrides

def _convert(text, typ, key):
    try:
        if typ is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is tuple:
            return tuple(float(x) for x in text.split(","))
        return typ(text)
    except ValueError:
        raise SystemExit(f"--{key}={text}: expected a {typ.__name__}") from None


def parse_args(argv, cfg=None):
    """Apply ["--key=value", ...] to a Config (converted to each field's type)."""
    cfg = cfg or Config()
    types = {f.name: type(f.default) for f in fields(cfg)}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"bad argument {arg!r}: options are --key=value")
        key, val = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in types:
            raise SystemExit(f"unknown option --{key}; options: " + " ".join(sorted(types)))
        setattr(cfg, key, _convert(val, types[key], key))
    return cfg


# -----------------------------------------------------------------------------
# logging: every line to stdout, metrics also to out/metrics.jsonl

def make_logger(out):
    """log(msg, **metrics): rank 0 prints msg and appends metrics to out/metrics.jsonl; others say nothing."""
    path = os.path.join(out, "metrics.jsonl")

    def log(msg, **metrics):
        if not parallel.is_main():
            return
        print(msg, flush=True)
        if metrics:
            with open(path, "a") as f:
                f.write(json.dumps({"time": time.time(), **metrics}) + "\n")
    return log


# -----------------------------------------------------------------------------
# problems, model directories

def task_config(cfg):
    return data.TaskConfig(**{f.name[5:]: getattr(cfg, f.name) for f in fields(cfg) if f.name.startswith("task_")})


def load_problems(cfg):
    """(train, test, rl) lists of {"question", "answer", ...}: the user's JSONL (rl is train), or the
    built-in task, whose RL questions are n_rl problems beyond the n_train (0: rl is train)."""
    if cfg.data:
        train = data.load_jsonl(cfg.data)
        if cfg.test_data:
            return train, data.load_jsonl(cfg.test_data), train
        random.Random(cfg.seed).shuffle(train)
        train, test = train[:-cfg.n_test], train[-cfg.n_test:]
        return train, test, train
    # builtin_split fills train in stream order, so the first n_train are the same with or without n_rl
    problems, test = data.builtin_split(task_config(cfg), cfg.n_train + cfg.n_rl, cfg.n_test, cfg.seed)
    train, rl_questions = problems[:cfg.n_train], problems[cfg.n_train:]
    return train, test, rl_questions or train


def get_device(cfg):
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def stage_dir(cfg, name):
    """out/<name>; the base model is the user's directory when --model is given."""
    if name == "base" and cfg.model:
        return cfg.model
    return os.path.join(cfg.out, name)


def has_model(path):
    return os.path.isfile(os.path.join(path, "config.json"))


def load_stage(cfg, name):
    path = stage_dir(cfg, name)
    if not has_model(path) and has_model(path + ".old"):    # save_stage crashed between its two renames
        os.replace(path + ".old", path)
    if not has_model(path):
        raise SystemExit(f"{path}: no model there; run the stage that makes it first")
    model = Transformer.from_pretrained(path, device=get_device(cfg), dtype=torch.float32)
    return model, Tokenizer.from_pretrained(path)


def save_stage(cfg, name, model, tok, files=None, models=None):
    """Write out/<name> as a complete HF directory (+ files: {file name: text}, + models: {subdirectory:
    model}, e.g. the critic), atomically (rank 0; the others wait): a crash leaves either the old
    directory or the new one, never half of one."""
    path = stage_dir(cfg, name)
    if parallel.is_main():
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for sub, m in (models or {}).items():
            m.save_pretrained(os.path.join(tmp, sub))
        for fname, text in (files or {}).items():
            with open(os.path.join(tmp, fname), "w") as f:
                f.write(text)
        checkpoint.fsync_tree(tmp)
        old = path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(path):
            os.replace(path, old)       # a crash from here on leaves old (restored by load_stage) or new
        os.replace(tmp, path)
        checkpoint.fsync_tree(os.path.dirname(os.path.abspath(path)), files=False)
        shutil.rmtree(old, ignore_errors=True)
    parallel.barrier()
    return path


def ckpt_dir(state, loop):
    """out/ckpt/<stage>/<loop>: the checkpoints of one training loop of the running stage (main
    removes out/ckpt/<stage> once the stage's output is written)."""
    return os.path.join(state["out"], "ckpt", state["stage"], loop)


def sft_kw(cfg, state, loop):
    """Keyword arguments of sft_train / orm_train: logging, metrics, checkpoints of loop `loop`."""
    return dict(log=state["log"], on_metrics=lambda d: log_metrics(state, d), name=loop,
                ckpt_dir=ckpt_dir(state, loop), ckpt_every=cfg.ckpt_every, keep=cfg.ckpt_keep)


def sft_config(cfg, prefix, **kw):
    """The SFTConfig of one stage: its `<prefix>_*` fields plus the shared ones."""
    own = {f.name: getattr(cfg, f"{prefix}_{f.name}") for f in fields(SFTConfig) if hasattr(cfg, f"{prefix}_{f.name}")}
    shared = {k: getattr(cfg, k) for k in ("warmup_frac", "min_lr_ratio", "grad_accum", "clip", "betas",
                                           "log_every", "seed")}
    return SFTConfig(**{**shared, **own, **kw})


# -----------------------------------------------------------------------------
# evaluation: greedy pass@1, COAT statistics, self-correction (Satori Table 4)

def reflect_start_state(text, problem):
    """Was the response right BEFORE its first <|reflect|>? True / False, or None when there is no
    <|reflect|> or nothing committed before it. (Lives here until reward.py takes it over.)
      1. The text before the first <|reflect|> holds a \\boxed{} answer: that answer, graded against
         problem["answer"] (Satori's case: answer, then reflect on it).
      2. Otherwise, for a built-in task problem: the chain is right so far iff every step written
         before the reflection is correct (data.check_steps): a reflection that interrupts a
         correct partial chain starts from "right", one that follows a wrong step from "wrong".
         (The last "= N" alone would call every mid-chain verification "wrong", which it is not.)
      3. Otherwise (a user's problem, no answer yet): None, excluded from the counts."""
    i = text.find("<|reflect|>")
    if i < 0:
        return None
    before = text[:i]
    ans = reward.extract_answer(before)
    if ans is not None:
        return reward.is_equiv(ans, problem["answer"])
    if ("ops" in problem and "start" in problem) or data.parse_question(problem["question"]) is not None:
        for t in reward.META_TOKENS:
            before = before.replace(t, "\n")
        steps = data.solution_steps(before)
        if not steps:
            return None
        first_wrong = data.check_steps(problem, steps)
        return first_wrong is None or first_wrong >= len(steps)
    return None


def score_responses(texts, problems, lengths=None):
    """Metrics of a set of responses (texts, one per problem). Self-correction: among responses with
    a <|reflect|> whose state before it is known (reflect_start_state), those whose answer CHANGES:
    the right/wrong state flips, or, with a \\boxed answer before the reflection, the final answer
    differs from it (wrong -> another wrong counts as a change too). wrong_to_right and
    right_to_wrong are shares of those changes (0 when there are none)."""
    n = len(texts)
    correct = [reward.is_equiv(reward.extract_answer(t), p["answer"]) for t, p in zip(texts, problems)]
    changed = w2r = r2w = 0
    for t, p, ok in zip(texts, problems, correct):
        before = reflect_start_state(t, p)
        if before is None:
            continue
        early = reward.extract_answer(t[:t.find("<|reflect|>")])
        if before != ok or (early is not None and not reward.is_equiv(early, reward.extract_answer(t))):
            changed += 1
            w2r += (not before) and ok
            r2w += before and not ok
    share = lambda xs: sum(xs) / max(n, 1)
    return {"n": n,
            "pass_at_1": share(correct),
            "wrong_to_right": w2r / changed if changed else 0.0,
            "right_to_wrong": r2w / changed if changed else 0.0,
            "n_changed": changed,
            "reflect_rate": share("<|reflect|>" in t for t in texts),
            "explore_rate": share("<|explore|>" in t for t in texts),
            "mean_steps": share(len(reward.split_steps(t)) for t in texts),
            "grammar_ok": share(reward.coat_grammar_ok(t) for t in texts),
            "boxed_rate": share(reward.extract_answer(t) is not None for t in texts),
            "mean_length": share(lengths) if lengths is not None else share(len(t) for t in texts)}


def evaluate(model, tok, problems, sampler=None, max_new_tokens=160, batch_size=64, return_texts=False):
    """Greedy (temperature 0) pass@1 on held-out problems plus COAT statistics (score_responses);
    mean_length is in generated tokens (stop token included). Under torchrun every process answers
    its share of the problems and every process gets the metrics of all of them."""
    prompts = [tok.encode_prompt(p["question"]) for p in parallel.shard(problems)]
    if sampler is None and prompts:     # a process may get no problem when there are fewer than processes
        model.eval()
        longest = max(len(p) for p in prompts) + max_new_tokens
        sampler = Sampler(model, max_batch=batch_size, max_seq_len=longest)
    outs = sampler.generate(prompts, max_new_tokens, temperature=0.0, stop_ids=tok.stop_ids, seed=0) if prompts else []
    stop = set(tok.stop_ids)
    texts = parallel.gather([tok.decode(o.tokens[:-1] if o.tokens and o.tokens[-1] in stop else o.tokens) for o in outs])
    m = score_responses(texts, problems, parallel.gather([len(o.tokens) for o in outs]))
    return (m, texts) if return_texts else m


# -----------------------------------------------------------------------------
# stages: each is fn(cfg, state) with state = {"log", "train", "test", "rl"}; add one with one line in STAGES

def shipped_base(cfg):
    """The directory of the shipped base model if it was pretrained with this run's task, model and
    pretraining options (its nanosatori.json), else None. The seed is not compared: a run's seed
    varies the stages after the base (pretraining is seed-sensitive, see the README). Nor is n_test:
    the held-out problems are drawn beside the training ones, which stay the same for any n_test."""
    path = cfg.base if os.path.isabs(cfg.base) else os.path.join(os.path.dirname(os.path.abspath(__file__)), cfg.base)
    meta = os.path.join(path, "nanosatori.json")
    if not cfg.base or cfg.data or not os.path.isfile(meta):    # a user's data needs its own base
        return None
    with open(meta) as f:
        made = json.load(f)["options"]
    mine = asdict(cfg)
    return path if all(json.dumps(v) == json.dumps(mine[k]) for k, v in made.items() if k not in ("seed", "n_test")) else None


def stage_pretrain(cfg, state):
    """Tokenizer + small Qwen2 base model trained on (prompt, CoT solution + eos) -> out/base; or a
    copy of the shipped base (--base) when it was made with the same options."""
    log = state["log"]
    if cfg.model:
        log(f"pretrain: --model given, {cfg.model} is the base model")
        return
    shipped = shipped_base(cfg)
    if shipped:
        model, tok = Transformer.from_pretrained(shipped), Tokenizer.from_pretrained(shipped)
        save_stage(cfg, "base", model, tok)
        log(f"pretrain: the shipped base {shipped} was made with these options; copied to {stage_dir(cfg, 'base')} "
            f"(--base= pretrains a new one)")
        return
    torch.manual_seed(cfg.seed)
    train = state["train"]
    corpus = [Tokenizer.prompt(p["question"]) + p["solution"] for p in train[:5000]]
    tok = build_task_tokenizer(corpus, vocab_size=cfg.vocab_size)
    mcfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                       num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                       max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True)
    model = Transformer(mcfg).to(get_device(cfg))
    log(f"pretrain: {num_params(model) / 1e6:.2f}M parameters, vocab {tok.vocab_size}, {len(train)} problems")
    examples = [(tok.encode_prompt(p["question"]), tok.encode(p["solution"]) + [tok.eos_id]) for p in train]
    scfg = sft_config(cfg, "pretrain", max_steps=cfg.pretrain_steps)
    m = sft_train(model, examples, scfg, **sft_kw(cfg, state, "pretrain"))
    path = save_stage(cfg, "base", model, tok)
    log(f"pretrain: {m['steps']} steps, {m['tokens']} tokens in {m['time_s']:.0f}s, loss {m['loss']:.4f} -> {path}",
        stage="pretrain", done=True, **{k: v for k, v in m.items() if k != "losses"})


def stage_synthesize(cfg, state):
    """COAT demonstrations from the base model (generator -> exact critic -> one per type per
    question, data.synthesize_coat) -> out/synthesize/demos.jsonl."""
    log = state["log"]
    model, tok = load_stage(cfg, "base")
    problems = state["train"][:cfg.synth_questions]
    longest = max(len(tok.encode_prompt(p["question"])) for p in problems)
    # a continuation's prompt holds the chain so far and the critic's hint line, then generates:
    # room for two generations and a hint (< 64 tokens)
    sampler = Sampler(model, max_batch=cfg.gen_batch, max_seq_len=longest + 2 * cfg.synth_max_new_tokens + 64)
    scfg = data.SynthConfig(n_samples=cfg.synth_samples, temperature=cfg.synth_temperature,
                            max_new_tokens=cfg.synth_max_new_tokens)
    records = data.synthesize_coat(data.sampler_generator(sampler, tok.stop_ids), tok, parallel.shard(problems),
                                   scfg, seed=cfg.seed + 7919 * parallel.rank(), log=log)
    records = parallel.gather(records)
    if parallel.is_main():
        data.write_demos(demos_path(cfg), records)
    parallel.barrier()
    log(f"synthesize: {len(records)} demonstrations -> {demos_path(cfg)}", stage="synthesize",
        **dict(data.synthesize_stats(records)))


def demos_path(cfg):
    return os.path.join(cfg.out, "synthesize", "demos.jsonl")


def demo_example(tok, demo):
    """(prompt ids, response ids ending in eos, loss mask) of a COAT demonstration. For a built-in
    task problem the steps that the demonstration later corrects (any step line that is not a line
    of the reference solution) are context, not targets: the model learns to reflect and correct,
    not to make the base model's mistakes. Reflections and the rest are targets."""
    parsed = data.parse_question(demo["question"])
    good = set(data.problem_from(*parsed)["solution"].split("\n")) if parsed else None
    ids, keep = [], []
    for meta, text in reward.split_steps(demo["response"]):
        piece = tok.encode((meta or "") + text)
        ok = good is None or meta == "<|reflect|>" or all(
            line.strip() in good for line in text.replace("<|im_end|>", "").split("\n") if line.strip())
        ids += piece
        keep += [ok] * len(piece)
    if ids[-1:] != [tok.eos_id]:
        ids, keep = ids + [tok.eos_id], keep + [True]
    return tok.encode_prompt(demo["question"]), ids, keep


def stage_sft(cfg, state):
    """Format tuning: base + COAT tokens, SFT on demos.jsonl ({"question", "response", ...} per line,
    response = COAT text ending in \\boxed{} and the eos token) -> out/format_tuned."""
    log, path = state["log"], demos_path(cfg)
    if not os.path.isfile(path):
        raise SystemExit(f"sft: {path} does not exist; run --stages=synthesize first")
    model, tok = load_stage(cfg, "base")
    if tok.add_coat_tokens():
        model.resize_vocab(tok.vocab_size)
    with open(path) as f:
        demos = [json.loads(line) for line in f if line.strip()]
    if not demos:
        raise SystemExit(f"sft: {path} holds no demonstrations (was the base model too weak to synthesize any?)")
    # responses already end in the eos token text (data.synthesize_coat); add it where one does not
    examples = [demo_example(tok, d) for d in demos]
    log(f"sft: {len(examples)} COAT demonstrations from {path}")
    m = sft_train(model, examples, sft_config(cfg, "sft"), **sft_kw(cfg, state, "sft"))
    out = save_stage(cfg, "format_tuned", model, tok)
    log(f"sft: loss {m['first_loss']:.4f} -> {m['loss']:.4f} in {m['time_s']:.0f}s -> {out}",
        stage="sft", done=True, **{k: v for k, v in m.items() if k != "losses"})


# -----------------------------------------------------------------------------
# stage 2: sampling + grading shared by the ORM, RAE, RL and distillation

def stage_orm(cfg, state):
    """The format-tuned model samples rae_samples solutions of rae_questions RL questions; the
    same samples give the ORM its (correct, incorrect) pairs and RAE its restart states
    -> out/orm (ValueModel) and out/orm/rae.jsonl."""
    log, train = state["log"], state["rl"]
    policy, tok = load_stage(cfg, "format_tuned")
    qids = list(range(min(cfg.rae_questions, len(train))))
    prompts = [tok.encode_prompt(train[q]["question"]) for q in qids]
    K = cfg.rae_samples
    sampler = Sampler(policy, max_batch=cfg.rl_batch * K, max_seq_len=max(map(len, prompts)) + cfg.rl_max_new_tokens)
    t0 = time.time()
    responses, correct = rl.sample_all(sampler, tok, train, prompts, qids, K, cfg.rae_temperature,
                                    cfg.rl_max_new_tokens, cfg.seed)
    log(f"orm: {len(responses)} samples of {len(qids)} questions in {time.time() - t0:.0f}s, "
        f"{sum(correct) / len(correct):.3f} correct")
    per_q = [[(responses[i * K + j], correct[i * K + j]) for j in range(K)] for i in range(len(qids))]
    pairs = []
    for p, samples in zip(prompts, per_q):
        good = [r for r, ok in samples if ok]
        bad = [r for r, ok in samples if not ok]
        pairs += [(p, g, b) for g, b in zip(good, bad)]
    orm = ValueModel.from_policy(policy)
    if pairs:
        m = orm_train(orm, pairs, sft_config(cfg, "orm"), margin=cfg.orm_margin,
                      **{k: v for k, v in sft_kw(cfg, state, "orm").items() if k != "name"})
        log(f"orm: {len(pairs)} pairs, loss {m['loss']:.4f}", stage="orm", pairs=len(pairs), loss=m["loss"])
    else:
        log("orm: no question has both a correct and an incorrect sample; the ORM stays untrained")
    states, counts = rae.build_buffer(zip(qids, prompts, per_q), tok.coat_ids, tok.reflect_id,
                                      max_back=cfg.rae_max_back, seed=cfg.seed, stop_ids=tok.stop_ids)
    buffer = "".join(json.dumps({"question_id": s.question_id, "prompt_ids": s.prompt_ids, "status": s.status}) + "\n"
                     for s in states)
    save_stage(cfg, "orm", orm, tok, files={"rae.jsonl": buffer})
    log(f"rae: {len(states)} restart states from {counts['kept']} questions "
        f"({counts['all_correct']} all correct, {counts['all_wrong']} all wrong dropped)", stage="rae", **counts)


def load_rae(cfg):
    path = os.path.join(stage_dir(cfg, "orm"), "rae.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"rl: {path} does not exist; run --stages=orm first (or --rae=false)")
    with open(path) as f:
        return [rae.RestartState(**json.loads(line)) for line in f if line.strip()]


def run_rl(cfg, state, src, dst, pool, temperature, group, steps, score=None, problems=None, critic_from=None):
    """rl.rl_train from out/<src> -> out/<dst> (with its critic in out/<dst>/critic) on `pool` (question
    ids index problems, default the RL questions). PPO's critic starts from critic_from when that
    holds a model, else from the ORM (or the policy's trunk with --orm=false); the ORM also scores
    responses with --orm_reward; a KL term compares with a frozen copy of out/<src>."""
    dev = get_device(cfg)
    policy, tok = load_stage(cfg, src)
    pcfg = rl.algo_config(cfg, group)
    orm_dir = stage_dir(cfg, "orm")
    use_orm = cfg.orm and has_model(orm_dir) and score is None
    critic = None
    if pcfg.adv_estimator == "gae":
        init = critic_from if critic_from and has_model(critic_from) else orm_dir if use_orm else None
        critic = ValueModel.from_pretrained(init, device=dev) if init else ValueModel.from_policy(policy)
        state["log"](f"{dst}: the critic starts from {init or 'the policy (a zero value head)'}")
    scorer = ValueModel.from_pretrained(orm_dir, device=dev).eval() if use_orm and cfg.orm_reward else None
    ref = load_stage(cfg, src)[0].eval().requires_grad_(False) if pcfg.kl_coef or pcfg.kl_loss_coef else None
    problems = state["rl"] if problems is None else problems
    rl.rl_train(cfg, policy, tok, problems, pool, temperature, group, steps, critic, scorer, ref, score,
                name=dst, log=state["log"], ckpt_dir=ckpt_dir(state, dst))
    save_stage(cfg, dst, policy, tok, models={"critic": critic} if critic is not None else None)


def rl_group(cfg, stage):
    """(samples per prompt, the option that sets it) of an RL stage: PPO round 1 samples each prompt
    once, round 2 rl2_samples times; the GRPO family group_size times; the RLT teacher rlt_group."""
    if stage == "rlt":
        return cfg.rlt_group, "--rlt_group"
    if cfg.algo != "ppo":
        return cfg.group_size, "--group_size"
    return (cfg.rl_samples, "--rl_samples") if stage == "rl" else (cfg.rl2_samples, "--rl2_samples")


def stage_rl(cfg, state):
    """RL round 1: PPO from the format-tuned model; a share rae_mix of the prompts are
    Restart-and-Explore states, the rest plain RL questions (all plain with --rae=false) -> out/rl_round1."""
    tok = Tokenizer.from_pretrained(stage_dir(cfg, "format_tuned"))
    pool = plain_pool(state["rl"], tok)
    buffer = load_rae(cfg) if cfg.rae else []
    if cfg.rae and not buffer:   # no question had both right and wrong samples
        state["log"]("rl: the RAE buffer is empty; training on the plain questions")
    if buffer:
        pool = [(buffer, cfg.rae_mix), (pool, 1 - cfg.rae_mix)]
    group, _ = rl_group(cfg, "rl")
    run_rl(cfg, state, "format_tuned", "rl_round1", pool, cfg.rl_temperature, group, cfg.rl_steps)


def plain_pool(problems, tok):
    """Every question of problems as a status-0 state."""
    return [rae.RestartState(q, tok.encode_prompt(p["question"]), 0) for q, p in enumerate(problems)]


def stage_distill(cfg, state):
    """Iterative self-improvement: the round-1 policy answers training questions; of those it solves
    (pass rate > 0) a share distill_keep is kept, hardest first, and their correct answers are
    distilled by SFT into the base model (+ COAT tokens) -> out/distilled."""
    log, train = state["log"], state["rl"]
    policy, tok = load_stage(cfg, "rl_round1")
    lo = cfg.rae_questions      # questions the ORM and RAE did not sample
    qids = list(range(lo, min(lo + cfg.distill_questions, len(train))))
    prompts = [tok.encode_prompt(train[q]["question"]) for q in qids]
    K = cfg.distill_samples
    sampler = Sampler(policy, max_batch=cfg.rl_batch * K, max_seq_len=max(map(len, prompts)) + cfg.rl_max_new_tokens)
    responses, correct = rl.sample_all(sampler, tok, train, prompts, qids, K, cfg.rl_temperature,
                                    cfg.rl_max_new_tokens, cfg.seed + 1)
    rate = [sum(correct[i * K:(i + 1) * K]) / K for i in range(len(qids))]
    solved = sorted((r, i) for i, r in enumerate(rate) if r > 0)
    keep = [i for _, i in solved[:max(1, int(len(solved) * cfg.distill_keep))]]
    examples = [(prompts[i], responses[i * K + j]) for i in keep for j in range(K) if correct[i * K + j]]
    if not examples:
        raise SystemExit(f"distill: the round-1 policy solved none of {len(qids)} questions; nothing to distil")
    log(f"distill: {len(keep)} of the {len(solved)} solved questions of {len(qids)}, hardest first (pass rate <= "
        f"{solved[len(keep) - 1][0]:.2f}), "
        f"{len(examples)} correct responses")
    del policy
    base, btok = load_stage(cfg, "base")
    if btok.add_coat_tokens():
        base.resize_vocab(btok.vocab_size)
    m = sft_train(base, examples, sft_config(cfg, "distill"), **sft_kw(cfg, state, "distill"))
    save_stage(cfg, "distilled", base, btok)
    log(f"distill: loss {m['first_loss']:.4f} -> {m['loss']:.4f}", stage="distill", loss=m["loss"])


def stage_rl2(cfg, state):
    """RL round 2: PPO from the distilled model on plain questions (no RAE), at a higher temperature
    with several samples per prompt -> out/rl_round2."""
    tok = Tokenizer.from_pretrained(stage_dir(cfg, "distilled"))
    pool = plain_pool(state["rl"], tok)
    group, _ = rl_group(cfg, "rl2")
    # the distilled model imitates the round-1 policy, whose values round 1's critic has learned; the ORM
    # (trained on format-tuned answers) starts ~20x off (value loss 2.3 against 0.1)
    run_rl(dataclasses.replace(cfg, actor_lr=cfg.rl2_actor_lr), state, "distilled", "rl_round2", pool, cfg.rl2_temperature,
           group, cfg.rl2_steps,
           critic_from=os.path.join(stage_dir(cfg, "rl_round1"), "critic"))


# -----------------------------------------------------------------------------
# RLT: a teacher that sees the answer learns to write explanations a frozen student learns from

def stage_rlt(cfg, state):
    """RLT on the built-in task (not in the default chain; --stages=rlt after pretrain):
      1. the teacher (the base model) learns the format by SFT on (teacher prompt with the answer,
         <think> reference steps </think>) -> out/rlt_warm;
      2. GRPO on the RLT reward (frozen student = the base model) -> out/rlt_teacher;
      3. the teacher explains rlt_distill_questions other training questions; the base model is
         fine-tuned on question -> <think> explanation </think> answer (out/rlt_student), and,
         with the same questions and steps, on question -> reference solution (out/plain_student);
         both are evaluated greedily on the test set -> out/rlt_results.json."""
    log, train, test = state["log"], state["train"], state["test"]
    dev = get_device(cfg)
    teacher, tok = load_stage(cfg, "base")
    steps_only = lambda p: p["solution"].rsplit("\n", 1)[0]
    qa = range(min(cfg.rlt_questions, len(train)))
    warm = [(rl.rlt_teacher_ids(tok, train[q], cfg.rlt_full_prompt), tok.encode("<think>" + steps_only(train[q]) + "</think>") + [tok.eos_id])
            for q in qa]
    sft_train(teacher, warm, sft_config(cfg, "rlt_warm"), **sft_kw(cfg, state, "rlt_warm"))
    save_stage(cfg, "rlt_warm", teacher, tok)
    del teacher
    pool = [rae.RestartState(q, rl.rlt_teacher_ids(tok, train[q], cfg.rlt_full_prompt), 0) for q in qa]
    student = load_stage(cfg, "base")[0].eval().requires_grad_(False)
    rcfg = dataclasses.replace(cfg, algo="grpo", orm=False, grpo_kl=cfg.rlt_kl, actor_lr=cfg.rlt_lr,
                               rl_max_new_tokens=cfg.rlt_max_new_tokens, reward_clip=0.0)   # log-prob rewards: no clip
    run_rl(rcfg, state, "rlt_warm", "rlt_teacher", pool, cfg.rlt_temperature, rl_group(cfg, "rlt")[0], cfg.rlt_steps,
           score=rl.rlt_scorer(cfg, tok, train, student, dev), problems=train)
    del student
    # 3. explanations for new questions -> two students, same questions and steps
    teacher, _ = load_stage(cfg, "rlt_teacher")
    qd = list(range(len(qa), min(len(qa) + cfg.rlt_distill_questions, len(train))))
    prompts = [rl.rlt_teacher_ids(tok, train[q], cfg.rlt_full_prompt) for q in qd]
    sampler = Sampler(teacher, max_batch=cfg.gen_batch, max_seq_len=max(map(len, prompts)) + cfg.rlt_max_new_tokens)
    mine = parallel.shard(list(range(len(qd))))
    outs = sampler.generate([prompts[i] for i in mine], cfg.rlt_max_new_tokens, temperature=cfg.rlt_temperature,
                            stop_ids=tok.stop_ids, seed=cfg.seed + 7 + 7919 * parallel.rank())
    texts = parallel.gather([tok.decode(o.tokens[:-1]) if o.finished else None for o in outs])
    rlt_ex, plain_ex = [], []
    for q, text in zip(qd, texts):
        expl = reward.extract_explanation(text) if text is not None else None
        if expl is None:
            continue
        p = tok.encode_prompt(train[q]["question"])
        rlt_ex.append((p, tok.encode("<think>" + expl + reward.RLT_STUDENT_SUFFIX + rl.rlt_solution(train[q])) + [tok.eos_id]))
        plain_ex.append((p, tok.encode(train[q]["solution"]) + [tok.eos_id]))
    if not rlt_ex:
        raise SystemExit(f"rlt: the teacher wrote no well-formed explanation for {len(qd)} questions")
    log(f"rlt: {len(rlt_ex)} explanations with tags of {len(qd)} questions; two students, "
        f"{cfg.rlt_student_steps} steps each")
    results = {"n_examples": len(rlt_ex), "teacher_questions": len(qa)}
    for name, ex in (("rlt_student", rlt_ex), ("plain_student", plain_ex)):
        model, _ = load_stage(cfg, "base")
        sft_train(model, ex, sft_config(cfg, "distill", max_steps=cfg.rlt_student_steps), **sft_kw(cfg, state, name))
        save_stage(cfg, name, model, tok)
        m = evaluate(model, tok, test, max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch)
        results[name] = m["pass_at_1"]
        log(f"rlt: {name} greedy pass@1 {m['pass_at_1']:.3f} on {m['n']} problems", stage="rlt", model=name, **m)
    if parallel.is_main():
        with open(os.path.join(cfg.out, "rlt_results.json"), "w") as f:
            json.dump(results, f, indent=2)


EVAL_STAGES = ("base", "format_tuned", "rl_round1", "distilled", "rl_round2")
TABLE = ("pass_at_1", "wrong_to_right", "right_to_wrong", "reflect_rate", "explore_rate", "grammar_ok",
         "boxed_rate", "mean_steps", "mean_length")


def stage_eval(cfg, state):
    """Greedy pass@1 + COAT statistics of every stage model present -> out/results.json, results.md."""
    log, test = state["log"], state["test"]
    rows = []
    for name in EVAL_STAGES:
        if not has_model(stage_dir(cfg, name)):
            continue
        t0 = time.time()
        model, tok = load_stage(cfg, name)
        m = evaluate(model, tok, test, max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch)
        rows.append({"name": name, **m})
        log(f"eval {name}: pass@1 {m['pass_at_1']:.3f} on {m['n']} problems ({time.time() - t0:.0f}s)",
            stage="eval", model=name, **m)
        del model
    if not rows:
        raise SystemExit(f"eval: no stage model in {cfg.out} (looked for {', '.join(EVAL_STAGES)})")
    if not parallel.is_main():
        return
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump({"stages": rows}, f, indent=2)
    head = "| stage | " + " | ".join(TABLE) + " |"
    lines = [head, "|" + "---|" * (len(TABLE) + 1)]
    lines += ["| " + r["name"] + " | " + " | ".join(f"{r[k]:.3f}" if k.endswith(("rate", "ok", "1", "right", "wrong"))
                                                  else f"{r[k]:.1f}" for k in TABLE) + " |" for r in rows]
    with open(os.path.join(cfg.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    log("\n".join(lines))


STAGES = {
    "pretrain": stage_pretrain,
    "synthesize": stage_synthesize,
    "sft": stage_sft,
    "orm": stage_orm,
    "rl": stage_rl,
    "distill": stage_distill,
    "rl2": stage_rl2,
    "eval": stage_eval,
    "rlt": stage_rlt,            # not in the default chain (DEFAULT_STAGES)
}
DEFAULT_STAGES = ["pretrain", "synthesize", "sft", "orm", "rl", "distill", "rl2", "eval"]


def log_metrics(state, m):
    if not parallel.is_main():
        return
    with open(os.path.join(state["out"], "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"time": time.time(), **m}) + "\n")


def check_config(cfg, names, world):
    """Refuse, before any work, a config that cannot work, naming the option."""
    bad = lambda msg: SystemExit(f"config: {msg}")
    if cfg.algo not in rl.ALGOS:
        raise bad(f"--algo={cfg.algo}: expected one of {', '.join(rl.ALGOS)}")
    if cfg.sampler_dtype not in ("auto", "float32", "bfloat16"):
        raise bad(f"--sampler_dtype={cfg.sampler_dtype}: expected auto, float32 or bfloat16")
    if cfg.rlsp_schedule not in ("constant", "linear_decay"):
        raise bad(f"--rlsp_schedule={cfg.rlsp_schedule}: expected constant or linear_decay")
    if cfg.n_rl < 0:
        raise bad(f"--n_rl={cfg.n_rl}: expected a number of questions >= 0")
    if not 0 <= cfg.rae_mix <= 1:
        raise bad(f"--rae_mix={cfg.rae_mix}: expected a share in [0, 1]")
    if not 0 < cfg.distill_keep <= 1:
        raise bad(f"--distill_keep={cfg.distill_keep}: expected a share in (0, 1]")
    for k in ("gen_batch", "eval_batch"):
        if getattr(cfg, k) < 1:
            raise bad(f"--{k}={getattr(cfg, k)}: expected a number of sequences >= 1")
    for group, what in (rl_group(cfg, n) for n in names if n in ("rl", "rl2", "rlt")):
        if cfg.rl_batch % (group * world):
            raise bad(f"--rl_batch={cfg.rl_batch} must be a multiple of {what} ({group}) x processes ({world}), "
                      "so that every process samples whole groups")
    if cfg.rl_batch % cfg.minibatch_size or cfg.minibatch_size % world:
        raise bad(f"--minibatch_size={cfg.minibatch_size} must divide --rl_batch={cfg.rl_batch} and be a multiple "
                  f"of the number of processes ({world})")
    if cfg.model:
        mcfg, tok = load_config(cfg.model), Tokenizer.from_pretrained(cfg.model)
        if tok.vocab_size > mcfg.vocab_size:
            raise bad(f"--model={cfg.model}: the tokenizer has {tok.vocab_size} tokens, the model's embedding "
                      f"{mcfg.vocab_size} rows")
        positions = mcfg.max_position_embeddings
    else:
        positions = cfg.max_position_embeddings
    # the longest sequence any stage makes: a COAT restart prompt (~ prompt + a response) + a response
    need = max(cfg.eval_max_new_tokens, 2 * cfg.rl_max_new_tokens, 2 * cfg.synth_max_new_tokens + 64)
    if need >= positions:
        raise bad(f"generation budgets (eval_max_new_tokens, rl_max_new_tokens, synth_max_new_tokens) need "
                  f"~{need} positions before the prompt; the model has max_position_embeddings={positions}")


def run_signature(cfg):
    """The options a resumed run must share with the run it continues."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("stages", "resume", "device")}


def main(argv):
    cfg = parse_args(argv)
    rank, world = parallel.init()
    names = [s for s in cfg.stages.split(",") if s] or DEFAULT_STAGES
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
    check_config(cfg, names, world)
    checkpoint.check_writable(cfg.out, cfg.min_free_gb * 2**30)
    progress_path = os.path.join(cfg.out, "progress.json")

    def write_progress(done):
        if rank == 0:
            tmp = progress_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"done": done, "config": run_signature(cfg)}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, progress_path)

    done = []
    if cfg.resume:       # continue the run in --out: its finished stages, its checkpoints
        if os.path.isfile(progress_path):
            with open(progress_path) as f:
                prev = json.load(f)
            diff = sorted(k for k, v in run_signature(cfg).items() if json.dumps(prev["config"].get(k)) != json.dumps(v))
            if diff:
                raise SystemExit(f"--resume: {cfg.out} was run with other options: " +
                                 ", ".join(f"--{k}={prev['config'].get(k)} (now {getattr(cfg, k)})" for k in diff))
            done = prev["done"]
    elif rank == 0:      # a fresh run: the stages and checkpoints of an earlier run in --out are stale
        shutil.rmtree(os.path.join(cfg.out, "ckpt"), ignore_errors=True)
        write_progress([])
    parallel.barrier()
    log = make_logger(cfg.out)
    if rank == 0:
        with open(os.path.join(cfg.out, "run_config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
    train, test, rl_questions = load_problems(cfg)
    state = {"log": log, "out": cfg.out, "train": train, "test": test, "rl": rl_questions}
    log(f"nanosatori: stages {','.join(names)}, {len(train)} train" +
        (f" + {len(rl_questions)} RL" if rl_questions is not train else "") + f" / {len(test)} test problems, "
        f"device {get_device(cfg)}, {world} process{'es' * (world > 1)}, out {cfg.out}")
    for name in names:
        if name in done:
            log(f"stage {name}: done in an earlier run (--resume), skipped")
            continue
        # each stage seeds its own RNGs: a resumed run draws what an uninterrupted one would
        seed = cfg.seed * 1000 + list(STAGES).index(name)
        torch.manual_seed(seed)
        random.seed(seed)
        t0 = time.time()
        state["stage"] = name
        STAGES[name](cfg, state)
        done.append(name)
        write_progress(done)
        if rank == 0:
            shutil.rmtree(os.path.join(cfg.out, "ckpt", name), ignore_errors=True)   # its output is its checkpoint
        parallel.barrier()
        log(f"stage {name} done in {time.time() - t0:.0f}s", stage=name, wall_s=time.time() - t0)
    if rank == 0 and os.path.isdir(os.path.join(cfg.out, "ckpt")) and not os.listdir(os.path.join(cfg.out, "ckpt")):
        os.rmdir(os.path.join(cfg.out, "ckpt"))     # every stage finished: nothing left to resume
    parallel.shutdown()


if __name__ == "__main__":
    faulthandler.enable()   # a crash in native code (segfault, abort) still prints each thread's Python stack
    main(sys.argv[1:])
