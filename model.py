"""The Qwen2 transformer, its value-model twin, and HF-compatible load/save over safetensors.

Parameter names match transformers' Qwen2ForCausalLM exactly ("model.layers.0.self_attn.q_proj.weight",
"lm_head.weight", ...), so loading a checkpoint is a name-by-name copy with shape checks.

    model = Transformer.from_pretrained("path/to/Qwen2.5-0.5B")   # config.json + *.safetensors
    logits = model(input_ids)                                      # [B, T] -> [B, T, V]
    model.save_pretrained("out/")                                  # loadable by transformers
"""
import json
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import step_kernels

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    vocab_size: int = 512
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    torch_dtype: str = "float32"

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        """Read a Qwen2 config.json dict in the layout of transformers 4 (top-level rope_theta,
        torch_dtype) or 5 (rope_parameters, dtype). Anything we would silently get wrong is refused."""
        def refuse(what):
            raise ValueError(f"{source}: {what} is not supported by nanosatori")
        if d.get("model_type", "qwen2") != "qwen2":
            refuse(f"model_type {d.get('model_type')!r} (only 'qwen2')")
        if d.get("hidden_act", "silu") != "silu":
            refuse(f"hidden_act {d['hidden_act']!r}")
        if d.get("use_sliding_window", False):
            refuse("sliding-window attention (use_sliding_window=true)")
        if any(t != "full_attention" for t in d.get("layer_types") or []):
            refuse("layer_types other than full_attention")
        rope = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if scaling or rope_type != "default":
            refuse(f"rope scaling {scaling or rope}")
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        if dtype not in DTYPES:
            refuse(f"dtype {dtype!r}")
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d and f.name not in ("rope_theta", "torch_dtype")}
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if k not in d:
                raise ValueError(f"{source}: missing required key {k!r}")
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])
        cfg = cls(**kw, rope_theta=float(theta), torch_dtype=dtype)
        if d.get("head_dim") not in (None, cfg.head_dim):
            refuse(f"head_dim {d['head_dim']} != hidden_size / num_attention_heads")
        if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError(f"{source}: hidden_size must divide by num_attention_heads, and heads by num_key_value_heads")
        return cfg

    def to_hf(self) -> dict:
        """transformers-4 layout (as published Qwen2.5 checkpoints), which transformers 5 also reads."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu",
                 use_sliding_window=False, attention_dropout=0.0, use_cache=True)
        return d


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalised in fp32 whatever x's dtype, as transformers' Qwen2RMSNorm
        if step_kernels.fused(x, "rms_norm"):
            return step_kernels.rms_norm(x, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_table(n, head_dim, theta, device, dtype):
    """cos, sin [n, head_dim] of positions 0 .. n-1 (rotate-half layout, as Qwen2 uses)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [..., heads, hd]; cos/sin [..., hd] (x's leading dims: [B, T] in training, [N] in the sampler)."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def repeat_kv(x, rep):
    """[..., kv_heads, T, hd] -> [..., kv_heads * rep, T, hd], query head h reading kv head h // rep
    (x.repeat_interleave(rep, -3), as a view, expand and one copy)."""
    return x[..., None, :, :].expand(*x.shape[:-2], rep, *x.shape[-2:]).flatten(-4, -3)


def causal_attention(q, k, v):
    """Causal SDPA of q [..., heads, T, hd] over k, v [..., kv_heads, T, hd] -> [..., heads, T, hd].
    On CUDA, torch 2.13's flash kernel (fp16/bf16, autocast included) takes GQA as it is, but its
    memory-efficient kernel (the one for fp32) does not: there k, v are repeated to every head (a
    copy of [..., heads, T, hd]), else SDPA would fall back to the math kernel's [heads, T, T] scores.
    On CPU the flash kernel takes GQA in any dtype: the call is unchanged."""
    rep = q.shape[-3] // k.shape[-3]
    half = q.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled("cuda")
    if q.is_cuda and rep > 1 and not half:
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def doc_attention(q, k, v, docs):
    """Causal attention within each document of packed rows, never across: q [B, T, heads, hd],
    k, v [B, T, kv_heads, hd] -> [B, T, heads, hd]. docs: the lengths of the documents laid end to
    end over the B * T flattened positions (a row's padding tail is one more), as sft.collate gives.
    One causal SDPA per document: no [T, T] mask or scores, and sum(n^2) work instead of B * T^2, for
    one kernel launch per document and layer (on CUDA, the price of not padding each document)."""
    B, T = q.shape[:2]
    # split's backward is one cat, where slicing per document would add a full-size gradient per slice
    per_doc = zip(*(x.flatten(0, 1).split(docs) for x in (q, k, v)))       # [n, heads or kv_heads, hd]
    ys = [causal_attention(*(x.transpose(0, 1) for x in qkv)).transpose(0, 1) for qkv in per_doc]
    # the cat is one copy of the output more than the causal path keeps: the kernels save theirs
    return torch.cat(ys).view(B, T, *ys[0].shape[1:])


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, attn_mask=None, cache=None, docs=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd)
        if cache is not None:
            # The sampler owns the paged KV cache: it rotates q and k (with the store, one kernel on
            # CUDA), stores k/v and attends over what is cached. Its tokens come packed as one row
            # (B == 1): q [T, heads, hd] -> [T, heads, hd].
            return self.o_proj(cache.attend(self.layer_idx, q[0], k[0], v[0], cos[0], sin[0]).reshape(B, T, -1))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if docs is not None:
            assert attn_mask is None, "docs and attn_mask: give one"
            y = doc_attention(q, k, v, docs)
        else:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)   # [B, heads, T, hd]
            if attn_mask is None:
                y = causal_attention(q, k, v)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
            y = y.transpose(1, 2)
        return self.o_proj(y.reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        g, u = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(step_kernels.silu_mul(g, u) if step_kernels.fused(g, "silu_mul") else F.silu(g) * u)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask=None, cache=None, docs=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, docs)
        return x + self.mlp(self.post_attention_layernorm(x))


