"""bench.py: the GPU benchmark's every part runs at tiny shapes on the CPU (--smoke), so that the
one prepared run on a GPU does not fail on a typo."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_benchmark_smoke(tmp_path):
    out = tmp_path / "bench_gpu.json"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "TRITON_INTERPRET")}
    r = subprocess.run([sys.executable, "bench.py", "gpu", "--smoke", "--json", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    for part in ("sampler", "decode", "logprob", "sft"):
        assert "error" not in res[part], (part, res[part])
    s = res["sampler"]
    assert s["greedy_graphs_equal_eager"] and s["output_tokens"] > 0
    assert s["ours_tok_s"] > 0 and s["hf_tok_s"] > 0 and s["eager_step_ops"] > 0
    assert res["decode"]["max_abs_err_ours_vs_ref"] < 1e-2 and res["decode"]["prefill"]["max_abs_err"] < 1e-2
