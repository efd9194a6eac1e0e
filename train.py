"""nanosatori's pipeline: the stages of Satori's recipe, their table, and the run that chains them.

    python train.py                                   # the whole chain on the built-in task, into out/
    python train.py --stages=pretrain,eval --base=    # pretrain a new base model, then its accuracy
    python train.py --stages=rl,eval --algo=grpo      # RL round 1 again with another method
    python train.py --stages=eval --out=runs/a        # evaluate every stage model found in runs/a
    python train.py --stages=report --out=runs/a      # rebuild runs/a/report.html, the page of the run
    python train.py --model=path/to/Qwen2.5-0.5B --data=train.jsonl --test_data=test.jsonl
    torchrun --nproc_per_node=8 train.py              # the same on 8 GPUs (gloo on CPU)
    python train.py --resume                          # after a crash: on from the newest checkpoint
    python train.py --help                            # every option, grouped by stage

Options are the fields of config.Config: --key value or --key=value, --flag / --no-flag for booleans,
--config run.json (or .toml) for many at once. A bad option or input file is refused before any
work with one line (exit code 2; --debug shows the traceback).

Each stage (STAGES, at the bottom) reads folders of --out and writes one: a complete HF model
directory (config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json
with the input's chat template) with its
provenance.json, so any stage runs alone on the output of an earlier run. Progress goes to stdout
and out/train.log, metrics to out/metrics.jsonl, the eval stage writes out/results.json, results.md
and responses.jsonl, and out/report.html (report.py) is rebuilt as each stage starts and ends. A run
never deletes what it did not make: a fresh run into an unfinished one is refused (--resume goes
on, --overwrite starts over), and --stages=eval only reads.
"""
import dataclasses
import faulthandler
import json
import os
import random
import shlex
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, fields

import torch

import checkpoint
import countdown
import coat
import config
import data
import parallel
import rae
import report
import reward
import rl
import rlt
import rollout
import tokenizer
from config import base_path, check_config, group_of, parse_args
from eval import evaluate, response_rows, write_results
from model import ModelConfig, Transformer, ValueModel, compute_dtype, num_params
from rollout import sampler_for
from sft import SFTConfig, orm_pairs, orm_train, sft_train
from tokenizer import INSTRUCTION, Tokenizer, build_task_tokenizer, render_prompt


# -----------------------------------------------------------------------------
# what every stage uses: its folders, the settings of its training loops (the logger: report.make_logger)

def get_device(cfg):
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def has_model(path):
    return os.path.isfile(os.path.join(path, "config.json"))


def stage_dir(cfg, name):
    """out/<name>; the base model is the user's directory when --model is given."""
    return cfg.model if name == "base" and cfg.model else os.path.join(cfg.out, name)


def folder(entry):
    """The top folder of an entry of STAGES' reads or writes: "orm/rae.jsonl" -> "orm"."""
    return entry.split("/")[0]


def load_stage(cfg, name, cls=Transformer, shard=None, dtype=torch.float32):
    """(model, tokenizer) of out/<name>, in dtype on the run's device; shard: see sharding()."""
    path = stage_dir(cfg, name)
    checkpoint.restore_dir(path, has_model)
    if not has_model(path):
        raise SystemExit(f"{path}: no model there; run the stage that makes it first")
    return cls.from_pretrained(path, device=get_device(cfg), dtype=dtype, shard=shard), Tokenizer.from_pretrained(path)


def sharding(cfg, trained=True):
    """(shard, dtype) to load a model of an RL stage with: under torchrun with --shard=fsdp, FSDP2
    applied on the meta device (each process reads only its own shards); a trained model in fp32
    gathering in the compute dtype, a frozen one stored in it. Else (None, fp32)."""
    if cfg.shard != "fsdp" or parallel.world() == 1:
        return None, torch.float32
    low = compute_dtype(cfg.dtype, get_device(cfg))
    if trained:
        return (lambda m: parallel.shard_model(m, None if low == torch.float32 else low)), torch.float32
    return parallel.shard_model, low


def save_output(cfg, state, name, write):
    """out/<name>, replaced all at once (checkpoint.write_dir) by what write(dir) puts into it, and its
    provenance: the ids of the outputs the running stage read (state["made_from"])."""
    def save(tmp):
        os.makedirs(tmp, exist_ok=True)
        write(tmp)
        checkpoint.write_provenance(tmp, state["stage"], state["made_from"], cfg.prompt)
    return checkpoint.write_dir(stage_dir(cfg, name), save)


