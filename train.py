"""nanosatori's command line: the Config, its checks, and the stages of Satori's pipeline.

    python train.py                                   # the whole chain on the built-in task, into out/
    python train.py --stages=pretrain,eval --base=    # pretrain a new base model, then its accuracy
    python train.py --stages=rl,eval --algo=grpo      # RL round 1 again with another method
    python train.py --stages=eval --out=runs/a        # evaluate every stage model found in runs/a
    python train.py --model=path/to/Qwen2.5-0.5B --data=train.jsonl --test_data=test.jsonl
    torchrun --nproc_per_node=8 train.py              # the same on 8 GPUs (gloo on CPU)
    python train.py --resume=true                     # after a crash: on from the newest checkpoint

Options are the fields of Config, as --key=value (bools: --key=true/false, tuples: --key=0.9,0.95).
Each stage (STAGES, at the bottom) reads folders of --out and writes one: a complete HF model
directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json), so any stage
runs alone on the output of an earlier run. Progress goes to stdout, metrics to out/metrics.jsonl,
and the eval stage writes out/results.json and out/results.md.
"""
import dataclasses
import faulthandler
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch

import checkpoint
import coat
import data
import parallel
import rae
import rl
import rlt
import rollout
from eval import evaluate, write_results
from model import ModelConfig, Transformer, ValueModel, load_config, num_params
from rollout import sampler_for
from sft import SFTConfig, orm_pairs, orm_train, sft_train
from tokenizer import Tokenizer, build_task_tokenizer


