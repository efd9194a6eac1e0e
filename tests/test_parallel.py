"""parallel.py and distributed sft: 2 CPU processes (gloo, launched by torchrun) against 1 process.

This file is also the torchrun worker: `python -m torch.distributed.run ... tests/test_parallel.py OUT`
runs the checks below on each rank and rank 0 writes the trained weights to OUT.
"""
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import parallel  # noqa: E402
import sft  # noqa: E402
from model import ModelConfig, Transformer, ValueModel  # noqa: E402

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
EXAMPLES = [([1 + i % 7, 2, 3 + i % 5], [4 + i % 11, 10 + i % 3, 2][:1 + i % 3]) for i in range(24)]
PAIRS = [([1, 2, 3 + i % 3], [7, 8 + i % 2], [9, 9, 9][:1 + i % 3]) for i in range(10)]
# one optimizer step on the same global batch; "one_row": every micro-batch has a single row, so
# rank 1 has no data at all (it must still join every collective)
RUNS = {
    "sft": (dict(lr=1e-3, max_steps=1, batch_tokens=24, row_len=8, grad_accum=2, warmup_frac=0.0), EXAMPLES),
    "one_row": (dict(lr=1e-3, max_steps=1, batch_tokens=8, row_len=8, grad_accum=2, warmup_frac=0.0), EXAMPLES),
    "orm": (dict(lr=1e-3, max_steps=1, batch_tokens=36, row_len=12, grad_accum=1, warmup_frac=0.0), PAIRS),
}


def train(kind):
    """The model after one step of `kind`, in this process (whatever the world size)."""
    cfg, data = RUNS[kind]
    torch.manual_seed(0)
    model = Transformer(CFG)
    quiet = dict(log=lambda s: None)
    if kind == "orm":
        model = ValueModel.from_policy(model)
        with torch.no_grad():
            model.score.weight.normal_(std=0.1)     # a non-zero head, so the trunk gets gradients too
        sft.orm_train(model, data, sft.SFTConfig(**cfg), margin=1.0, **quiet)
    else:
        sft.sft_train(model, data, sft.SFTConfig(**cfg), **quiet)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def worker(out):
    torch.set_num_threads(1)
    rank, world = parallel.init()
    assert (rank, world) == (parallel.rank(), parallel.world()) and world == 2
    for n in range(6):                              # fewer, as many and more items than ranks
        items = [f"x{i}" for i in range(n)]
        mine = parallel.shard(items)
        assert len(mine) in (n // 2, (n + 1) // 2) and parallel.gather(mine) == items
    assert parallel.all_sum(rank + 1) == 3 and isinstance(parallel.all_sum(1), int)
    assert parallel.all_sum([0.5, rank]) == [1.0, 1]
    t = torch.tensor([1.0, rank])
    assert parallel.all_sum(t) is t and t.tolist() == [2.0, 1.0]
    results = {kind: train(kind) for kind in RUNS}
    parallel.sync_grads = lambda params: None       # without the gradient sum the test must notice
    results["nosync"] = train("sft")
    if rank == 0:
        for kind, sd in results.items():
            save_file(sd, os.path.join(out, f"{kind}.safetensors"))
    parallel.barrier()
    parallel.shutdown()


def test_single_process_is_a_no_op():
    assert parallel.init() == (0, 1) and parallel.is_main()
    items = list(range(5))
    assert parallel.shard(items) == items and parallel.gather(items) == items
    assert parallel.all_sum(2.5) == 2.5
    parallel.barrier()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    parallel.sync_grads([p])
    assert p.grad.tolist() == [2.0] * 3


def test_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.abspath(__file__), str(tmp_path)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for kind in RUNS:
        want, got = train(kind), load_file(tmp_path / f"{kind}.safetensors")
        assert want.keys() == got.keys()
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=0, atol=1e-6), (kind, k, (got[k] - want[k]).abs().max())
    # the comparison is sensitive: without summing gradients over ranks, rank 0's step differs
    got, want = load_file(tmp_path / "nosync.safetensors"), train("sft")
    assert max((got[k] - want[k]).abs().max().item() for k in want) > 5e-4


if __name__ == "__main__":
    worker(sys.argv[1])
