"""train.py: CLI overrides, the stage table, a tiny chain of every stage, the RL stages, problem loading."""
import json
import os
import shutil

import pytest

import data
import rae
import config
import train
from tokenizer import CONTINUE as C, EXPLORE as E, REFLECT as R
from config import Config, parse_args

# a built-in problem: 47 + 38 = 85, 85 * 3 = 255, 255 - 59 = 196
P = data.problem_from(47, [("+", 38), ("*", 3), ("-", 59)])
S1, S2, S3 = "Step 1: 47 + 38 = 85.", "Step 2: 85 * 3 = 255.", "Step 3: 255 - 59 = 196."
BAD2 = "Step 2: 85 * 3 = 245."



def test_parse_args_types_and_errors():
    cfg = parse_args(["--seed=3", "--sft_lr=1e-4", "--out=runs/x", "--task_ops=+-", "--betas=0.9,0.99",
                      "--stages=pretrain,eval"])
    assert cfg.seed == 3 and isinstance(cfg.seed, int)
    assert cfg.sft_lr == 1e-4 and cfg.out == "runs/x" and cfg.task_ops == "+-"
    assert cfg.betas == (0.9, 0.99) and cfg.stages == "pretrain,eval"
    assert Config().seed == 0                                   # defaults untouched
    with pytest.raises(SystemExit, match="unknown option --nope"):
        parse_args(["--nope=1"])
    with pytest.raises(SystemExit, match="--seed=abc: expected an integer"):
        parse_args(["--seed=abc"])
    with pytest.raises(SystemExit, match="--key=value"):
        parse_args(["seed=1"])
    with pytest.raises(SystemExit, match="--group_size is now --grpo_group"):
        parse_args(["--group_size=8"])


def test_stage_registry_and_unknown_stage(tmp_path):
    names = train.DEFAULT_STAGES
    assert names[:3] == ["pretrain", "synthesize", "sft"] and names[-1] == "eval"
    assert set(names) <= set(train.STAGES) and "rlt" in train.STAGES and "rlt" not in names
    with pytest.raises(SystemExit, match="unknown stage 'bogus'"):
        train.main([f"--out={tmp_path}", "--stages=bogus"])


def test_stages_need_their_inputs_before_any_work(tmp_path):
    """A stage whose input is neither in --out nor made by an earlier stage of the run is refused
    before --out is written; one that can do without it (the ORM, the RAE buffer with --rae=false)
    is not."""
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="stage sft reads base, which is not in .*run; run stage pretrain first"):
        train.main([f"--out={out}", "--stages=sft"])
    with pytest.raises(SystemExit, match="stage sft reads synthesize/demos.jsonl, .*; run stage synthesize first"):
        train.main([f"--out={out}", "--stages=pretrain,sft"])
    assert not out.exists()
    cfg = parse_args([f"--out={out}"])
    assert train.missing_input(cfg, train.DEFAULT_STAGES, []) is None
    os.makedirs(out / "format_tuned")
    assert "reads orm/rae.jsonl" in train.missing_input(cfg, ["rl"], [])
    assert train.missing_input(parse_args([f"--out={out}", "--rae=false"]), ["rl"], []) is None
    assert train.missing_input(cfg, ["orm", "rl"], []) is None and train.missing_input(cfg, ["eval"], []) is None


TINY = ["--n_train=64", "--n_test=4", "--n_rl=64", "--hidden_size=32", "--intermediate_size=64", "--num_hidden_layers=1",
        "--vocab_size=300", "--pretrain_steps=2", "--pretrain_batch_tokens=1024", "--eval_max_new_tokens=8",
        "--log_every=1", "--synth_questions=3", "--synth_group=2", "--synth_max_new_tokens=8", "--sft_epochs=1"]


def test_tiny_chain(tmp_path):
    """Every stage end to end on a toy scale: complete HF dirs, demos, results.json in the schema."""
    out = str(tmp_path)
    train.main([f"--out={out}", "--stages=pretrain,eval"] + TINY)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(out, "base", f))
    # format tuning on hand-made demonstrations (an untrained model synthesizes none), then eval of both models
    demo = f"{S1}\n{C}{BAD2}\n{R}Let me check step 2.\n{E}{S2}\n{C}{S3}\n{C}The answer is \\boxed{{196}}.<|im_end|>"
    with open(os.path.join(out, "demos.jsonl"), "w") as f:
        f.write(json.dumps({"question": P["question"], "answer": P["answer"], "response": demo}) + "\n")
    train.main([f"--out={out}", "--stages=synthesize,sft,eval", f"--demos={os.path.join(out, 'demos.jsonl')}"] + TINY)
    assert os.path.isfile(os.path.join(out, "synthesize", "demos.jsonl"))
    from tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(os.path.join(out, "format_tuned"))
    assert tok.reflect_id >= 300 and json.load(open(os.path.join(out, "format_tuned", "config.json")))["vocab_size"] == tok.vocab_size
    res = json.load(open(os.path.join(out, "results.json")))
    assert [r["name"] for r in res["stages"]] == ["base", "format_tuned"]
    for k in ("pass_at_1", "wrong_to_right", "right_to_wrong", "reflect_rate", "mean_length", "n"):
        assert k in res["stages"][0]
    assert res["stages"][0]["n"] == 4
    assert os.path.isfile(os.path.join(out, "results.md"))
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert any(l.get("stage") == "pretrain" and l.get("step") == 2 for l in lines)
    assert any(l.get("stage") == "eval" and l.get("model") == "format_tuned" for l in lines)
    # a new base: the format-tuned model was made from the old one, and eval says so
    assert [r["stale"] for r in res["stages"]] == [[], []]
    train.main([f"--out={out}", "--stages=pretrain,eval"] + TINY + ["--seed=1"])
    res = json.load(open(os.path.join(out, "results.json")))
    assert [(r["name"], r["stale"]) for r in res["stages"]] == [("base", []), ("format_tuned", ["base", "synthesize"])]
    assert "| format_tuned (stale via base, synthesize) |" in open(os.path.join(out, "results.md")).read()