@dataclass
class Config:
    stages: str = ""              # comma-separated stage names; "" = the default chain (DEFAULT_STAGES)
    out: str = "out"              # everything of a run goes here
    seed: int = 0
    device: str = ""              # "" = cuda when available, else cpu
    resume: bool = False          # skip the stages out/progress.json marks done, resume the current one
    ckpt_every: int = 100         # SFT-like loops (pretrain, sft, orm, distill): steps between checkpoints
    rl_ckpt_every: int = 5        # RL loops: steps between checkpoints
    ckpt_keep: int = 2            # newest checkpoints kept per loop (a finished stage keeps its output only)
    min_free_gb: float = 1.0      # refuse to start with less free disk under --out
    # a user's model and data instead of the built-in ones
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
    task_max_value: int = 99
    n_train: int = 20000          # problems with solutions: pretraining, COAT synthesis, format tuning
    n_test: int = 1000            # held-out problems (a standard error of ~1.4 points on pass@1 ~0.75)
    n_rl: int = 30000             # further questions, answers only, for ORM/RAE, RL, distillation; 0: the n_train
    # the built-in base model (a small Qwen2): the shipped one, or pretrained by stage pretrain
    base: str = "assets/base"     # shipped base, used when made with this run's options; --base= pretrains one
    vocab_size: int = 384         # BPE vocabulary of the task tokenizer (chat tokens included)
    hidden_size: int = 128        # 0.54M parameters in all
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    pretrain_lr: float = 3e-3     # pretraining: SFT on (prompt, CoT solution + eos)
    pretrain_steps: int = 2000
    pretrain_batch_tokens: int = 2048
    pretrain_weight_decay: float = 0.1
    # COAT demonstration synthesis (coat.SynthConfig)
    synth_questions: int = 1000   # training questions to synthesise from (up to 5 demonstrations each)
    synth_group: int = 4          # CoT samples per question from the base model
    synth_temperature: float = 1.0
    synth_max_new_tokens: int = 128
    # format tuning on COAT demonstrations
    sft_lr: float = 1e-3          # Satori: 2e-5 for a 7B model; a tiny model wants far more
    sft_epochs: float = 10.0
    sft_batch_tokens: int = 2048
    sft_weight_decay: float = 0.0
    # shared by every SFT-like stage
    warmup_frac: float = 0.03
    min_lr_ratio: float = 0.1
    grad_accum: int = 1
    clip: float = 1.0             # max gradient norm (every stage, RL included)
    betas: tuple = (0.9, 0.95)    # AdamW's (every stage, RL included)
    log_every: int = 25
    # ORM + Restart-and-Explore: the format-tuned model samples rae_group answers to each of the first
    # rae_questions RL questions; the same samples train the ORM and make the RAE restart states
    rae: bool = True              # RL round 1 draws some prompts from the RAE buffer (false: plain questions only)
    rae_mix: float = 0.1          # share of RL round 1 prompts drawn from the RAE buffer
    rae_questions: int = 256
    rae_group: int = 8            # samples per question (Satori: 8)
    rae_temperature: float = 1.0
    rae_max_back: int = 2         # drop up to this many steps before appending <|reflect|> (Satori: 2)
    orm: bool = True              # train the ORM; the critic starts from it
    orm_reward: bool = True       # add sigmoid(ORM score) to the reward
    orm_lr: float = 3e-4
    orm_epochs: float = 2.0
    orm_batch_tokens: int = 4096
    orm_margin: float = 2.0       # Bradley-Terry margin (Satori: 2)
    # RL (PPO + GAE), round 1 from format_tuned, round 2 from distilled
    rl_steps: int = 160
    rl_batch: int = 64            # sampled responses per RL step
    rl_temperature: float = 1.2   # Satori: 0.6; our policy is far more peaked (entropy ~0.01 per token)
    rl_group: int = 1             # PPO round 1: samples per prompt (Satori: 1)
    rl_max_new_tokens: int = 128
    sampler_dtype: str = "auto"   # weights the RL sampler decodes with: auto = a bf16 copy on GPU, the policy on CPU
    cuda_graphs: bool = True      # samplers replay their decode step as CUDA graphs on CUDA (false: eager, to debug)
    tf32: bool = True             # on CUDA, fp32 matmuls (model and kernels) on TF32 tensor cores: ~8x faster, 10-bit mantissa
    actor_lr: float = 2e-4        # Satori: 2e-7 for 7B; a tiny model wants far more
    critic_lr: float = 5e-4
    ent_coef: float = 0.0         # entropy bonus in the policy loss (0 = off)
    gamma: float = 1.0
    lam: float = 1.0              # GAE lambda (Satori: 0.95, which leans on our young critic and loses)
    clip_eps: float = 0.2         # PPO's ratio clip
    value_clip: float = 0.2       # PPO's value clip around the rollout-time value
    kl_coef: float = 0.0          # per-token KL penalty to the starting policy (Satori: 0)
    ppo_epochs: int = 1
    minibatch_size: int = 32      # responses per optimizer step
    micro_batch: int = 16         # responses per forward/backward (gradient accumulation)
    no_eos_penalty: float = -1.0  # reward of a response that never stops
    reward_clip: float = 10.0     # sequence rewards clipped to +-this (Satori: 10; 0 = off)
    reflect_bonus: float = 0.5    # RAE reflection bonus (Satori: 0.5)
    # the methods beside Satori's PPO (rl.algo_config)
    algo: str = "ppo"             # ppo | grpo | drgrpo | dapo
    grpo_group: int = 8           # GRPO family: samples per prompt (rl_batch // grpo_group prompts a step)
    grpo_kl: float = 0.04         # GRPO / Dr. GRPO: beta of the k3 KL to the starting policy in the loss
    dapo_clip_high: float = 0.28  # DAPO: upper clip eps (the lower one is clip_eps)
    dapo_overlong_buffer: int = 32  # DAPO: soft length penalty over the last N tokens of rl_max_new_tokens
    dapo_max_refills: int = 4     # DAPO: extra sampling rounds to replace all-right / all-wrong groups
    rlsp_coef: float = 0.0        # RLSP: weight of the exploration reward (0 = off; any algo)
    rlsp_schedule: str = "constant"   # constant | linear_decay
    rlsp_max_steps: int = 8       # RLSP: distinct steps that earn the full exploration reward
    expo: bool = False            # ExPO: add beta * log pi(self-explanation | question) where a group fails
    expo_beta: float = 0.04       # ExPO: the paper's best
    expo_threshold: float = 0.0   # ExPO: groups with accuracy <= this get a self-explanation
    # RLT (--stages=rlt, rlt.py): teacher warm-up, GRPO on the RLT reward, two students
    rlt_questions: int = 256      # teacher questions (format warm-up and RL)
    rlt_full_prompt: bool = False  # RLT's own teacher instruction (real models); false: a short one
    rlt_warm_lr: float = 2e-3
    rlt_warm_epochs: float = 10.0
    rlt_warm_batch_tokens: int = 4096
    rlt_steps: int = 20
    rlt_group: int = 8            # RLT: samples per prompt (64 for a 7B teacher)
    rlt_temperature: float = 0.7
    rlt_lr: float = 2e-4
    rlt_kl: float = 0.0
    rlt_lambda: float = 3.0
    rlt_missing_tags_reward: float = -10.0  # RLT: -1, which our student's log-probs (~-5 a token) make a prize
    rlt_alpha: float = 0.01
    rlt_max_new_tokens: int = 96
    rlt_distill_questions: int = 512
    rlt_student_steps: int = 100
    # iterative self-improvement: distil the round-1 policy's solved questions into the base, RL again
    distill_questions: int = 2048
    distill_group: int = 2        # samples per question
    distill_keep: float = 1.0     # share of the solved questions kept, hardest first
    distill_lr: float = 1e-3
    distill_epochs: float = 3.0
    distill_batch_tokens: int = 4096
    rl2_steps: int = 20
    rl2_temperature: float = 1.0
    rl2_group: int = 4            # PPO round 2: samples per prompt (Satori: 8)
    rl2_actor_lr: float = 1e-4
    # evaluation: greedy pass@1 on the held-out set
    eval_max_new_tokens: int = 160
    gen_batch: int = 64           # sequences decoded at once by synthesis and the RLT teacher
    eval_batch: int = 256         # sequences decoded at once by evaluation