def save_stage(cfg, state, name, model, tok, models=None, write=None):
    """out/<name> as a complete HF directory (+ models: {subdirectory: model}, e.g. the critic;
    + write(dir): more files)."""
    # every process: gathering an FSDP2 model's shards is a collective (rank 0 then writes)
    states = {sub: parallel.full_state_dict(m) for sub, m in {"": model, **(models or {})}.items()}

    def save(tmp):
        # the token ids in config.json and generation_config.json: transformers' generate stops as ours
        model.save_pretrained(tmp, tok.special_token_ids, tok.stop_ids, states[""])
        tok.save_pretrained(tmp)
        for sub, m in (models or {}).items():
            m.save_pretrained(os.path.join(tmp, sub), tok.special_token_ids, state_dict=states[sub])
        if write:
            write(tmp)
    return save_output(cfg, state, name, save)


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
                                           "log_every", "seed", "act_ckpt")}
    return SFTConfig(**{**shared, **own, "dtype": compute_dtype(cfg.dtype, get_device(cfg)), "shard": cfg.shard == "fsdp",
                        **kw})


# -----------------------------------------------------------------------------
# the stages: fn(cfg, state), state = {"log", "stage", "made_from", "train", "test", "rl", "demos"}

def shipped_base(cfg):
    """The directory of the shipped base model if it was pretrained with this run's task, model and
    pretraining options (its nanosatori.json), else None. Neither the seed (it varies the stages
    after the base) nor n_test and heldout (held-out problems are drawn beside the same training
    ones) matter."""
    path = base_path(cfg)
    meta = os.path.join(path, "nanosatori.json")
    if not cfg.base or cfg.data or not os.path.isfile(meta):    # a user's data needs its own base
        return None
    with open(meta) as f:
        made = json.load(f)["options"]
    mine = asdict(cfg)
    return path if all(json.dumps(v) == json.dumps(mine[k]) for k, v in made.items() if k not in ("seed", "n_test", "heldout")) else None


def stage_pretrain(cfg, state):
    """A tokenizer and a small Qwen2 trained on (prompt, CoT solution + eos) -> out/base; or a copy of
    the shipped base when it was made with the same options; nothing with --model."""
    log, train = state["log"], state["train"]
    if cfg.model:
        return log(f"pretrain: --model given, {cfg.model} is the base model")
    shipped = shipped_base(cfg)
    if shipped:
        save_stage(cfg, state, "base", Transformer.from_pretrained(shipped), Tokenizer.from_pretrained(shipped))
        return log(f"pretrain: the shipped base {shipped} was made with these options; copied to "
                   f"{stage_dir(cfg, 'base')} (--base= pretrains a new one)")
    torch.manual_seed(cfg.seed)
    # the corpus holds each prompt as the new tokenizer will write it (render_prompt: its chat template)
    corpus = [render_prompt(INSTRUCTION.format(question=p["question"])) + data.solution_text(p) for p in train[:5000]]
    tok = build_task_tokenizer(corpus, cfg.vocab_size, cfg.max_position_embeddings, cfg.whole_numbers)
    mcfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                       num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                       max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=True)
    model = Transformer(mcfg).to(get_device(cfg))
    log(f"pretrain: {num_params(model) / 1e6:.2f}M parameters, vocab {tok.vocab_size}, {len(train)} problems")
    if cfg.task == "countdown":          # many searches per problem: the arithmetic, not the traces, is learnt
        train = countdown.with_traces(train, cfg.countdown_traces, data.countdown_config(cfg), cfg.seed)
    examples = [(tok.encode_prompt(p["question"]), tok.encode(data.solution_text(p)) + [tok.eos_id]) for p in train]
    m = sft_train(model, examples, sft_config(cfg, "pretrain", max_steps=cfg.pretrain_steps), **loop_kw(cfg, state, "pretrain"))
    path = save_stage(cfg, state, "base", model, tok)
    log(f"pretrain: {m['steps']} steps, {m['tokens']} tokens in {m['time_s']:.0f}s, loss {m['loss']:.4f} -> {path}",
        stage="pretrain", done=True, **{k: v for k, v in m.items() if k != "losses"})


def demos_path(cfg):
    return os.path.join(cfg.out, "synthesize", "demos.jsonl")


