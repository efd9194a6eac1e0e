"""The options of a run: Config, the command line that sets them, and the checks that refuse, before
any work, options that cannot work.

    python train.py --help                            # every option, grouped by stage, with its default
    python train.py --rl_steps 200 --algo grpo        # --key value or --key=value
    python train.py --rae --no-orm_reward             # bare flags for booleans, --no-<flag> to turn one off
    python train.py --config run.json --seed 1        # options from a JSON or TOML file; the command line wins
"""
import difflib
import importlib.util
import inspect
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, fields

import torch

from model import load_config, weight_files
from rl import ALGOS
from tokenizer import PROMPT_STYLES, Tokenizer

@dataclass
class Config:
    # the run
    stages: str = ""              # comma-separated stage names; "" = the default chain (DEFAULT_STAGES)
    out: str = "out"              # everything of a run goes here
    seed: int = 0
    device: str = ""              # "" = cuda when available, else cpu
    resume: bool = False          # skip the stages out/progress.json marks done, resume the current one
    overwrite: bool = False       # start over in an --out that holds an unfinished run (its checkpoints are deleted)
    config: str = ""              # a JSON or TOML file of options; the command line overrides them
    debug: bool = False           # an error shows its traceback too, not only its one line
    ckpt_every: int = 100         # SFT-like loops (pretrain, sft, orm, distill): steps between checkpoints (0: at the end)
    rl_ckpt_every: int = 5        # RL loops: steps between checkpoints (0: at the end)
    ckpt_keep: int = 2            # newest checkpoints kept per loop (a finished stage keeps its output only)
    min_free_gb: float = 1.0      # refuse to start with less free disk under --out
    cuda_graphs: bool = True      # samplers replay their decode step as CUDA graphs on CUDA (false: eager, to debug)
    tensorboard: bool = False     # also write metrics as TensorBoard scalars to out/tensorboard (needs the tensorboard package)
    dtype: str = "auto"           # compute of every training forward (fp32 master weights): auto = bfloat16 on CUDA, float32 on CPU
    tf32: bool = True             # on CUDA, fp32 matmuls (model and kernels) on TF32 tensor cores: ~8x faster, 10-bit mantissa
    shard: str = "fsdp"           # under torchrun: fsdp = FSDP2 shards of every stage's models; none = a full copy per process
    act_ckpt: bool = False        # training forwards keep each block's input only, recomputing the rest in backward: ~1/3 more compute
    # a user's model and data instead of the built-in ones
    model: str = ""               # HF Qwen2 directory used as the base model (skips pretraining)
    data: str = ""                # JSONL of problems: {"question","answer"}, GSM8K or MATH lines
    test_data: str = ""           # JSONL of held-out questions; "" = the last n_test of `data`
    demos: str = ""               # JSONL of your own demonstrations for format tuning, in place of synthesized ones
    prompt: str = "satori"        # satori: Satori's ChatML prompt; chat_template: its words in the tokenizer's chat template
    task: str = "chain"           # the built-in task: chain (data.TaskConfig) or countdown (countdown.py; TASK_DEFAULTS)
    countdown_fail_rate: float = 0.6  # countdown: chance that each attempt of a worked solution fails (their number is geometric)
    countdown_order: str = "cycle"  # countdown: a worked solution's attempts in a fixed order from a random start, or "random"
    countdown_traces: int = 5     # countdown: worked solutions per problem in the pretraining corpus, each its own search
    # the chain task (data.TaskConfig): a chain of arithmetic operations
    task_n_steps: int = 3
    task_min_steps: int = 2       # > 0: the number of operations is uniform in [min_steps, n_steps]
    task_ops: str = "+-*"
    task_start_max: int = 99
    task_max_operand: int = 20
    task_mul_max: int = 5
    task_max_value: int = 99
    n_train: int = 20000          # problems with solutions: pretraining, COAT synthesis, format tuning
    n_test: int = 0               # held-out problems; 0 = 1000 on the built-in task, a tenth of --data (<= 1000), all of --test_data
    heldout: str = "test"         # countdown: the held-out problems eval scores: test, or dev (for choosing a recipe)
    n_rl: int = 30000             # further questions, answers only, for ORM/RAE, RL, distillation; 0: the n_train
    # the built-in base model (a small Qwen2): the shipped one, or pretrained by stage pretrain
    base: str = "assets/base"     # shipped base, used when made with this run's options; --base= pretrains one
    vocab_size: int = 384         # BPE vocabulary of the task tokenizer (chat tokens included)
    whole_numbers: bool = False   # the task tokenizer keeps a number whole for BPE (frequent ones: one token) instead of a token per digit
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
# --task=countdown's own defaults; an option given on the command line or in --config still wins.
# It has its own shipped base; its searches are longer than a chain (budgets), its arithmetic needs
# whole-number tokens and a deeper base, its RL still gains between 160 and 320 steps, and with the
# ORM term in the reward RL learnt to call failed attempts right.
TASK_DEFAULTS = {"countdown": dict(base="assets/countdown", whole_numbers=True, vocab_size=1024, num_hidden_layers=4,
                                   pretrain_steps=8000, synth_max_new_tokens=192, rl_max_new_tokens=256,
                                   eval_max_new_tokens=256, rl_steps=320, no_eos_penalty=0.0, orm_reward=False)}