# options that were renamed: the old name gets a pointer instead of "unknown option"
RENAMED = {"rl_samples": "rl_group", "rl2_samples": "rl2_group", "group_size": "grpo_group",
           "rae_samples": "rae_group", "distill_samples": "distill_group", "synth_samples": "synth_group"}


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
        if key in RENAMED:
            raise SystemExit(f"--{key} is now --{RENAMED[key]}")
        if key not in types:
            raise SystemExit(f"unknown option --{key}; options: " + " ".join(sorted(types)))
        setattr(cfg, key, _convert(val, types[key], key))
    return cfg


def check_config(cfg, names, world):
    """Refuse, before any work, a config that cannot work, naming the option."""
    bad = lambda msg: SystemExit(f"config: {msg}")
    choices = {"algo": rl.ALGOS, "sampler_dtype": ("auto", "float32", "bfloat16"),
               "rlsp_schedule": ("constant", "linear_decay")}
    for k, allowed in choices.items():
        if getattr(cfg, k) not in allowed:
            raise bad(f"--{k}={getattr(cfg, k)}: expected one of {', '.join(allowed)}")
    if cfg.n_rl < 0:
        raise bad(f"--n_rl={cfg.n_rl}: expected a number of questions >= 0")
    if not 0 <= cfg.rae_mix <= 1:
        raise bad(f"--rae_mix={cfg.rae_mix}: expected a share in [0, 1]")
    if not 0 < cfg.distill_keep <= 1:
        raise bad(f"--distill_keep={cfg.distill_keep}: expected a share in (0, 1]")
    for k in ("gen_batch", "eval_batch"):
        if getattr(cfg, k) < 1:
            raise bad(f"--{k}={getattr(cfg, k)}: expected a number of sequences >= 1")
    for group, what in (group_of(cfg, n) for n in names if n in ("rl", "rl2", "rlt")):
        if cfg.rl_batch % (group * world):
            raise bad(f"--rl_batch={cfg.rl_batch} must be a multiple of {what} ({group}) x processes ({world}), "
                      "so that every process samples whole groups")
    if cfg.rl_batch % cfg.minibatch_size or cfg.minibatch_size % world:
        raise bad(f"--minibatch_size={cfg.minibatch_size} must divide --rl_batch={cfg.rl_batch} and be a multiple "
                  f"of the number of processes ({world})")
    positions = cfg.max_position_embeddings
    if cfg.model:
        mcfg, tok = load_config(cfg.model), Tokenizer.from_pretrained(cfg.model)
        if tok.vocab_size > mcfg.vocab_size:
            raise bad(f"--model={cfg.model}: the tokenizer has {tok.vocab_size} tokens, the model's embedding "
                      f"{mcfg.vocab_size} rows")
        positions = mcfg.max_position_embeddings
    # the longest sequence any stage makes: a COAT restart prompt (~ prompt + a response) + a response
    need = max(cfg.eval_max_new_tokens, 2 * cfg.rl_max_new_tokens, 2 * cfg.synth_max_new_tokens + 64)
    if need >= positions:
        raise bad(f"generation budgets (eval_max_new_tokens, rl_max_new_tokens, synth_max_new_tokens) need "
                  f"~{need} positions before the prompt; the model has max_position_embeddings={positions}")


def group_of(cfg, stage):
    """(samples per prompt, the option that sets it) of an RL stage."""
    if stage == "rlt":
        return cfg.rlt_group, "--rlt_group"
    if cfg.algo != "ppo":
        return cfg.grpo_group, "--grpo_group"
    return (cfg.rl_group, "--rl_group") if stage == "rl" else (cfg.rl2_group, "--rl2_group")

