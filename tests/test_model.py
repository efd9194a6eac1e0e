"""Model parity with transformers' Qwen2ForCausalLM, checkpoint round trips and refused configs."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import ModelConfig, Transformer, ValueModel

transformers = pytest.importorskip("transformers")


def hf_model(tmp_path, n_kv, tie, seed=0):
    cfg = transformers.Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=n_kv, tie_word_embeddings=tie,
                                   max_position_embeddings=256, rope_theta=10000.0)
    torch.manual_seed(seed)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():   # random weights everywhere (biases and norms too), not HF's init
        for p in hf.parameters():
            p.normal_(0, 0.2)
    return hf


@pytest.mark.parametrize("n_kv,tie", [(2, True), (4, False), (1, False), (4, True)])
def test_logits_match_transformers_both_ways(tmp_path, n_kv, tie):
    hf = hf_model(tmp_path, n_kv, tie)
    x = torch.randint(0, 97, (3, 11))
    hf.save_pretrained(tmp_path / "hf")
    ours = Transformer.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        ref = hf(x).logits
        assert (ours(x) - ref).abs().max() <= 1e-4
    ours.save_pretrained(tmp_path / "ours")
    hf2 = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        assert (hf2(x).logits - ref).abs().max() <= 1e-4


def test_sharded_and_bf16_checkpoints(tmp_path):
    hf = hf_model(tmp_path, 2, False)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    x = torch.randint(0, 97, (2, 9))
    ours = Transformer.from_pretrained(tmp_path / "sharded")
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max() <= 1e-4
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    m = Transformer.from_pretrained(tmp_path / "bf16")
    assert m.lm_head.weight.dtype == torch.bfloat16
    m32 = Transformer.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert m32.lm_head.weight.dtype == torch.float32


def test_transformers5_config_layout(tmp_path):
    d = ModelConfig(vocab_size=50, hidden_size=32, num_attention_heads=4, num_key_value_heads=2).to_hf()
    d.pop("rope_theta"), d.pop("torch_dtype")
    d.update(rope_parameters={"rope_theta": 5e5, "rope_type": "default"}, dtype="bfloat16")
    cfg = ModelConfig.from_hf(d)
    assert cfg.rope_theta == 5e5 and cfg.torch_dtype == "bfloat16"


@pytest.mark.parametrize("change,words", [
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope scaling"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope scaling"),
    ({"use_sliding_window": True}, "sliding-window"),
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_config_is_refused(tmp_path, change, words):
    d = ModelConfig().to_hf()
    d.update(change)
    with pytest.raises(ValueError, match=words):
        ModelConfig.from_hf(d)


def test_bad_checkpoints_name_the_tensor(tmp_path):
    m = Transformer(ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    m.save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    name = "model.layers.1.mlp.up_proj.weight"
    sd.pop(name)
    save_file(sd, f)
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        Transformer.from_pretrained(tmp_path)
    sd[name] = torch.zeros(3, 3)
    save_file(sd, f)
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(3, 3\)"):
        Transformer.from_pretrained(tmp_path)
    os.remove(f)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{\n  \"vocab_size\": 3,\n  oops\n}")
    with pytest.raises(ValueError, match=r"config.json:3: invalid JSON"):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("tie", [True, False])
def test_resize_vocab_mean_init_and_hf_loadable(tmp_path, tie):
    m = Transformer(ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie))
    emb_mean = m.model.embed_tokens.weight.mean(0).clone()
    head_mean = m.lm_head.weight.mean(0).clone()
    x = torch.randint(0, 40, (2, 5))
    before = m(x).detach()
    m.resize_vocab(43)
    assert m.model.embed_tokens.weight.shape == (43, 32) and m.lm_head.weight.shape == (43, 32)
    assert torch.allclose(m.model.embed_tokens.weight[40:], emb_mean.expand(3, -1))
    assert torch.allclose(m.lm_head.weight[40:], head_mean.expand(3, -1))
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == tie
    assert torch.allclose(m(x)[..., :40], before, atol=1e-6)   # old tokens unchanged
    m.save_pretrained(tmp_path)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert (hf(x).logits - m(x)).abs().max() <= 1e-4


def test_value_model_shares_trunk_and_round_trips(tmp_path):
    policy = Transformer(ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2))
    vm = ValueModel.from_policy(policy)
    x = torch.randint(0, 40, (2, 6))
    assert torch.equal(vm.model(x), policy.hidden(x))
    torch.nn.init.normal_(vm.score.weight)
    v = vm(x)
    assert v.shape == (2, 6)
    vm.save_pretrained(tmp_path)
    vm2 = ValueModel.from_pretrained(tmp_path)
    assert torch.equal(vm2(x), v)
    assert json.load(open(tmp_path / "config.json"))["architectures"] == ["Qwen2ForTokenClassification"]


def test_token_ids_go_into_config_and_generation_config(tmp_path):
    """save_pretrained(path, token_ids, stop_ids): the ids in config.json, the stop ids as
    generation_config.json's eos list; a value model gets the ids only; our loader reads past them."""
    m = Transformer(ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=2))
    ids = {"bos_token_id": None, "eos_token_id": 2, "pad_token_id": 0}
    m.save_pretrained(tmp_path / "lm", ids, [0, 2])
    hf = transformers.AutoConfig.from_pretrained(tmp_path / "lm")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (None, 2, 0)
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "lm")
    assert (gen.eos_token_id, gen.pad_token_id) == ([0, 2], 0)
    ValueModel.from_policy(m).save_pretrained(tmp_path / "vm", ids)
    assert json.load(open(tmp_path / "vm" / "config.json"))["eos_token_id"] == 2
    assert not (tmp_path / "vm" / "generation_config.json").exists()
    x = torch.randint(0, 40, (1, 5))
    assert torch.equal(Transformer.from_pretrained(tmp_path / "lm")(x), m(x))
