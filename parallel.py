"""One node, many processes: the process group, sums over ranks, sharding lists, summing gradients.

    rank, world = parallel.init()       # under torchrun: nccl on CUDA, gloo on CPU; else (0, 1)
    mine = parallel.shard(prompts)      # this rank's contiguous block
    everything = parallel.gather(results_of(mine))   # back in the original order, on every rank
    even, dropped = parallel.rebalance(kept)         # unequal parts -> as many items on every rank

Every function is a no-op (or the identity) in one process without torchrun, so the same training
code runs either way. Data parallelism: callers normalise their loss by GLOBAL counts and the
gradients are summed over ranks, by sync_grads when every rank holds the full model, by FSDP2's
reduce-scatter when the model is sharded (shard_model); they then equal (up to float summation
order) the gradient of one process that saw the whole batch.
"""
import os
import sys

import torch
import torch.distributed as dist

if dist.is_available():
    # Imported after init_process_group, torch.distributed.nn binds the live default group into its
    # functions' default arguments (group=group.WORLD), so destroy_process_group cannot free it and
    # gloo's threads run on into interpreter exit, where they can abort a finished run (SIGABRT,
    # "terminate called without an active exception"). torch.optim imports it
    # through torch._dynamo on the first optimizer, so import it here, before there is a group to bind.
    import torch.distributed.nn  # noqa: F401

BUCKET = 25_000_000   # elements per gradient all_reduce: few collectives, bounded extra memory


def _die_with_launcher():
    """Linux: this process gets SIGKILL when its parent, torchrun, dies. torchrun starts each worker
    in a session of its own, so a launcher killed outright would leave its workers running, still
    writing checkpoints into the run's directory that a --resume is about to use."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)     # 1 = PR_SET_PDEATHSIG
        if os.getppid() == 1:                           # the launcher died before that took effect
            os.kill(os.getpid(), signal.SIGKILL)


def init():
    """Join the process group when launched by torchrun with WORLD_SIZE > 1. -> (rank, world)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        _die_with_launcher()
        if torch.cuda.is_available():
            local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
            if local >= gpus:
                raise SystemExit(f"torchrun started local rank {local}, but this machine has {gpus} GPU(s): one process "
                                 f"per GPU (--nproc_per_node={gpus}), or CUDA_VISIBLE_DEVICES= to run on the CPU")
            torch.cuda.set_device(local)
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return rank(), world()


def _on():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if _on() else 0


def world():
    return dist.get_world_size() if _on() else 1


def is_main():
    return rank() == 0


def barrier():
    if world() > 1:
        dist.barrier()


def shutdown():
    if _on():
        dist.destroy_process_group()


def _device():
    # nccl only reduces CUDA tensors, gloo reduces CPU ones
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(x):
    """Sum over ranks. A tensor is reduced in place (and returned); a number, or a list of numbers
    (one collective for all of them), gives back the global sum(s) as Python numbers."""
    if world() == 1:
        return x
    if torch.is_tensor(x):
        dist.all_reduce(x)
        return x
    many = isinstance(x, (list, tuple))
    vals = list(x) if many else [x]
    t = torch.tensor([float(v) for v in vals], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    out = [int(s) if isinstance(v, int) else s for v, s in zip(vals, t.tolist())]
    return out if many else out[0]


def shard(items):
    """This rank's contiguous block of items: rank r gets items[r*n//W:(r+1)*n//W] (the remainder
    spread over the ranks; a rank may get nothing when there are fewer items than ranks)."""
    n, r, w = len(items), rank(), world()
    return items[r * n // w:(r + 1) * n // w]


def gather(local_items):
    """Inverse of shard: every rank's list concatenated in rank order, on every rank."""
    if world() == 1:
        return list(local_items)
    parts = [None] * world()
    dist.all_gather_object(parts, list(local_items))
    return [x for part in parts for x in part]


def rebalance(local_items):
    """Even out a list the ranks hold in unequal parts: every rank's items gathered in rank order
    and dealt back in equal contiguous blocks; the last (total % world) items are dropped so that
    every rank holds as many. -> (this rank's block, number dropped over all ranks)."""
    items = gather(local_items)
    n = len(items) - len(items) % world()
    return shard(items[:n]), len(items) - n


def shard_model(model, param_dtype=None):
    """FSDP2 over the processes, in place: one unit per decoder block plus the root (embedding, final
    norm, head), fp32 master weights sharded, each unit gathered for its forward and backward in
    param_dtype (None: as stored), gradients reduce-scattered in fp32. They are summed, not averaged:
    our losses are normalised by global counts, as with sync_grads. hidden() runs as a forward
    (our losses call it and the fused head outside forward). -> model"""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    # inputs are not cast: under autocast the residual stream stays fp32, as in one process
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):       # every unit reduces on its own: each needs both settings
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)   # gloo has no pre-scaled sum
    if hasattr(model, "hidden"):
        register_fsdp_forward_method(model, "hidden")
    return model