class Trunk(nn.Module):
    """Embedding, blocks and final norm: shared by the policy and the value model."""
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self._rope, self._rope_kept = {}, []   # (device, dtype) -> rotary table (not a parameter: not saved)
        self.act_ckpt = False   # training forwards recompute each block's activations in backward (--act_ckpt)

    def rope(self, n, device, dtype):
        """The rotary table of at least n positions, built once per device and dtype (positions index
        it, which is cheaper than computing cos and sin for every forward). A table that a larger
        one replaces is kept: a captured CUDA graph may still read it."""
        cos, sin = self._rope.get((device, dtype), (None, None))
        if cos is None or cos.shape[0] < n:
            if cos is not None:
                self._rope_kept.append((cos, sin))
            cos, sin = self._rope[(device, dtype)] = rope_table(n, self.cfg.head_dim, self.cfg.rope_theta, device, dtype)
        return cos, sin

    def forward(self, input_ids, positions=None, attn_mask=None, cache=None, docs=None):
        """input_ids [B, T] -> final hidden states [B, T, H]. positions default to 0..T-1;
        docs (document lengths, see doc_attention) makes packed rows attend within each document;
        attn_mask (bool [B, 1, T, T], True = attend) replaces the causal mask, e.g. as a reference."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        x = self.embed_tokens(input_ids)
        if torch.is_autocast_enabled(x.device.type):
            x = x.float()   # the residual stream in fp32 under autocast, bf16 weights (FSDP2's gathers) or not
        # a row's positions are below its length, except with a cache, whose owner sized the table
        need = self.cfg.max_position_embeddings if cache is not None else max(self.cfg.max_position_embeddings,
                                                                              input_ids.shape[1])
        cos, sin = self.rope(need, x.device, x.dtype)
        cos, sin = cos[positions], sin[positions]
        # only a forward that will be backpropagated: never sampling (cache) nor eval
        ckpt = self.act_ckpt and self.training and cache is None and torch.is_grad_enabled()
        for layer in self.layers:
            if ckpt:   # keeps each block's input [B, T, H] only; the rest is recomputed in backward
                x = checkpoint(layer, x, cos, sin, attn_mask, None, docs, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, cache, docs)
        return self.norm(x)


class Transformer(nn.Module):
    """Qwen2 causal LM. `hidden()` gives the final hidden states so that losses can fuse the
    head with the log-softmax (logprobs.token_logprobs) instead of materialising [B, T, V]."""
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Trunk(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(_init_weights)

    def hidden(self, input_ids, positions=None, attn_mask=None, cache=None, docs=None):
        return self.model(input_ids, positions, attn_mask, cache, docs)

    def forward(self, input_ids, positions=None, attn_mask=None, cache=None, docs=None):
        return self.lm_head(self.hidden(input_ids, positions, attn_mask, cache, docs))

    @property
    def device(self):
        return self.lm_head.weight.device

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, shard=None):
        return load_pretrained(cls, path, device, dtype, shard)

    def save_pretrained(self, path, token_ids=None, stop_ids=None, state_dict=None):
        """config.json + model.safetensors. token_ids (Tokenizer.special_token_ids: bos, eos, pad) go
        into config.json and, with eos = stop_ids, into generation_config.json, so that transformers'
        generate stops where our sampler does. state_dict: the weights to write (default: the model's;
        an FSDP2 model's gathered by parallel.full_state_dict)."""
        save_model(self, path, {"architectures": ["Qwen2ForCausalLM"], **(token_ids or {})}, state_dict)
        if token_ids:
            with open(os.path.join(path, "generation_config.json"), "w") as fh:
                json.dump({**token_ids, "eos_token_id": list(stop_ids or [token_ids["eos_token_id"]])}, fh, indent=2)

    def resize_vocab(self, new_size: int):
        """Grow the vocabulary for new special tokens; new rows start at the mean embedding (and
        the mean head row when untied), so the new tokens begin as an 'average' token."""
        old = self.cfg.vocab_size
        if new_size <= old:
            return
        emb = _grow_rows(self.model.embed_tokens.weight, new_size)
        self.model.embed_tokens = nn.Embedding.from_pretrained(emb, freeze=False)
        if self.cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(self.cfg.hidden_size, new_size, bias=False).to(emb)
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            head = _grow_rows(self.lm_head.weight, new_size)
            self.lm_head = nn.Linear(self.cfg.hidden_size, new_size, bias=False).to(head)
            self.lm_head.weight = nn.Parameter(head)
        self.cfg.vocab_size = new_size


class ValueModel(nn.Module):
    """Critic / outcome reward model: the same trunk with a scalar head, one value per token."""
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Trunk(cfg)
        self.score = nn.Linear(cfg.hidden_size, 1, bias=False)
        self.apply(_init_weights)
        nn.init.zeros_(self.score.weight)   # start as a constant critic

    def forward(self, input_ids, positions=None, attn_mask=None, docs=None):
        # a copy, not a view: FSDP2 cannot hook the backward of a view its module returns
        return self.score(self.model(input_ids, positions, attn_mask, docs=docs))[..., 0].clone()   # [B, T]

    @classmethod
    def from_policy(cls, policy: Transformer, shard=None):
        """A value model on the policy's trunk, with a zero head. shard: the policy is sharded, and
        shard(model) (as in load_pretrained) shards the new one alike: each process copies its shards."""
        if shard is None:
            vm = cls(policy.cfg).to(policy.lm_head.weight)
            vm.model.load_state_dict(policy.model.state_dict())
            return vm
        p0 = next(policy.parameters())
        with torch.device("meta"):
            vm = cls(policy.cfg).to(p0.dtype)
        shard(vm)
        vm.to_empty(device=p0.device)
        trunk = dict(policy.model.named_parameters())
        with torch.no_grad():
            for name, p in vm.model.named_parameters():
                p.to_local().copy_(trunk[name].to_local())
            vm.score.weight.zero_()
        return vm

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, shard=None):
        return load_pretrained(cls, path, device, dtype, shard)

    def save_pretrained(self, path, token_ids=None, stop_ids=None, state_dict=None):
        # Same tensor names as transformers' Qwen2ForTokenClassification with one label. stop_ids:
        # unused (a value model does not generate), taken so that either model saves the same way.
        save_model(self, path, {"architectures": ["Qwen2ForTokenClassification"], "num_labels": 1, **(token_ids or {})},
                   state_dict)