# options that say how to run, not what to compute: a resumed run may change them
NOT_SIGNATURE = ("stages", "resume", "device", "overwrite", "config", "debug", "out", "min_free_gb", "ckpt_every",
                 "rl_ckpt_every", "ckpt_keep", "log_every", "cuda_graphs", "tensorboard", "act_ckpt")


def _what(typ):
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "numbers"}[typ]


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
        raise SystemExit(f"--{key}={text}: expected {_what(typ)}") from None


def _unknown(key, types):
    if key in RENAMED:
        return SystemExit(f"--{key} is now --{RENAMED[key]}")
    flags = [k for k, t in types.items() if t is bool]
    if key.startswith("no_") and difflib.get_close_matches(key[3:], flags, n=1, cutoff=0.6):
        near = "no-" + difflib.get_close_matches(key[3:], flags, n=1, cutoff=0.6)[0]
    else:
        near = (difflib.get_close_matches(key, list(types), n=1, cutoff=0.6) or [None])[0]
    return SystemExit(f"unknown option --{key}" + (f"; did you mean --{near}?" if near else "; --help lists them"))


def _file_value(v, typ):
    """A value from a --config file as the option's type, or None if it is not one (a bool is not
    a number, an int is a float, a tuple is a list of numbers or "0.9,0.95")."""
    if typ is tuple:
        parts = v.split(",") if isinstance(v, str) else v if isinstance(v, list) else None
        if parts is None or any(isinstance(x, bool) for x in parts):
            return None
        try:
            return tuple(float(x) for x in parts)
        except (TypeError, ValueError):
            return None
    if isinstance(v, bool) != (typ is bool):
        return None
    if typ is float and isinstance(v, int):
        return float(v)
    return v if isinstance(v, typ) else None


def _from_file(path, types):
    """Options from a JSON or TOML file: {"rl_steps": 200, ...}."""
    try:
        with open(path, "rb") as f:
            opts = tomllib.load(f) if path.endswith(".toml") else json.loads(f.read().decode())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--config={path}: cannot read it ({e})") from None
    if not isinstance(opts, dict):
        raise SystemExit(f"--config={path}: expected an object of options")
    out = {}
    for k, v in opts.items():
        if k not in types:
            raise _unknown(k, types)
        out[k] = _file_value(v, types[k])
        if out[k] is None:
            raise SystemExit(f"--config={path}: {k} = {v!r}: expected {_what(types[k])}")
    return out