def stage_synthesize(cfg, state):
    """COAT demonstrations from the base model (generator -> exact critic -> one per type per
    question, coat.synthesize_coat) -> out/synthesize/demos.jsonl; with --demos, the user's own."""
    if cfg.demos:
        return copy_demos(cfg, state)
    model, tok = load_stage(cfg, "base")
    problems = state["train"][:cfg.synth_questions]
    prompts = [tok.encode_prompt(p["question"]) for p in problems]
    # a continuation's prompt holds the chain so far and the critic's hint line: room for two generations
    sampler = sampler_for(model, prompts, 2 * cfg.synth_max_new_tokens + 64, cfg.gen_batch)
    scfg = coat.SynthConfig(group=cfg.synth_group, temperature=cfg.synth_temperature,
                            max_new_tokens=cfg.synth_max_new_tokens)
    stats = Counter()
    records = coat.synthesize_coat(coat.sampler_generator(sampler, tok.stop_ids), tok, parallel.shard(problems),
                                   scfg, seed=cfg.seed + 7919 * parallel.rank(), log=state["log"], stats=stats)
    records = parallel.gather(records)
    if not records:
        samples, boxed, right = parallel.all_sum([stats["samples"], stats["boxed"], stats["right"]])
        raise SystemExit(f"synthesize: no demonstration; of {samples} samples of {stage_dir(cfg, 'base')}, "
                         f"{boxed} reached a \\boxed{{}} answer and {right} "
                         "were right. Bring demonstrations (--demos=file.jsonl), raise --synth_group or "
                         "--synth_max_new_tokens, or check the prompt (--prompt)")
    save_output(cfg, state, "synthesize", lambda d: coat.write_demos(os.path.join(d, "demos.jsonl"), records))
    state["log"](f"synthesize: {len(records)} demonstrations -> {demos_path(cfg)}", stage="synthesize",
                 **dict(coat.synthesize_stats(records)))


def copy_demos(cfg, state):
    """The user's demonstrations (--demos, data.load_demos' formats, read by main) ->
    out/synthesize/demos.jsonl, where format tuning and the record of the run read demonstrations."""
    records = state["demos"]
    no_answer = sum(reward.extract_answer(r["response"]) is None for r in records)
    save_output(cfg, state, "synthesize", lambda d: coat.write_demos(os.path.join(d, "demos.jsonl"), records))
    state["log"](f"synthesize: --demos given, {len(records)} demonstrations from {cfg.demos} -> {demos_path(cfg)}"
                 + (f"; {no_answer} of them end in no \\boxed{{}} answer, which RL and evaluation "
                    "grade wrong" if no_answer else ""), stage="synthesize", total=len(records))


def stage_sft(cfg, state):
    """Format tuning: the base + COAT tokens, SFT on demos.jsonl, wrong steps that a demonstration
    corrects masked out of the loss (coat.demo_example) -> out/format_tuned."""
    path = demos_path(cfg)
    model, tok = with_coat_tokens(*load_stage(cfg, "base"))
    demos = coat.read_demos(path)
    if not demos:
        raise SystemExit(f"sft: {path} holds no demonstrations (was the base model too weak to synthesize any?)")
    examples = [coat.demo_example(tok, d) for d in demos]
    state["log"](f"sft: {len(examples)} COAT demonstrations from {path}")
    m = sft_train(model, examples, sft_config(cfg, "sft"), **loop_kw(cfg, state, "sft"))
    out = save_stage(cfg, state, "format_tuned", model, tok)
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
    del policy                  # the ORM has its own copy of the trunk
    if pairs:
        kw = {k: v for k, v in loop_kw(cfg, state, "orm").items() if k != "name"}
        m = orm_train(orm, pairs, sft_config(cfg, "orm"), margin=cfg.orm_margin, **kw)
        log(f"orm: {len(pairs)} pairs, loss {m['loss']:.4f}", stage="orm", pairs=len(pairs), loss=m["loss"])
    else:
        log("orm: no question has both a correct and an incorrect sample; the ORM stays untrained")
    states, counts = rae.build_buffer(zip(qids, prompts, groups), tok.coat_ids, tok.reflect_id,
                                      max_back=cfg.rae_max_back, seed=cfg.seed, stop_ids=tok.stop_ids)
    save_stage(cfg, state, "orm", orm, tok, write=lambda d: rae.write_buffer(os.path.join(d, "rae.jsonl"), states))
    log(f"rae: {len(states)} restart states from {counts['kept']} questions "
        f"({counts['all_correct']} all correct, {counts['all_wrong']} all wrong dropped)", stage="rae", **counts)