# -----------------------------------------------------------------------------
# what every stage uses: its folders, the logger, the settings of its training loops

def make_logger(out):
    """log(msg, **metrics): rank 0 prints msg (if any) and appends the metrics to out/metrics.jsonl."""
    path = os.path.join(out, "metrics.jsonl")

    def log(msg=None, **metrics):
        if not parallel.is_main():
            return
        if msg is not None:
            print(msg, flush=True)
        if metrics:
            with open(path, "a") as f:
                f.write(json.dumps({"time": time.time(), **metrics}) + "\n")
    return log


def get_device(cfg):
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def has_model(path):
    return os.path.isfile(os.path.join(path, "config.json"))


def stage_dir(cfg, name):
    """out/<name>; the base model is the user's directory when --model is given."""
    return cfg.model if name == "base" and cfg.model else os.path.join(cfg.out, name)


def load_stage(cfg, name):
    """(model, tokenizer) of out/<name>, in fp32 on the run's device."""
    path = stage_dir(cfg, name)
    checkpoint.restore_dir(path, has_model)
    if not has_model(path):
        raise SystemExit(f"{path}: no model there; run the stage that makes it first")
    return Transformer.from_pretrained(path, device=get_device(cfg), dtype=torch.float32), Tokenizer.from_pretrained(path)


def save_stage(cfg, name, model, tok, models=None, write=None):
    """out/<name> as a complete HF directory (+ models: {subdirectory: model}, e.g. the critic;
    + write(dir): more files), replaced all at once (checkpoint.write_dir)."""
    def save(tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        for sub, m in (models or {}).items():
            m.save_pretrained(os.path.join(tmp, sub))
        if write:
            write(tmp)
    return checkpoint.write_dir(stage_dir(cfg, name), save)


def with_coat_tokens(model, tok):
    """The model and tokenizer with COAT's three tokens in the vocabulary (new embedding rows)."""
    if tok.add_coat_tokens():
        model.resize_vocab(tok.vocab_size)
    return model, tok


def loop_kw(cfg, state, loop):
    """sft_train's keyword arguments for training loop `loop` of the running stage: logging,
    metrics, checkpoints in out/ckpt/<stage>/<loop>."""
    return dict(log=state["log"], on_metrics=lambda m: state["log"](**m), name=loop,
                ckpt_dir=os.path.join(cfg.out, "ckpt", state["stage"], loop), ckpt_every=cfg.ckpt_every,
                keep=cfg.ckpt_keep)


def sft_config(cfg, prefix, **kw):
    """The SFTConfig of one stage: its `<prefix>_*` fields plus the shared ones."""
    own = {f.name: getattr(cfg, f"{prefix}_{f.name}") for f in fields(SFTConfig) if hasattr(cfg, f"{prefix}_{f.name}")}
    shared = {k: getattr(cfg, k) for k in ("warmup_frac", "min_lr_ratio", "grad_accum", "clip", "betas",
                                           "log_every", "seed")}
    return SFTConfig(**{**shared, **own, **kw})


# -----------------------------------------------------------------------------
# the stages: fn(cfg, state), state = {"log", "stage", "train", "test", "rl"}

def shipped_base(cfg):
    """The directory of the shipped base model if it was pretrained with this run's task, model and
    pretraining options (its nanosatori.json), else None. Neither the seed (it varies the stages
    after the base) nor n_test (held-out problems are drawn beside the same training ones) matter."""
    path = cfg.base if os.path.isabs(cfg.base) else os.path.join(os.path.dirname(os.path.abspath(__file__)), cfg.base)
    meta = os.path.join(path, "nanosatori.json")
    if not cfg.base or cfg.data or not os.path.isfile(meta):    # a user's data needs its own base
        return None
    with open(meta) as f:
        made = json.load(f)["options"]
    mine = asdict(cfg)
    return path if all(json.dumps(v) == json.dumps(mine[k]) for k, v in made.items() if k not in ("seed", "n_test")) else None


def stage_pretrain(cfg, state):
    """A tokenizer and a small Qwen2 trained on (prompt, CoT solution + eos) -> out/base; or a copy of
    the shipped base when it was made with the same options; nothing with --model."""
    log, train = state["log"], state["train"]
    if cfg.model:
        return log(f"pretrain: --model given, {cfg.model} is the base model")
    shipped = shipped_base(cfg)
    if shipped:
        save_stage(cfg, "base", Transformer.from_pretrained(shipped), Tokenizer.from_pretrained(shipped))
        return log(f"pretrain: the shipped base {shipped} was made with these options; copied to "
                   f"{stage_dir(cfg, 'base')} (--base= pretrains a new one)")
    torch.manual_seed(cfg.seed)
    tok = build_task_tokenizer([Tokenizer.prompt(p["question"]) + p["solution"] for p in train[:5000]], cfg.vocab_size)
    mcfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                       num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                       max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True)
    model = Transformer(mcfg).to(get_device(cfg))
    log(f"pretrain: {num_params(model) / 1e6:.2f}M parameters, vocab {tok.vocab_size}, {len(train)} problems")
    examples = [(tok.encode_prompt(p["question"]), tok.encode(p["solution"]) + [tok.eos_id]) for p in train]
    m = sft_train(model, examples, sft_config(cfg, "pretrain", max_steps=cfg.pretrain_steps), **loop_kw(cfg, state, "pretrain"))
    path = save_stage(cfg, "base", model, tok)
    log(f"pretrain: {m['steps']} steps, {m['tokens']} tokens in {m['time_s']:.0f}s, loss {m['loss']:.4f} -> {path}",
        stage="pretrain", done=True, **{k: v for k, v in m.items() if k != "losses"})