def parse_args(argv, cfg=None):
    """A Config from command-line arguments: --key=value, --key value, --flag / --no-flag for
    booleans, --config FILE (read first; the command line overrides it), -h / --help."""
    cfg = cfg or Config()
    types = {f.name: type(f.default) for f in fields(cfg)}
    pairs, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(help_text())
            raise SystemExit(0)
        if not arg.startswith("--") or len(arg) == 2:
            raise SystemExit(f"bad argument {arg!r}: options are --key=value or --key value (--help lists them)")
        key, eq, val = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq and key.startswith("no_") and types.get(key[3:]) is bool:
            key, val = key[3:], "false"
        elif key not in types:
            raise _unknown(key, types)
        elif not eq and types[key] is bool and (i + 1 == len(argv) or argv[i + 1].startswith("-")):
            val = "true"
        elif not eq:
            # the value is the next argument, unless that is another option (a negative number is not)
            if i + 1 == len(argv) or argv[i + 1].startswith("--"):
                raise SystemExit(f"--{key}: expected a value (--{key} VALUE or --{key}=VALUE)")
            i, val = i + 1, argv[i + 1]
        pairs.append((key, val))
        i += 1
    given = {key for key, _ in pairs}
    for key, val in pairs:
        if key == "config":
            for k, v in _from_file(val, types).items():
                setattr(cfg, k, v)
                given.add(k)
    for key, val in pairs:
        setattr(cfg, key, _convert(val, types[key], key))
    for key, val in TASK_DEFAULTS.get(cfg.task, {}).items():
        if key not in given:
            setattr(cfg, key, val)
    return cfg


def help_text():
    """Every option with its default and comment, in the groups Config's comments make."""
    out, title = ["usage: python train.py [--key value | --key=value | --flag | --no-flag] ..."], None
    for line in inspect.getsource(Config).splitlines()[2:]:
        comment = re.match(r"\s+# (.*)", line)
        if comment:                                   # a group's title (it may run over lines)
            title = comment.group(1) if title is None else f"{title} {comment.group(1)}"
            continue
        m = re.match(r"\s+(\w+): \w+ = (.*?)(?:\s+# (.*))?$", line)
        if m:
            if title is not None:
                out += ["", title[0].upper() + title[1:] + ":"]
                title = None
            name, default, note = m.groups()
            out.append(f"  --{name:<26} {default:<14} {note or ''}".rstrip())
    return "\n".join(out)

# -----------------------------------------------------------------------------
# the checks: every option, before any work

# the range of every number option (a test holds each int and float field of Config to one)
RANGES = {
    ">= 1": "countdown_traces task_n_steps task_start_max task_max_operand task_mul_max task_max_value "
            "n_train vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
            "num_key_value_heads max_position_embeddings pretrain_steps pretrain_batch_tokens synth_questions "
            "synth_group synth_max_new_tokens sft_batch_tokens grad_accum log_every rae_questions rae_group "
            "orm_batch_tokens rl_steps rl_batch rl_group rl_max_new_tokens ppo_epochs minibatch_size micro_batch "
            "grpo_group rlsp_max_steps rlt_questions rlt_warm_batch_tokens rlt_steps rlt_group rlt_max_new_tokens "
            "rlt_distill_questions rlt_student_steps distill_questions distill_group distill_batch_tokens rl2_steps "
            "rl2_group eval_max_new_tokens gen_batch eval_batch",
    ">= 0": "seed n_test ckpt_every rl_ckpt_every ckpt_keep task_min_steps n_rl rae_max_back dapo_overlong_buffer "
            "dapo_max_refills min_free_gb "
            "pretrain_weight_decay sft_weight_decay orm_margin ent_coef kl_coef reward_clip grpo_kl rlsp_coef "
            "expo_beta rlt_kl rlt_lambda rlt_alpha",
    "> 0": "pretrain_lr sft_lr orm_lr actor_lr critic_lr rlt_warm_lr rlt_lr distill_lr rl2_actor_lr sft_epochs "
           "orm_epochs rlt_warm_epochs distill_epochs synth_temperature rae_temperature rl_temperature "
           "rl2_temperature rlt_temperature clip clip_eps value_clip dapo_clip_high",
    "in [0, 1]": "warmup_frac min_lr_ratio rae_mix gamma lam",
    "in (0, 1]": "distill_keep",
    "in [0, 1)": "betas countdown_fail_rate",
    "of any sign": "no_eos_penalty reflect_bonus expo_threshold rlt_missing_tags_reward",
}
_IN_RANGE = {">= 1": lambda v: v >= 1, ">= 0": lambda v: v >= 0, "> 0": lambda v: v > 0,
             "in [0, 1]": lambda v: 0 <= v <= 1, "in (0, 1]": lambda v: 0 < v <= 1,
             "in [0, 1)": lambda v: 0 <= v < 1, "of any sign": lambda v: True}