def run_rl(cfg, state, src, dst, pool, temperature, group, steps, reward_fn=None, problems=None, critic_from=None):
    """rl.rl_train from out/<src> -> out/<dst> (its critic in out/<dst>/critic) on `pool`, whose
    question ids index problems (default: the RL questions). PPO's critic starts from critic_from
    when that holds a model, else from the ORM (or the policy's trunk with --orm=false); the ORM
    also scores responses with --orm_reward; a KL term compares with a frozen copy of out/<src>."""
    (shard, _), frozen = sharding(cfg), sharding(cfg, trained=False)
    policy, tok = load_stage(cfg, src, shard=shard)
    pcfg = rl.algo_config(cfg, group)
    orm_dir = stage_dir(cfg, "orm")
    use_orm = cfg.orm and has_model(orm_dir) and reward_fn is None
    critic = None
    if pcfg.adv_estimator == "gae":
        init = critic_from if critic_from and has_model(critic_from) else orm_dir if use_orm else None
        critic = ValueModel.from_pretrained(init, get_device(cfg), torch.float32, shard) if init else \
            ValueModel.from_policy(policy, shard)
        state["log"](f"{dst}: the critic starts from {init or 'the policy (a zero value head)'}")
    orm = load_stage(cfg, "orm", ValueModel, *frozen)[0].eval() if use_orm and cfg.orm_reward else None
    ref = load_stage(cfg, src, Transformer, *frozen)[0].eval().requires_grad_(False) \
        if pcfg.kl_coef or pcfg.kl_loss_coef else None
    rl.rl_train(cfg, policy, tok, state["rl"] if problems is None else problems, pool, temperature, group, steps,
                critic=critic, orm=orm, ref=ref, reward_fn=reward_fn, name=dst, log=state["log"],
                ckpt_dir=os.path.join(cfg.out, "ckpt", state["stage"], dst))
    save_stage(cfg, state, dst, policy, tok, models={"critic": critic} if critic is not None else None)


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
    del sampler, policy         # the sampler holds the policy and its KV cache
    base, btok = with_coat_tokens(*load_stage(cfg, "base"))
    m = sft_train(base, examples, sft_config(cfg, "distill"), **loop_kw(cfg, state, "distill"))
    save_stage(cfg, state, "distilled", base, btok)
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
    save_stage(cfg, state, "rlt_warm", teacher, tok)
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
        save_stage(cfg, state, name, model, tok)
        model = load_stage(cfg, name)[0]           # whole again (trained, it may be sharded)
        m = evaluate(model, tok, state["test"], max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.eval_batch,
                     log=log, name=f"rlt {name}")
        results[name] = m["pass_at_1"]
        log(f"rlt: {name} greedy pass@1 {m['pass_at_1']:.3f} on {m['n']} problems", stage="rlt", model=name, **m)
    if parallel.is_main():
        with open(os.path.join(cfg.out, "rlt_results.json"), "w") as f:
            json.dump(results, f, indent=2)


EVAL_STAGES = ("base", "format_tuned", "rl_round1", "distilled", "rl_round2")


def stage_eval(cfg, state):
    """Greedy pass@1 + COAT statistics of every stage model present -> out/results.json, results.md,
    and each response graded -> out/responses.jsonl. A model made from an output that was remade
    since (say rl_round2 after rl ran again) is marked stale: it does not belong to the chain beside it."""
    outputs = {folder(w): stage_dir(cfg, folder(w)) for _, _, writes in STAGES.values() for w in writes}
    stale = checkpoint.stale(outputs)
    rows, responses = [], []
    for name in (n for n in EVAL_STAGES if has_model(stage_dir(cfg, n))):
        t0 = time.time()
        model, tok = load_stage(cfg, name)
        m, texts = evaluate(model, tok, state["test"], max_new_tokens=cfg.eval_max_new_tokens,
                            batch_size=cfg.eval_batch, return_texts=True, log=state["log"], name=f"eval {name}")
        rows.append({"name": name, **m, "stale": stale.get(name, [])})
        responses += response_rows(name, state["test"], texts)
        note = f"; stale via {', '.join(stale[name])} (remade, or stale itself, since)" if name in stale else ""
        state["log"](f"eval {name}: pass@1 {m['pass_at_1']:.3f} on {m['n']} problems ({time.time() - t0:.0f}s){note}",
                     stage="eval", model=name, **m)
        del model
    if not rows:
        raise SystemExit(f"eval: no stage model in {cfg.out} (looked for {', '.join(EVAL_STAGES)})")
    if parallel.is_main():
        state["log"](write_results(cfg.out, rows, responses))


