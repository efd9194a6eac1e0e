"""report.py: the page of a run from a hand-made out/ (every curve, ten graded responses per model,
escaping), from a real tiny run and from an empty one; the page in a headless Chromium; train.log and
evaluation's progress lines."""
import json
import os
import re
import shutil
import struct
import subprocess
import zlib

import pytest

import data
import report
import train
from eval import evaluate
from tokenizer import CONTINUE as C, EXPLORE as E, REFLECT as R

P = data.problem_from(47, [("+", 38), ("*", 3), ("-", 59)])      # 196
LOOPS = {"pretrain": ("loss", "lr", "grad_norm", "tokens_per_s"),
         "sft": ("loss", "lr", "grad_norm", "tokens_per_s"),
         "orm": ("loss", "acc", "lr", "grad_norm", "tokens_per_s"),
         "rl_round1": ("reward", "acc", "kl", "entropy", "reflect_rate", "resp_len", "tok_s", "value_loss",
                       "clipfrac")}
MODELS = ("base", "format_tuned")
EVIL = "<script>alert(1)</script>"


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def synthetic_run(out):
    """An out/ as a run that is in its rl stage leaves it, with every file the page reads: four
    loops (sft logged twice, the second time resumed from step 20), two evaluated models with 12
    responses each, one with a <script> in it, and a line cut by a crash at the end of metrics.jsonl."""
    os.makedirs(out / "base")
    os.makedirs(out / "format_tuned")
    recs = []
    for loop, metrics in LOOPS.items():
        starts = (1, 20) if loop == "sft" else (1,)
        for s0 in starts:
            recs += [{"time": 0, "stage": loop, "step": s, **{m: 1.0 / s + 0.01 * (m == "lr") for m in metrics}}
                     for s in range(s0, 31)]
        if loop != "rl_round1":
            recs.append({"time": 0, "stage": loop, "wall_s": 75.0})
    write_jsonl(out / "metrics.jsonl", recs)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"time": 0, "stage": "rl_round1", "st')
    stages = ["pretrain", "sft", "orm", "rl", "eval"]
    with open(out / "progress.json", "w") as f:
        json.dump({"done": ["pretrain", "sft", "orm"], "stages": stages, "current": "rl", "finished": False}, f)
    rows = [{"name": m, "n": 12, "pass_at_1": 0.5, "wrong_to_right": 0.25, "right_to_wrong": 0.0, "reflect_rate": 0.5,
             "explore_rate": 0.25, "grammar_ok": 1.0, "boxed_rate": 1.0, "mean_steps": 3.5, "mean_length": 60.0,
             "stale": ["base"] if m == "format_tuned" else []} for m in MODELS]
    with open(out / "results.json", "w") as f:
        json.dump({"stages": rows}, f)
    coat = f"Step 1: 47 + 38 = 85.\n{C}Step 2: 85 * 3 = 245.\n{R}Let me check.\n{E}Step 2: 85 * 3 = 255."
    resp = [{"model": m, "question": P["question"] + (EVIL if i == 0 else ""), "answer": "196",
             "response": (EVIL if i == 1 else "") + coat + f"\nThe answer is \\boxed{{{196 + i % 2}}}.",
             "pred": str(196 + i % 2), "correct": i % 2 == 0} for m in MODELS for i in range(12)]
    write_jsonl(out / "responses.jsonl", resp)
    return out


def curve_ids(page):
    return re.findall(r'<svg class="curve" id="curve-([\w]+)-([a-z_]+)"', page)


def test_report_of_a_synthetic_run(tmp_path):
    out = synthetic_run(tmp_path / "run")
    page = open(report.write_report(str(out), train.report_stages()), encoding="utf-8").read()
    # every loop's curves, in the loops' order, each with its id and title
    assert curve_ids(page) == [(loop, m) for loop, ms in LOOPS.items() for m in report.METRICS if m in ms]
    assert "<title>rl_round1: kl</title>" in page and '<h3 id="loop-rl_round1">rl_round1 (stage rl)</h3>' in page
    assert '<h3 id="loop-sft">sft</h3>' in page
    # the resumed sft loop: one point per step (its second logging replaced steps 20..30)
    sft_loss = re.search(r'id="curve-sft-loss".*?<polyline points="([^"]+)"', page).group(1)
    assert len(sft_loss.split()) == 30
    # the stage table: status from progress.json, wall time from metrics.jsonl, reads and writes
    row = lambda name: re.search(rf"<tr><td>{name}</td>(.*?)</tr>", page).group(1)
    assert 'class="done">done<' in row("sft") and "1m 15s" in row("sft")
    assert 'class="running">running<' in row("rl") and 'class="to-run">to run<' in row("eval")
    rebuilt = open(report.write_report(str(out), train.report_stages(), live=False), encoding="utf-8").read()
    assert '<tr><td>rl</td><td class="stopped">stopped<' in rebuilt     # by --stages=report: no run is live
    assert 'class="not-run">not run<' in row("rlt") and "report" not in re.findall(r"<tr><td>(\w+)</td>", page)
    assert "responses.jsonl" in row("eval") and '<span class="missing">rl_round1</span>' in row("rl")
    # the results table, stale rows marked
    assert re.search(r"<td>format_tuned <span[^>]*>\(stale via base\)</span></td><td[^>]*>12</td>"
                     r"<td[^>]*>0.500</td>", page)
    # ten responses per model, their verdicts, COAT tokens highlighted; model text escaped
    for m in MODELS:
        section = page.split(f'id="responses-{m}"')[1].split("<h3")[0]
        assert section.count('class="resp"') == 10 and f"{m}: 6/12 right" in page
        assert section.count('<span class="right">right</span>') == 5 and section.count('class="wrong"') == 5
        assert section.count('<span class="coat coat-reflect">&lt;|reflect|&gt;</span>') == 10
        assert section.count("coat-continue") == section.count("coat-explore") == 10
        assert section.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2
    assert "<script" not in page.lower()