def demos_path(cfg):
    return os.path.join(cfg.out, "synthesize", "demos.jsonl")


def stage_synthesize(cfg, state):
    """COAT demonstrations from the base model (generator -> exact critic -> one per type per
    question, coat.synthesize_coat) -> out/synthesize/demos.jsonl."""
    model, tok = load_stage(cfg, "base")
    problems = state["train"][:cfg.synth_questions]
    prompts = [tok.encode_prompt(p["question"]) for p in problems]
    # a continuation's prompt holds the chain so far and the critic's hint line: room for two generations
    sampler = sampler_for(model, prompts, 2 * cfg.synth_max_new_tokens + 64, cfg.gen_batch)
    scfg = coat.SynthConfig(group=cfg.synth_group, temperature=cfg.synth_temperature,
                            max_new_tokens=cfg.synth_max_new_tokens)
    records = coat.synthesize_coat(coat.sampler_generator(sampler, tok.stop_ids), tok, parallel.shard(problems),
                                   scfg, seed=cfg.seed + 7919 * parallel.rank(), log=state["log"])
    records = parallel.gather(records)
    if parallel.is_main():
        coat.write_demos(demos_path(cfg), records)
    parallel.barrier()
    state["log"](f"synthesize: {len(records)} demonstrations -> {demos_path(cfg)}", stage="synthesize",
                 **dict(coat.synthesize_stats(records)))


def stage_sft(cfg, state):
    """Format tuning: the base + COAT tokens, SFT on demos.jsonl, wrong steps that a demonstration
    corrects masked out of the loss (coat.demo_example) -> out/format_tuned."""
    path = demos_path(cfg)
    if not os.path.isfile(path):
        raise SystemExit(f"sft: {path} does not exist; run --stages=synthesize first")
    model, tok = with_coat_tokens(*load_stage(cfg, "base"))
    demos = coat.read_demos(path)
    if not demos:
        raise SystemExit(f"sft: {path} holds no demonstrations (was the base model too weak to synthesize any?)")
    examples = [coat.demo_example(tok, d) for d in demos]
    state["log"](f"sft: {len(examples)} COAT demonstrations from {path}")
    m = sft_train(model, examples, sft_config(cfg, "sft"), **loop_kw(cfg, state, "sft"))
    out = save_stage(cfg, "format_tuned", model, tok)
    state["log"](f"sft: loss {m['first_loss']:.4f} -> {m['loss']:.4f} in {m['time_s']:.0f}s -> {out}",
                 stage="sft", done=True, **{k: v for k, v in m.items() if k != "losses"})