def stage_report(cfg, state):
    """out/report.html from what --out holds (report.py); also rebuilt as every other stage starts and
    ends. Here no run is live, so a stage that progress.json calls current was stopped."""
    if parallel.is_main():
        state["log"](f"report: {report.write_report(cfg.out, report_stages(), live=False)}")


def report_stages():
    """The pipeline's stages for the report's table: {name: (reads, writes)}."""
    return {name: (reads, writes) for name, (_, reads, writes) in STAGES.items() if name != "report"}


def rebuild_report(cfg, log):
    """out/report.html rebuilt by rank 0; a failure is one logged line, never the run's end."""
    if parallel.is_main():
        try:
            report.write_report(cfg.out, report_stages())
        except Exception as e:      # the page is a view of the run, not part of it
            log(f"report: {os.path.join(cfg.out, 'report.html')} not rebuilt: {type(e).__name__}: {e}")


# name: (function, what it reads from --out, what it writes there). The default chain runs them in
# this order; each stage seeds its RNGs from its place here. An output records the ids of the
# top-level folders its stage read (provenance.json), which is how eval tells a stale chain.
STAGES = {
    "pretrain":   (stage_pretrain,   (),                                        ("base",)),
    "synthesize": (stage_synthesize, ("base",),                                 ("synthesize/demos.jsonl",)),
    "sft":        (stage_sft,        ("base", "synthesize/demos.jsonl"),        ("format_tuned",)),
    "orm":        (stage_orm,        ("format_tuned",),                         ("orm", "orm/rae.jsonl")),
    "rl":         (stage_rl,         ("format_tuned", "orm", "orm/rae.jsonl"),  ("rl_round1", "rl_round1/critic")),
    "distill":    (stage_distill,    ("rl_round1", "base"),                     ("distilled",)),
    "rl2":        (stage_rl2,        ("distilled", "orm", "rl_round1/critic"),  ("rl_round2", "rl_round2/critic")),
    "eval":       (stage_eval,       EVAL_STAGES,                               ("results.json", "results.md",
                                                                                 "responses.jsonl")),
    "rlt":        (stage_rlt,        ("base",),                                 ("rlt_warm", "rlt_teacher", "rlt_student",
                                                                                 "plain_student", "rlt_results.json")),
    "report":     (stage_report,     (),                                        ("report.html",)),
}
DEFAULT_STAGES = ["pretrain", "synthesize", "sft", "orm", "rl", "distill", "rl2", "eval"]
READ_ONLY = {"eval", "report"}      # a run of only these leaves progress.json and out/ckpt alone


def missing_input(cfg, names, done):
    """A one-line error for the first thing a stage of the run reads that neither --out holds nor an
    earlier stage of the run makes, else None. A stage can do without the ORM (its critic then
    starts from the policy), round 1's critic, and the RAE buffer with --rae=false; eval reads what
    it finds."""
    optional = {"orm", "rl_round1/critic"} | (set() if cfg.rae else {"orm/rae.jsonl"})
    made = set()
    for name in names:
        for read in STAGES[name][1] if name not in done and name != "eval" else ():
            top, _, rest = read.partition("/")
            where = stage_dir(cfg, top)
            present = any(os.path.exists(os.path.join(d, rest)) for d in (where, where + ".old"))   # see restore_dir
            if read not in optional | made and not present:
                maker = next(n for n, (_, _, writes) in STAGES.items() if read in writes)
                return (f"--stages={','.join(names)}: stage {name} reads {read}, which is not in {cfg.out}; "
                        f"run stage {maker} first")
        made.update(STAGES[name][2])
    return None


def check_prompt(cfg, names, done):
    """A one-line error for the first model the run reads that learned another --prompt style (its
    provenance), or whose chat template cannot render a prompt with --prompt=chat_template; else None."""
    reads = {stage_dir(cfg, folder(r)) for n in names if n not in done for r in STAGES[n][1]} | {stage_dir(cfg, "base")}
    for path in sorted(d for d in reads if os.path.isfile(os.path.join(d, "tokenizer.json"))):
        made = checkpoint.provenance(path).get("prompt")
        if made not in (None, cfg.prompt):
            return (f"--prompt={cfg.prompt}: {path} learned --prompt={made}; give --prompt={made}, or start from "
                    "the base model in a new --out")
        try:
            Tokenizer.from_pretrained(path).prompt("What is 1 + 1?")
        except Exception as e:      # ValueError (no template) or jinja2's errors, from the user's template
            return f"--prompt={cfg.prompt}: {path}'s chat template cannot render a prompt ({str(e).splitlines()[0]})"
    return None