def compute_dtype(name, device):
    """The torch dtype of a --dtype value: auto = bfloat16 on CUDA, float32 elsewhere."""
    auto = torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"auto": auto, "float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def autocast(device, dtype):
    """The context of a training forward: bf16 autocast over fp32 master weights (matmuls in bf16,
    norms and softmaxes in fp32), or nothing for fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def _init_weights(m):
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
    if isinstance(m, RMSNorm):          # as built; this also makes a model allocated with to_empty whole
        nn.init.ones_(m.weight)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


def _grow_rows(w, n):
    w = w.detach()
    new = w.mean(0, keepdim=True).expand(n - w.shape[0], -1)
    return torch.cat([w, new], 0).clone()


# ----------------------------------------------------------------------------- checkpoints

def load_config(path) -> ModelConfig:
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{path}: no config.json (expected an HF Qwen2 model directory)")
    with open(f) as fh:
        try:
            d = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}:{e.lineno}: invalid JSON: {e.msg}") from None
    return ModelConfig.from_hf(d, f)


def load_pretrained(cls, path, device=None, dtype=None, shard=None):
    """cls(config) with the checkpoint's weights, in `dtype` (default: the config's torch_dtype), on
    `device` (default: the CPU). The model is built on the meta device and its storage allocated
    where it will live, uninitialised: no random init, no host copy of a GPU model, and tensors are
    read one at a time (load_weights refuses a checkpoint that leaves any of it unset).
    shard(model), e.g. parallel.shard_model, runs on the meta device: each process then allocates
    and reads only its own shard of every tensor."""
    cfg = load_config(path)
    with torch.device("meta"):
        model = cls(cfg).to(dtype or DTYPES[cfg.torch_dtype])
    if shard:
        shard(model)
    model = model.to_empty(device=device or "cpu")       # allocated once, in its dtype
    if isinstance(model, Transformer) and cfg.tie_word_embeddings and not shard:
        model.lm_head.weight = model.model.embed_tokens.weight      # one tensor, as built (FSDP2 keeps the tie)
    load_weights(model, path)
    return model


def weight_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        return sorted(set(os.path.join(path, v) for v in weight_map.values()))
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json "
                            "(only safetensors checkpoints are loaded)")


def _first_row(p):
    """The first row of an FSDP2 shard in its whole tensor: FSDP2 cuts dim 0 as torch.chunk does."""
    (placement,), mesh = p.placements, p.device_mesh
    assert placement.is_shard(0), f"expected a dim-0 shard, got {placement}"
    return mesh.get_local_rank() * -(-p.shape[0] // mesh.size())


def load_weights(model: nn.Module, path):
    """Copy every tensor of the checkpoint into `model`, by name, checking that nothing is missing,
    left over or mis-shaped. Tensors are cast to the model's dtype."""
    from safetensors import safe_open
    params = dict(model.state_dict(keep_vars=True))
    tied = getattr(model.cfg, "tie_word_embeddings", False)
    seen = set()
    for file in weight_files(path):
        with safe_open(file, framework="pt") as f:
            names = list(f.keys())
        for name in names:
            if name not in params:
                if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                    continue   # derived buffers, or a redundant copy of the tied embedding
                raise ValueError(f"{file}: unexpected tensor {name!r} (not a Qwen2 parameter)")
            # the file is mapped per tensor: the pages read stay resident only while it is mapped
            with safe_open(file, framework="pt") as f:
                t, p = f.get_slice(name), params[name]
                if tuple(t.get_shape()) != tuple(p.shape):
                    raise ValueError(f"{file}: tensor {name!r} has shape {tuple(t.get_shape())}, "
                                     f"expected {tuple(p.shape)} from config.json")
                with torch.no_grad():
                    if hasattr(p, "full_tensor"):       # an FSDP2 shard: read this process's rows only
                        local = p.to_local()
                        local.copy_(t[_first_row(p):_first_row(p) + local.shape[0]])
                    else:
                        p.copy_(t[:])
                seen.add(name)
    missing = [n for n in params if n not in seen and not (tied and n == "lm_head.weight")]
    if missing:
        raise ValueError(f"{path}: checkpoint is missing tensor {missing[0]!r}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def save_model(model: nn.Module, path, extra: dict, state_dict=None):
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    cfg = model.cfg.to_hf()
    cfg["torch_dtype"] = next(k for k, v in DTYPES.items() if v == next(model.parameters()).dtype)
    cfg.update(extra)
    sd = {k: v.detach().contiguous().cpu() for k, v in (model.state_dict() if state_dict is None else state_dict).items()}
    if model.cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)   # safetensors refuses shared storage; HF re-ties on load
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file(sd, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