def test_report_of_an_empty_out(tmp_path, capsys):
    """Nothing to show yet: the page says so; --stages=report works on such a directory."""
    page = open(report.write_report(str(tmp_path), train.report_stages()), encoding="utf-8").read()
    assert "No results yet" in page and "No progress.json" in page and "No responses yet" in page
    assert curve_ids(page) == []
    out = tmp_path / "new"
    train.main([f"--out={out}", "--stages=report", "--n_train=64", "--n_test=4", "--n_rl=64"])
    assert (out / "report.html").is_file() and not (out / "progress.json").exists()
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out


def test_a_report_error_is_one_line(tmp_path, monkeypatch):
    lines = []
    monkeypatch.setattr(report, "write_report", lambda out, stages: 1 / 0)
    train.rebuild_report(train.parse_args([f"--out={tmp_path}"]), lines.append)
    assert lines == [f"report: {tmp_path / 'report.html'} not rebuilt: ZeroDivisionError: division by zero"]


def test_a_run_writes_its_report_log_and_responses(tmp_path):
    """A tiny real run: report.html with the pretraining curves and the base model's graded
    responses, responses.jsonl, and train.log, which a second run adds to."""
    from test_train import TINY
    out = tmp_path / "run"
    train.main([f"--out={out}", "--stages=pretrain,eval"] + TINY)
    rows = [json.loads(l) for l in open(out / "responses.jsonl")]
    assert len(rows) == 4 and {r["model"] for r in rows} == {"base"}
    assert set(rows[0]) == {"model", "question", "answer", "response", "pred", "correct"}
    results = json.load(open(out / "results.json"))["stages"]
    assert sum(r["correct"] for r in rows) / 4 == results[0]["pass_at_1"]
    page = (out / "report.html").read_text()
    assert ("pretrain", "loss") in curve_ids(page) and page.count('class="resp"') == 4
    assert re.search(r'<tr><td>eval</td><td class="done">done</td><td class="num">\d', page)
    train.main([f"--out={out}", "--stages=eval"] + TINY)
    log = (out / "train.log").read_text().splitlines()
    heads = [l for l in log if l.startswith("==== ")]
    assert len(heads) == 2 and heads[1].endswith("python train.py --out=" + str(out) + " --stages=eval " + " ".join(TINY))
    assert any(l.startswith("stage pretrain done in") for l in log) and log[-1].startswith("stage eval done in")


def test_evaluate_reports_progress():
    """Two lanes for eight problems: a line at each quarter, with the time spent and an ETA."""
    from model import ModelConfig, Transformer
    from tokenizer import PROMPT_TEMPLATE, build_task_tokenizer
    tok = build_task_tokenizer([PROMPT_TEMPLATE.format(question=P["question"]) + P["solution"]] * 5,
                               vocab_size=300)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=256))
    lines = []
    evaluate(model, tok, [P] * 8, max_new_tokens=4, batch_size=2, log=lines.append, name="eval base")
    got = [re.fullmatch(r"eval base: (\d)/8 problems, \d+s, eta \d+s", l) for l in lines]
    assert all(got) and [int(g.group(1)) for g in got] == [2, 4, 6]


def png_pixels_vary(path):
    """(width, height, whether the image is more than one flat colour): the IHDR size, and the
    number of distinct bytes in its (filtered) pixel data, which a blank page keeps to a handful."""
    raw = open(path, "rb").read()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(raw):
        n, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        body = raw[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    return size, len(set(zlib.decompress(idat))) > 50


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium")
def test_report_in_a_headless_browser(tmp_path):
    out = synthetic_run(tmp_path / "run")
    path = report.write_report(str(out), train.report_stages())
    flags = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,4000"]
    url = "file://" + os.path.abspath(path)
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert curve_ids(dom) == curve_ids(open(path).read()) and len(curve_ids(dom)) == 22
    assert dom.count("<polyline") == 22 and "&lt;script&gt;alert(1)&lt;/script&gt;" in dom
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert png_pixels_vary(shot) == ((1280, 4000), True)


def test_tensorboard_scalars_are_the_metrics_of_each_step(tmp_path):
    """--tensorboard: every numeric metric of a logged step is a scalar <loop>/<name> at that step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_train import TINY
    out = tmp_path / "run"
    train.main([f"--out={out}", "--stages=pretrain", "--tensorboard"] + TINY)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    steps = [json.loads(l) for l in open(out / "metrics.jsonl") if '"step"' in l]
    assert {"pretrain/loss", "pretrain/lr", "pretrain/grad_norm"} <= set(events.Tags()["scalars"])
    loss = [(e.step, e.value) for e in events.Scalars("pretrain/loss")]
    assert loss == [(m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in steps if m["stage"] == "pretrain"]