CHOICES = {"task": ("chain", "countdown"), "algo": ALGOS, "sampler_dtype": ("auto", "float32", "bfloat16"), "dtype": ("auto", "float32", "bfloat16"),
           "shard": ("fsdp", "none"), "countdown_order": ("cycle", "random"), "heldout": ("test", "dev"),
           "rlsp_schedule": ("constant", "linear_decay"), "prompt": PROMPT_STYLES}


def _check_ranges(cfg):
    for rule, names in RANGES.items():
        for k in names.split():
            v = getattr(cfg, k)
            values = v if isinstance(v, tuple) else (v,)
            if not all(math.isfinite(x) and _IN_RANGE[rule](x) for x in values):
                what = "an integer" if isinstance(v, int) else "numbers" if isinstance(v, tuple) else "a number"
                raise SystemExit(f"--{k}={','.join(map(str, values))}: expected {what} {rule}")
    for k, allowed in CHOICES.items():
        if getattr(cfg, k) not in allowed:
            raise SystemExit(f"--{k}={getattr(cfg, k)}: expected one of {', '.join(allowed)}")


def _check_task_and_model(cfg):
    if len(cfg.betas) != 2:
        raise SystemExit(f"--betas={','.join(map(str, cfg.betas))}: expected two numbers, like 0.9,0.95")
    if not cfg.task_ops or set(cfg.task_ops) - set("+-*/"):
        raise SystemExit(f"--task_ops={cfg.task_ops}: expected some of the operations + - * /")
    if cfg.task_min_steps > cfg.task_n_steps:
        raise SystemExit(f"--task_min_steps={cfg.task_min_steps}: expected at most --task_n_steps={cfg.task_n_steps}")
    if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.num_key_value_heads:
        raise SystemExit(f"--hidden_size={cfg.hidden_size}, --num_attention_heads={cfg.num_attention_heads}, "
                         f"--num_key_value_heads={cfg.num_key_value_heads}: each must divide the one before")
    if (cfg.hidden_size // cfg.num_attention_heads) % 2:        # rotary embeddings rotate pairs of dimensions
        raise SystemExit(f"--hidden_size={cfg.hidden_size} / --num_attention_heads={cfg.num_attention_heads}: "
                         "expected an even head size")
    if cfg.device and not re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device):
        raise SystemExit(f"--device={cfg.device}: expected cpu, cuda or cuda:N (or nothing: cuda when available)")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device={cfg.device}: this machine has no CUDA device")
    if cfg.device.startswith("cuda:") and int(cfg.device[5:]) >= torch.cuda.device_count():
        raise SystemExit(f"--device={cfg.device}: this machine has {torch.cuda.device_count()} CUDA devices")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise SystemExit("--tensorboard: the tensorboard package is not installed (pip install tensorboard)")
    if cfg.heldout == "dev" and (cfg.task != "countdown" or cfg.data):
        raise SystemExit("--heldout=dev: only the built-in countdown task (--task=countdown, no --data) has a dev split")
    if cfg.resume and cfg.overwrite:
        raise SystemExit("--resume and --overwrite: expected one of them (go on with a run, or start it over)")