def stage_orm(cfg, state):
    """The format-tuned model samples rae_group answers to rae_questions RL questions; the same
    samples give the ORM its (correct, incorrect) pairs and RAE its restart states
    -> out/orm (a ValueModel) and out/orm/rae.jsonl."""
    log, problems = state["log"], state["rl"]
    policy, tok = load_stage(cfg, "format_tuned")
    qids = list(range(min(cfg.rae_questions, len(problems))))
    prompts = [tok.encode_prompt(problems[q]["question"]) for q in qids]
    t0 = time.time()
    groups = rl.sample_all(sampler_for(policy, prompts, cfg.rl_max_new_tokens, cfg.rl_batch * cfg.rae_group), tok,
                           problems, prompts, qids, cfg.rae_group, cfg.rae_temperature, cfg.rl_max_new_tokens, cfg.seed)
    n_ok = sum(ok for g in groups for _, ok in g)
    log(f"orm: {len(qids) * cfg.rae_group} samples of {len(qids)} questions in {time.time() - t0:.0f}s, "
        f"{n_ok / (len(qids) * cfg.rae_group):.3f} correct")
    orm, pairs = ValueModel.from_policy(policy), orm_pairs(prompts, groups)
    if pairs:
        kw = {k: v for k, v in loop_kw(cfg, state, "orm").items() if k != "name"}
        m = orm_train(orm, pairs, sft_config(cfg, "orm"), margin=cfg.orm_margin, **kw)
        log(f"orm: {len(pairs)} pairs, loss {m['loss']:.4f}", stage="orm", pairs=len(pairs), loss=m["loss"])
    else:
        log("orm: no question has both a correct and an incorrect sample; the ORM stays untrained")
    states, counts = rae.build_buffer(zip(qids, prompts, groups), tok.coat_ids, tok.reflect_id,
                                      max_back=cfg.rae_max_back, seed=cfg.seed, stop_ids=tok.stop_ids)
    save_stage(cfg, "orm", orm, tok, write=lambda d: rae.write_buffer(os.path.join(d, "rae.jsonl"), states))
    log(f"rae: {len(states)} restart states from {counts['kept']} questions "
        f"({counts['all_correct']} all correct, {counts['all_wrong']} all wrong dropped)", stage="rae", **counts)


def run_rl(cfg, state, src, dst, pool, temperature, group, steps, reward_fn=None, problems=None, critic_from=None):
    """rl.rl_train from out/<src> -> out/<dst> (its critic in out/<dst>/critic) on `pool`, whose
    question ids index problems (default: the RL questions). PPO's critic starts from critic_from
    when that holds a model, else from the ORM (or the policy's trunk with --orm=false); the ORM
    also scores responses with --orm_reward; a KL term compares with a frozen copy of out/<src>."""
    dev = get_device(cfg)
    policy, tok = load_stage(cfg, src)
    pcfg = rl.algo_config(cfg, group)
    orm_dir = stage_dir(cfg, "orm")
    use_orm = cfg.orm and has_model(orm_dir) and reward_fn is None
    critic = None
    if pcfg.adv_estimator == "gae":
        init = critic_from if critic_from and has_model(critic_from) else orm_dir if use_orm else None
        critic = ValueModel.from_pretrained(init, device=dev) if init else ValueModel.from_policy(policy)
        state["log"](f"{dst}: the critic starts from {init or 'the policy (a zero value head)'}")
    orm = ValueModel.from_pretrained(orm_dir, device=dev).eval() if use_orm and cfg.orm_reward else None
    ref = load_stage(cfg, src)[0].eval().requires_grad_(False) if pcfg.kl_coef or pcfg.kl_loss_coef else None
    rl.rl_train(cfg, policy, tok, state["rl"] if problems is None else problems, pool, temperature, group, steps,
                critic=critic, orm=orm, ref=ref, reward_fn=reward_fn, name=dst, log=state["log"],
                ckpt_dir=os.path.join(cfg.out, "ckpt", state["stage"], dst))
    save_stage(cfg, dst, policy, tok, models={"critic": critic} if critic is not None else None)


def stage_rl(cfg, state):
    """RL round 1: PPO from the format-tuned model; a share rae_mix of the prompts are
    Restart-and-Explore states, the rest plain RL questions (all plain with --rae=false) -> out/rl_round1."""
    tok = Tokenizer.from_pretrained(stage_dir(cfg, "format_tuned"))
    pool = rae.plain_states(state["rl"], tok)
    buffer = rae.read_buffer(os.path.join(stage_dir(cfg, "orm"), "rae.jsonl")) if cfg.rae else []
    if cfg.rae and not buffer:   # no question had both right and wrong samples
        state["log"]("rl: the RAE buffer is empty; training on the plain questions")
    if buffer:
        pool = [(buffer, cfg.rae_mix), (pool, 1 - cfg.rae_mix)]
    run_rl(cfg, state, "format_tuned", "rl_round1", pool, cfg.rl_temperature, group_of(cfg, "rl")[0], cfg.rl_steps)