def pretrain_and_fake_format_tuned(out, args):
    """out/base pretrained with args, and out/format_tuned: the base with the COAT tokens added."""
    train.main([f"--out={out}", "--stages=pretrain"] + args)
    from model import Transformer
    from tokenizer import Tokenizer
    m, tok = Transformer.from_pretrained(os.path.join(out, "base")), Tokenizer.from_pretrained(os.path.join(out, "base"))
    tok.add_coat_tokens()
    m.resize_vocab(tok.vocab_size)
    m.save_pretrained(os.path.join(out, "format_tuned"))
    tok.save_pretrained(os.path.join(out, "format_tuned"))


def test_tiny_rl_stages(tmp_path, capsys, monkeypatch):
    """orm -> rl -> eval on a toy scale: the ORM, the RAE buffer file, a PPO round with its progress
    metrics, and rl_round1 in results.json; round 1 saves its critic and round 2 starts from it.
    (An untrained model may have no right answer, so the RAE buffer may be empty: rl then falls back
    to the plain questions.)"""
    out = str(tmp_path)
    small = TINY + ["--rae_questions=4", "--rae_group=2", "--rl_batch=4", "--minibatch_size=2",
                    "--micro_batch=1", "--rl_max_new_tokens=8", "--rl_steps=2"]
    pretrain_and_fake_format_tuned(out, small)
    train.main([f"--out={out}", "--stages=orm,rl,eval"] + small)
    assert os.path.isfile(os.path.join(out, "orm", "model.safetensors"))
    assert os.path.isfile(os.path.join(out, "orm", "rae.jsonl"))
    assert os.path.isfile(os.path.join(out, "rl_round1", "model.safetensors"))
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    steps = [l for l in lines if l.get("stage") == "rl_round1" and "step" in l]
    assert [l["step"] for l in steps] == [1, 2]
    for k in ("reward", "acc", "kl", "entropy", "clipfrac", "value_loss", "resp_len", "reflect_rate", "tok_s",
              "gen_s", "train_s"):
        assert k in steps[0]
    res = json.load(open(os.path.join(out, "results.json")))
    assert [r["name"] for r in res["stages"]] == ["base", "format_tuned", "rl_round1"]
    from safetensors.torch import load_file
    orm, critic = (load_file(os.path.join(out, d, "model.safetensors")) for d in ("orm", "rl_round1/critic"))
    assert orm.keys() == critic.keys() and any(not orm[k].equal(critic[k]) for k in orm)   # trained on from the ORM
    shutil.copytree(os.path.join(out, "rl_round1"), os.path.join(out, "distilled"), ignore=shutil.ignore_patterns("critic"))
    assert f"rl_round1: the critic starts from {os.path.join(out, 'orm')}\n" in capsys.readouterr().out
    train.main([f"--out={out}", "--stages=rl2"] + small)
    logged = capsys.readouterr().out
    assert f"rl_round2: the critic starts from {os.path.join(out, 'rl_round1', 'critic')}" in logged
    assert f"temperature {Config.rl2_temperature}, actor lr {Config.rl2_actor_lr:g}\n" in logged   # round 2's own lr
    assert os.path.isfile(os.path.join(out, "rl_round2", "critic", "model.safetensors"))
    # the GPU path: the sampler decodes with a bf16 copy, refreshed after each update
    import rl
    from model import ValueModel
    policy, tok = train.load_stage(config.parse_args([f"--out={out}"] + small), "rl_round1")
    pool = rae.plain_states(data.load_problems(config.parse_args(small))[2], tok)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    cfg = config.parse_args(small + ["--sampler_dtype=bfloat16", "--rl_steps=1", "--rl_ckpt_every=0"])
    # round 1's trained critic: its values differ from token to token, so the advantages are not all
    # zero even when every sample gets the same reward (a zero value head, from_policy, would make them so)
    critic = ValueModel.from_pretrained(os.path.join(out, "rl_round1", "critic"), device=next(policy.parameters()).device)
    m = rl.rl_train(cfg, policy, tok, data.load_problems(cfg)[2], pool, 1.0, 1, 1, critic=critic,
                    ckpt_dir=os.path.join(out, "ck"))
    assert m["step"] == 1 and m["skipped_steps"] == 0
    assert any(not v.equal(policy.state_dict()[k]) for k, v in before.items())
    assert os.listdir(os.path.join(out, "ck")) == ["step-00000001"]      # rl_ckpt_every=0: at the end only
    # DAPO trains on the groups whose samples were graded differently (here: every one, each sample
    # alternately right and wrong) and skips a step where none is (here: when all are wrong)
    real = rl.sample_and_grade
    def graded(mixed):
        def sample_and_grade(*a, **k):
            outs, ok = real(*a, **k)
            return outs, [mixed and i % 2 == 0 for i in range(len(ok))]
        return sample_and_grade
    cfg = config.parse_args(small + ["--algo=dapo", "--grpo_group=2", "--rl_steps=1", "--rl_ckpt_every=0"])
    for mixed, want in ((True, cfg.rl_batch // 2), (False, None)):
        monkeypatch.setattr(rl, "sample_and_grade", graded(mixed))
        before = {k: v.clone() for k, v in policy.state_dict().items()}
        m = rl.rl_train(cfg, policy, tok, data.load_problems(cfg)[2], pool, 1.0, 2, 1)
        assert m.get("prompts") == want
        assert any(not v.equal(policy.state_dict()[k]) for k, v in before.items()) == (want is not None)


def test_shipped_base_only_for_its_own_options(tmp_path):
    """The default run copies assets/base (made with the default task/model/pretrain options, any
    seed); other options, or --base=, pretrain a new base."""
    assert train.shipped_base(Config()) is not None and train.shipped_base(Config(seed=5)) is not None
    assert train.shipped_base(Config(n_test=37)) is not None
    assert train.shipped_base(Config(task_max_value=50)) is None
    assert train.shipped_base(Config(hidden_size=64)) is None and train.shipped_base(Config(base="")) is None
    assert train.shipped_base(Config(task="countdown")) is None and train.shipped_base(Config(whole_numbers=True)) is None
    # --task=countdown brings its own shipped base (TASK_DEFAULTS), also matched by its options
    countdown = train.shipped_base(parse_args(["--task=countdown", "--seed=3"]))
    assert countdown is not None and countdown != train.shipped_base(Config())
    assert train.shipped_base(parse_args(["--task=countdown", "--countdown_traces=4"])) is None
    assert train.shipped_base(parse_args(["--task=countdown", "--countdown_order=random"])) is None
    train.main([f"--out={tmp_path}", "--stages=pretrain"])
    from safetensors.torch import load_file
    shipped = load_file(os.path.join(train.shipped_base(Config()), "model.safetensors"))
    copied = load_file(os.path.join(tmp_path, "base", "model.safetensors"))
    assert all(shipped[k].equal(copied[k]) for k in shipped)


def test_rl_questions_are_new_problems(tmp_path):
    """The built-in RL questions are n_rl problems beyond the n_train (which stay the same with or
    without them), disjoint from both splits; n_rl=0 and --data reuse the training questions."""
    from data import problem_key
    tr, te, rlq = data.load_problems(Config(n_train=50, n_test=10, n_rl=40))
    tr0, te0, rl0 = data.load_problems(Config(n_train=50, n_test=10, n_rl=0))
    assert tr == tr0 and te == te0 and rl0 is tr0 and len(rlq) == 40
    tr2, te2, rl2 = data.load_problems(Config(n_train=50, n_test=30, n_rl=40))     # n_test extends the test set only
    assert tr2 == tr and rl2 == rlq and te2[:10] == te
    keys = [problem_key(p) for p in tr + te + rlq]
    assert len(set(keys)) == len(keys)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(8)))
    for extra in ({}, {"test_data": str(path)}):
        tr, te, rlq = data.load_problems(Config(data=str(path), n_test=2, **extra))
        assert rlq is tr and len(tr) == (8 if extra else 6)


def test_rl_pool_mix_draws_by_share():
    """rl.pick takes each prompt from one list of the pool with its share; bad pools are refused."""
    import random
    import rl
    a, b = ["a1", "a2"], ["b1", "b2", "b3"]
    rng = random.Random(0)
    draws = [rl.pick(rl.as_pools([(a, 0.25), (b, 0.75)]), rng) for _ in range(4000)]
    share_a = sum(d in a for d in draws) / len(draws)
    assert abs(share_a - 0.25) < 0.03 and set(draws) == set(a + b)
    assert {rl.pick(rl.as_pools(b), rng) for _ in range(100)} == set(b)        # one plain list
    assert {rl.pick(rl.as_pools([(a, 1.0), (b, 0.0)]), rng) for _ in range(100)} == set(a)
    for bad in ([], [(a, 0.5), (b, 0.4)], [([], 0.5), (b, 0.5)]):
        with pytest.raises(ValueError):
            rl.as_pools(bad)