def reshard(model):
    """Free the whole weights FSDP2 keeps gathered after a forward (the root unit's: our losses read
    lm_head.weight after hidden()), so that parameters() are the shards again."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return model


def is_sharded(model):
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model):
    """The model's state as whole tensors: its state_dict, or under FSDP2 the shards gathered (a
    collective: every rank calls it; rank 0 gets CPU tensors, the others {})."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(reshard(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def clip_grad_norm(params, max_norm):
    """clip_grad_norm_ -> the global norm before clipping, as a float (sharded, it is a DTensor made
    whole: a collective)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def whole_copy(model, dtype=None):
    """A plain copy of an FSDP2 model: every weight gathered whole (cast to dtype), no FSDP hooks.
    The RL sampler decodes from it, calling the model's parts outside forward(). A collective: every
    rank calls it; weights are gathered one at a time (transient memory: one whole fp32 tensor)."""
    if is_sharded(model):
        reshard(model)
    with torch.device("meta"):
        plain = type(model)(model.cfg)
    whole = {}
    for name, p in model.named_parameters():          # a tied weight once
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        whole[name] = t.detach().to(dtype or t.dtype)
    plain.load_state_dict(whole, strict=False, assign=True)
    if getattr(model.cfg, "tie_word_embeddings", False) and hasattr(plain, "lm_head"):
        plain.lm_head.weight = plain.model.embed_tokens.weight
    return plain.eval().requires_grad_(False)


def sync_grads(params):
    """Sum .grad over ranks, in place (FSDP2's sharded parameters are skipped: it reduce-scattered
    their gradients in backward). Why not DDP: our losses call model.hidden() and fused kernels
    outside forward(), which DDP's hooks do not see, and a rank without data skips its forward.
    A parameter whose grad is None on every rank stays None (AdamW then skips it, as in one
    process); otherwise ranks without a grad contribute zeros, so every rank runs the same
    collectives in the same order. Gradients are flattened into one buffer per dtype and device
    (in buckets of BUCKET elements) rather than one all_reduce per parameter."""
    if world() == 1:
        return
    params = [p for p in params if not hasattr(p, "full_tensor")]     # DTensor: sharded by FSDP2
    if not params:
        return
    dev = _device()
    has = torch.tensor([float(p.grad is not None) for p in params], device=dev)
    dist.all_reduce(has)
    groups = {}
    for p, h in zip(params, has.tolist()):
        if h > 0:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p)
    for ps in groups.values():   # same order on every rank: same params, same global flags
        i = 0
        while i < len(ps):
            bucket, n = [], 0
            while i < len(ps) and (not bucket or n + ps[i].numel() <= BUCKET):
                bucket.append(ps[i])
                n += ps[i].numel()
                i += 1
            flat = torch.cat([p.grad.reshape(-1) for p in bucket])           # [n]
            dist.all_reduce(flat)
            for p, g in zip(bucket, flat.split([p.numel() for p in bucket])):
                p.grad.copy_(g.view_as(p.grad))