def _check_files(cfg):
    for k in ("data", "test_data", "demos"):
        if getattr(cfg, k) and not os.path.isfile(getattr(cfg, k)):
            raise SystemExit(f"--{k}={getattr(cfg, k)}: no such file")
    if cfg.test_data and not cfg.data:
        raise SystemExit(f"--test_data={cfg.test_data}: expected --data too (the built-in task makes its own test set)")
    if cfg.base and not os.path.isdir(base_path(cfg)):
        raise SystemExit(f"--base={cfg.base}: no such directory (--base= pretrains a new base model)")
    if not cfg.model:
        return cfg.max_position_embeddings
    try:
        mcfg, _ = load_config(cfg.model), weight_files(cfg.model)
    except (OSError, ValueError) as e:
        raise SystemExit(f"--model={cfg.model}: {e}") from None
    try:
        tok = Tokenizer.from_pretrained(cfg.model)
    except Exception as e:          # the tokenizers library raises a bare Exception for a bad tokenizer.json
        raise SystemExit(f"--model={cfg.model}: tokenizer: {str(e).splitlines()[0]}") from None
    if tok.vocab_size > mcfg.vocab_size:
        raise SystemExit(f"--model={cfg.model}: the tokenizer has {tok.vocab_size} tokens, the model's embedding "
                         f"{mcfg.vocab_size} rows")
    if cfg.prompt == "chat_template" and not tok.chat_template:
        raise SystemExit(f"--prompt=chat_template: {cfg.model}'s tokenizer has no chat_template")
    return mcfg.max_position_embeddings


def _check_batches(cfg, names, world):
    for group, what in (group_of(cfg, n) for n in names if n in ("rl", "rl2", "rlt")):
        if cfg.rl_batch % (group * world):
            raise SystemExit(f"--rl_batch={cfg.rl_batch} must be a multiple of {what} ({group}) x processes "
                             f"({world}), so that every process samples whole groups")
        if group < 2 and what in ("--grpo_group", "--rlt_group"):
            raise SystemExit(f"{what}={group}: expected >= 2 (group-relative advantages compare samples of a prompt)")
    if cfg.rl_batch % cfg.minibatch_size or cfg.minibatch_size % world:
        raise SystemExit(f"--minibatch_size={cfg.minibatch_size} must divide --rl_batch={cfg.rl_batch} and be a "
                         f"multiple of the number of processes ({world})")
    if cfg.demos and "synthesize" not in names:
        raise SystemExit(f"--demos={cfg.demos}: stage synthesize copies them into --out, and --stages has no "
                         "synthesize; add it (--stages=synthesize,sft,...)")
    if cfg.algo == "dapo" and cfg.dapo_overlong_buffer >= cfg.rl_max_new_tokens:
        raise SystemExit(f"--dapo_overlong_buffer={cfg.dapo_overlong_buffer}: expected less than "
                         f"--rl_max_new_tokens={cfg.rl_max_new_tokens}")


def check_config(cfg, names, world):
    """Refuse, before any work, a config that cannot work: SystemExit with one line that names the
    option and what it expects."""
    _check_ranges(cfg)
    _check_task_and_model(cfg)
    _check_batches(cfg, names, world)
    positions = _check_files(cfg)
    # the longest sequence any stage makes: a COAT restart prompt (~ prompt + a response) + a response
    need = max(cfg.eval_max_new_tokens, 2 * cfg.rl_max_new_tokens, 2 * cfg.synth_max_new_tokens + 64)
    if need >= positions:
        raise SystemExit(f"generation budgets (eval_max_new_tokens, rl_max_new_tokens, synth_max_new_tokens) need "
                         f"~{need} positions before the prompt; the model has max_position_embeddings={positions}")
    _check_device(cfg)


def _check_device(cfg):
    """bf16 compute (--dtype, whose auto is bf16 on CUDA) needs a GPU that has it (Ampere or later)."""
    cuda = cfg.device.startswith("cuda") or (not cfg.device and torch.cuda.is_available())
    if cuda and cfg.dtype in ("auto", "bfloat16") and not torch.cuda.is_bf16_supported():
        raise SystemExit(f"--dtype={cfg.dtype}: bf16 compute, which {torch.cuda.get_device_name()} does not have; "
                         "use --dtype=float32")


def base_path(cfg):
    """The directory --base names; a relative one is inside the repository (assets/base, assets/countdown)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), cfg.base)


def group_of(cfg, stage):
    """(samples per prompt, the option that sets it) of an RL stage."""
    if stage == "rlt":
        return cfg.rlt_group, "--rlt_group"
    if cfg.algo != "ppo":
        return cfg.grpo_group, "--grpo_group"
    return (cfg.rl_group, "--rl_group") if stage == "rl" else (cfg.rl2_group, "--rl2_group")