def stage_distill(cfg, state):
    """Iterative self-improvement: the round-1 policy answers RL questions the ORM stage did not
    sample; of those it solves a share distill_keep is kept, hardest first, and their correct
    answers are distilled by SFT into the base model (+ COAT tokens) -> out/distilled."""
    log, problems = state["log"], state["rl"]
    policy, tok = load_stage(cfg, "rl_round1")
    qids = list(range(cfg.rae_questions, min(cfg.rae_questions + cfg.distill_questions, len(problems))))
    prompts = [tok.encode_prompt(problems[q]["question"]) for q in qids]
    sampler = sampler_for(policy, prompts, cfg.rl_max_new_tokens, cfg.rl_batch * cfg.distill_group)
    groups = rl.sample_all(sampler, tok, problems, prompts, qids, cfg.distill_group, cfg.rl_temperature,
                           cfg.rl_max_new_tokens, cfg.seed + 1)
    solved = sorted((sum(ok for _, ok in g) / len(g), i) for i, g in enumerate(groups) if any(ok for _, ok in g))
    keep = [i for _, i in solved[:max(1, int(len(solved) * cfg.distill_keep))]]
    examples = [(prompts[i], resp) for i in keep for resp, ok in groups[i] if ok]
    if not examples:
        raise SystemExit(f"distill: the round-1 policy solved none of {len(qids)} questions; nothing to distil")
    log(f"distill: {len(keep)} of the {len(solved)} solved questions of {len(qids)}, hardest first (pass rate <= "
        f"{solved[len(keep) - 1][0]:.2f}), {len(examples)} correct responses")
    del policy
    base, btok = with_coat_tokens(*load_stage(cfg, "base"))
    m = sft_train(base, examples, sft_config(cfg, "distill"), **loop_kw(cfg, state, "distill"))
    save_stage(cfg, "distilled", base, btok)
    log(f"distill: loss {m['first_loss']:.4f} -> {m['loss']:.4f}", stage="distill", loss=m["loss"])


def stage_rl2(cfg, state):
    """RL round 2: PPO from the distilled model on plain questions (no RAE) -> out/rl_round2. The
    critic starts from round 1's, which has learned the values of the policy the distilled model
    imitates (the ORM, trained on format-tuned answers, starts far off)."""
    tok = Tokenizer.from_pretrained(stage_dir(cfg, "distilled"))
    run_rl(dataclasses.replace(cfg, actor_lr=cfg.rl2_actor_lr), state, "distilled", "rl_round2",
           rae.plain_states(state["rl"], tok), cfg.rl2_temperature, group_of(cfg, "rl2")[0], cfg.rl2_steps,
           critic_from=os.path.join(stage_dir(cfg, "rl_round1"), "critic"))


def stage_rlt(cfg, state):
    """RLT (not in the default chain): 1. the teacher (the base) learns the format by SFT ->
    out/rlt_warm; 2. GRPO on the RLT reward, the base as frozen student -> out/rlt_teacher; 3. it
    explains other questions; the base fine-tuned on them (out/rlt_student) and, with the same
    questions and steps, on the reference solutions (out/plain_student) -> out/rlt_results.json."""
    log, train = state["log"], state["train"]
    teacher, tok = load_stage(cfg, "base")
    qa = range(min(cfg.rlt_questions, len(train)))
    sft_train(teacher, rlt.warmup_examples(tok, train, qa, cfg.rlt_full_prompt), sft_config(cfg, "rlt_warm"),
              **loop_kw(cfg, state, "rlt_warm"))
    save_stage(cfg, "rlt_warm", teacher, tok)
    del teacher
    pool = [rae.RestartState(q, rlt.teacher_ids(tok, train[q], cfg.rlt_full_prompt), 0) for q in qa]
    student = load_stage(cfg, "base")[0].eval().requires_grad_(False)
    rcfg = dataclasses.replace(cfg, algo="grpo", orm=False, grpo_kl=cfg.rlt_kl, actor_lr=cfg.rlt_lr,
                               rl_max_new_tokens=cfg.rlt_max_new_tokens, reward_clip=0.0)   # log-prob rewards: no clip
    run_rl(rcfg, state, "rlt_warm", "rlt_teacher", pool, cfg.rlt_temperature, group_of(cfg, "rlt")[0], cfg.rlt_steps,
           reward_fn=rlt.reward_fn(cfg, tok, train, student, get_device(cfg)), problems=train)
    del student
    qd = list(range(len(qa), min(len(qa) + cfg.rlt_distill_questions, len(train))))
    texts = rlt.explain(load_stage(cfg, "rlt_teacher")[0], tok, train, qd, cfg)
    rlt_ex, plain_ex = rlt.student_examples(tok, train, qd, texts)
    if not rlt_ex:
        raise SystemExit(f"rlt: the teacher wrote no well-formed explanation for {len(qd)} questions")
    log(f"rlt: {len(rlt_ex)} explanations with tags of {len(qd)} questions; two students, "
        f"{cfg.rlt_student_steps} steps each")
    results = {"n_examples": len(rlt_ex), "teacher_questions": len(qa)}
    for name, ex in (("rlt_student", rlt_ex), ("plain_student", plain_ex)):
        model, _ = load_stage(cfg, "base")
        sft_train(model, ex, sft_config(cfg, "distill", max_steps=cfg.rlt_student_steps), **loop_kw(cfg, state, name))
        save_stage(cfg, name, model, tok)
        m = evaluate(model, tok, state["test"], max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch)
        results[name] = m["pass_at_1"]
        log(f"rlt: {name} greedy pass@1 {m['pass_at_1']:.3f} on {m['n']} problems", stage="rlt", model=name, **m)
    if parallel.is_main():
        with open(os.path.join(cfg.out, "rlt_results.json"), "w") as f:
            json.dump(results, f, indent=2)