def main(argv):
    """Run the stages argv asks for. Every option and input file is checked first: a bad one raises
    SystemExit with one line before --out is touched."""
    cfg = parse_args(argv)
    rank, world = parallel.init()
    names = [s for s in cfg.stages.split(",") if s] or DEFAULT_STAGES
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise SystemExit(f"--stages: unknown stage {unknown[0]!r}; expected some of {', '.join(STAGES)}")
    check_config(cfg, names, world)
    train, test, rl_questions = data.load_problems(cfg, need_solutions="rlt" in names)
    demos = data.read_user_file(cfg.demos, "demos", data.load_demos, "demonstrations") if cfg.demos else None
    prev = checkpoint.read_progress(cfg.out) if cfg.resume else None
    tokenizer.PROMPT = cfg.prompt       # every prompt of the run (Tokenizer.prompt) follows --prompt
    done_before = prev["done"] if prev else []
    missing = missing_input(cfg, names, done_before) or check_prompt(cfg, names, done_before)
    if missing:
        raise SystemExit(missing)
    checkpoint.check_writable(cfg.out, cfg.min_free_gb * 2**30)
    # a run of read-only stages (eval) leaves the record of the run in --out, and its checkpoints, alone
    progress = None
    if not set(names) <= READ_ONLY:
        # held out: the count, not the option (0 means "as many as the data allows")
        signature = {**{k: v for k, v in asdict(cfg).items() if k not in config.NOT_SIGNATURE}, "n_test": len(test)}
        progress = checkpoint.begin_run(cfg.out, names, signature, cfg.resume, cfg.overwrite, config.RENAMED)
        if rank == 0:
            with open(os.path.join(cfg.out, "run_config.json"), "w") as f:
                json.dump(asdict(cfg), f, indent=2)
    done = progress["done"] if progress else []
    log = report.make_logger(cfg.out, command="python train.py " + shlex.join(argv), tensorboard=cfg.tensorboard)
    rollout.CUDA_GRAPHS = cfg.cuda_graphs
    if get_device(cfg).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    state = {"log": log, "train": train, "test": test, "rl": rl_questions, "demos": demos}
    log(f"nanosatori: stages {','.join(names)}, {len(train)} train" +
        (f" + {len(rl_questions)} RL" if rl_questions is not train else "") + f" / {len(test)} {cfg.heldout} problems, "
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
        reads = sorted({folder(r) for r in STAGES[name][1]})
        state.update(stage=name, made_from={r: checkpoint.output_id(stage_dir(cfg, r)) for r in reads})
        if progress:
            checkpoint.stage_start(cfg.out, progress, name)
            rebuild_report(cfg, log)        # the page shows the stage running
        STAGES[name][0](cfg, state)
        if progress:
            checkpoint.stage_done(cfg.out, progress, name)
        log(f"stage {name} done in {time.time() - t0:.0f}s", stage=name, wall_s=time.time() - t0)
        if name != "report":
            rebuild_report(cfg, log)
    if progress:
        checkpoint.end_run(cfg.out, progress)
    parallel.shutdown()


def cli(argv):
    """main(argv) from a shell -> the exit code. An error meant for the user (a SystemExit with a
    message) is one line on stderr and exit code 2; --debug shows where it was raised too. Once the
    run has started its train.log, the error (or a crash's traceback) is added to it."""
    report.RUN_LOG = None
    try:
        main(argv)
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        try:
            debug = parse_args(argv).debug
        except SystemExit:
            debug = False
        if debug:
            traceback.print_exc()
        who = f" (rank {parallel.rank()})" if parallel.world() > 1 else ""
        print(f"error{who}: {e.code}", file=sys.stderr)
        report.to_run_log(f"error{who}: {e.code}\n")
        return 2
    except BaseException:
        report.to_run_log(traceback.format_exc())      # the cause of a crash stays with the run's log
        raise
    return 0


if __name__ == "__main__":
    faulthandler.enable()   # a crash in native code (segfault, abort) still prints each thread's Python stack
    sys.exit(cli(sys.argv[1:]))