EVAL_STAGES = ("base", "format_tuned", "rl_round1", "distilled", "rl_round2")


def stage_eval(cfg, state):
    """Greedy pass@1 + COAT statistics of every stage model present -> out/results.json, results.md."""
    rows = []
    for name in (n for n in EVAL_STAGES if has_model(stage_dir(cfg, n))):
        t0 = time.time()
        model, tok = load_stage(cfg, name)
        m = evaluate(model, tok, state["test"], max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch)
        rows.append({"name": name, **m})
        state["log"](f"eval {name}: pass@1 {m['pass_at_1']:.3f} on {m['n']} problems ({time.time() - t0:.0f}s)",
                     stage="eval", model=name, **m)
        del model
    if not rows:
        raise SystemExit(f"eval: no stage model in {cfg.out} (looked for {', '.join(EVAL_STAGES)})")
    if parallel.is_main():
        state["log"](write_results(cfg.out, rows))


# name: (function, what it reads from --out, what it writes there). The default chain runs them in
# this order; each stage seeds its RNGs from its place here.
STAGES = {
    "pretrain":   (stage_pretrain,   "-",                                  "base"),
    "synthesize": (stage_synthesize, "base",                               "synthesize/demos.jsonl"),
    "sft":        (stage_sft,        "base, synthesize/demos.jsonl",       "format_tuned"),
    "orm":        (stage_orm,        "format_tuned",                       "orm, orm/rae.jsonl"),
    "rl":         (stage_rl,         "format_tuned, orm, orm/rae.jsonl",   "rl_round1 (+ critic)"),
    "distill":    (stage_distill,    "rl_round1, base",                    "distilled"),
    "rl2":        (stage_rl2,        "distilled, orm, rl_round1/critic",   "rl_round2 (+ critic)"),
    "eval":       (stage_eval,       "every model above",                  "results.json, results.md"),
    "rlt":        (stage_rlt,        "base",                               "rlt_warm, rlt_teacher, rlt_student, "
                                                                           "plain_student, rlt_results.json"),
}
DEFAULT_STAGES = ["pretrain", "synthesize", "sft", "orm", "rl", "distill", "rl2", "eval"]


def main(argv):
    cfg = parse_args(argv)
    rank, world = parallel.init()
    names = [s for s in cfg.stages.split(",") if s] or DEFAULT_STAGES
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
    check_config(cfg, names, world)
    checkpoint.check_writable(cfg.out, cfg.min_free_gb * 2**30)
    signature = {k: v for k, v in asdict(cfg).items() if k not in ("stages", "resume", "device")}
    done = checkpoint.begin_run(cfg.out, signature, cfg.resume, renamed=RENAMED)
    log = make_logger(cfg.out)
    if rank == 0:
        with open(os.path.join(cfg.out, "run_config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
    rollout.CUDA_GRAPHS = cfg.cuda_graphs
    if get_device(cfg).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    train, test, rl_questions = data.load_problems(cfg)
    state = {"log": log, "train": train, "test": test, "rl": rl_questions}
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
        STAGES[name][0](cfg, state)
        checkpoint.stage_done(cfg.out, done + [name], signature)
        done.append(name)
        log(f"stage {name} done in {time.time() - t0:.0f}s", stage=name, wall_s=time.time() - t0)
    checkpoint.end_run(cfg.out)
    parallel.shutdown()


if __name__ == "__main__":
    faulthandler.enable()   # a crash in native code (segfault, abort) still prints each thread's Python stack
    main(sys.argv[1:])
