"""What a run leaves to look at: its log (out/train.log, out/metrics.jsonl, TensorBoard scalars) and
one self-contained page, out/report.html.

    python train.py --stages=report --out=runs/a      # rebuild runs/a/report.html from what runs/a holds
    write_report("runs/a", {"sft": (reads, writes), ...})

train.py rebuilds the page as each stage starts and ends. It shows the results table
(results.json), the stages with their status (progress.json), wall time and files, a small chart per
training loop and metric (metrics.jsonl), and ten graded responses of each evaluated model
(responses.jsonl), COAT's meta-action tokens highlighted. Whatever is missing is left out. The page
needs no network and no script: inline CSS and SVG drawn here; all model text is HTML-escaped.
"""
import html
import json
import math
import os
import time

import checkpoint
import parallel
from eval import TABLE, cell
from tokenizer import COAT_TOKENS

# -----------------------------------------------------------------------------
# the record a run keeps as it goes: console lines in train.log, metrics in metrics.jsonl (and TensorBoard)

RUN_LOG = None     # the train.log of the running run, once its header is written (cli adds the error that ends it)


def make_logger(out, command=None, tensorboard=False):
    """log(msg, **metrics): rank 0 prints msg (if any) and appends it to out/train.log, and appends the
    metrics to out/metrics.jsonl. command: the run's command line, for the header line that starts
    its part of train.log (runs into one --out add to the same log). tensorboard: the metrics of a
    step are also scalars "<loop>/<name>" in out/tensorboard."""
    global RUN_LOG
    path, text = os.path.join(out, "metrics.jsonl"), os.path.join(out, "train.log")
    if command is not None and parallel.is_main():
        with open(text, "a") as f:
            f.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {command}\n")
        RUN_LOG = text
    board = None
    if tensorboard and parallel.is_main():
        from torch.utils.tensorboard import SummaryWriter     # only when asked: tensorboard is optional
        board = SummaryWriter(os.path.join(out, "tensorboard"), flush_secs=10)

    def log(msg=None, **metrics):
        if not parallel.is_main():
            return
        if msg is not None:
            print(msg, flush=True)
            with open(text, "a") as f:
                f.write(msg + "\n")
        if metrics:
            with open(path, "a") as f:
                f.write(json.dumps({"time": time.time(), **metrics}) + "\n")
        if board is not None and "step" in metrics:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "steps"):
                    board.add_scalar(f"{metrics.get('stage', 'run')}/{k}", v, metrics["step"])
    return log

def to_run_log(text):
    """text added to the running run's train.log (rank 0), once its header is written."""
    if RUN_LOG is not None and parallel.is_main():
        with open(RUN_LOG, "a") as f:
            f.write(text)


# -----------------------------------------------------------------------------
# the page

# the curves drawn, in this order, where a loop logs them (tokens_per_s: SFT-like loops, tok_s: RL)
METRICS = ("loss", "reward", "acc", "kl", "entropy", "reflect_rate", "resp_len", "tokens_per_s", "tok_s",
           "grad_norm", "lr", "value_loss", "clipfrac")
MAX_POINTS = 200        # longer curves are thinned to this many points: the page stays small
LOG_RATIO = 50          # a positive curve whose largest value is more than this times its smallest: log y
RESPONSES = 10          # responses shown per evaluated model
W, H, LEFT, RIGHT, TOP, BOTTOM = 290, 180, 50, 12, 24, 30     # a chart's size and margins, px

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1300px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; margin: 20px 0 6px; }
table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.missing, .not-run { color: #999; } .done { color: #1a7f37; } .running, .stopped { color: #b35900; font-weight: bold; }
.charts { display: flex; flex-wrap: wrap; gap: 6px; }
svg.curve { border: 1px solid #e4e4e4; background: #fff; }
.resps { display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr)); gap: 8px; }
.resp { border: 1px solid #e4e4e4; padding: 6px 10px; }
.resp pre { white-space: pre-wrap; margin: 4px 0; font-size: 13px; background: #fafafa; padding: 4px; }
.q { font-weight: bold; } .right { color: #1a7f37; font-weight: bold; } .wrong { color: #c62828; font-weight: bold; }
.coat { font-weight: bold; padding: 0 2px; border-radius: 3px; }
.coat-continue { background: #dbeafe; color: #1e40af; } .coat-reflect { background: #fde2cf; color: #9a3412; }
.coat-explore { background: #d9f5dd; color: #166534; }
"""
COLORS = {"loss": "#1f77b4", "reward": "#2ca02c", "acc": "#17becf", "kl": "#d62728", "entropy": "#9467bd",
          "reflect_rate": "#ff7f0e", "resp_len": "#8c564b", "grad_norm": "#7f7f7f", "lr": "#bcbd22"}
esc = html.escape


def write_report(out, stages, live=True):
    """out/report.html from what out holds now -> its path. stages: {name: (reads, writes)}, the
    pipeline's stages in order with the entries of out/ they read and write. live: written by the
    run itself (its current stage is running), else by --stages=report (that stage was stopped)."""
    progress = checkpoint.read_progress(out) or {}
    records = read_jsonl(os.path.join(out, "metrics.jsonl"))
    results = []
    if os.path.isfile(os.path.join(out, "results.json")):
        with open(os.path.join(out, "results.json")) as f:
            results = json.load(f).get("stages", [])
    links = [f'<a href="{f}">{f}</a>' for f in ("results.md", "metrics.jsonl", "responses.jsonl", "train.log",
                                                 "progress.json") if os.path.isfile(os.path.join(out, f))]
    body = [f"<h1>nanosatori run: {esc(os.path.abspath(out))}</h1>",
            f"<p>{time.strftime('%Y-%m-%d %H:%M:%S')}; files: {', '.join(links) or 'none yet'}</p>",
            results_table(results), stage_table(out, stages, progress, records, live),
            curves(records, stages), responses(read_jsonl(os.path.join(out, "responses.jsonl")))]
    path = os.path.join(out, "report.html")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>nanosatori: '
                f'{esc(os.path.basename(os.path.abspath(out)))}</title><style>{CSS}</style></head>\n<body>\n'
                + "\n".join(body) + "\n</body></html>\n")
    os.replace(path + ".tmp", path)     # a browser never sees half a page
    return path


def read_jsonl(path):
    """The JSON objects of a .jsonl file ([] when there is none); a line being written (or cut by a
    crash) is skipped."""
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return [r for r in rows if isinstance(r, dict)]


def fmt(v):
    """A number in a few characters: 0.0123, 4.5, 2254, 21.3k, 3.4M."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return esc(str(v))
    if abs(v) >= 1e6:
        return f"{v / 1e6:.3g}M"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.3g}k"
    return f"{v:.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.3g}"


def duration(s):
    return "-" if s is None else f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m {s % 60:02.0f}s" if s < 3600 \
        else f"{int(s // 3600)}h {int(s % 3600 // 60):02d}m"


def results_table(rows):
    if not rows:
        return "<h2>Results</h2><p>No results yet (the eval stage writes results.json).</p>"
    head = "".join(f"<th>{k}</th>" for k in ("stage", "n") + TABLE)
    value = lambda r, k: esc(cell(k, r[k])) if isinstance(r.get(k), (int, float)) else "-"
    trs = []
    for r in rows:
        name = esc(r.get("name", "?")) + (f' <span class="missing">(stale via {esc(", ".join(r["stale"]))})</span>'
                                          if r.get("stale") else "")
        trs.append(f'<tr><td>{name}</td><td class="num">{esc(str(r.get("n", "-")))}</td>'
                   + "".join(f'<td class="num">{value(r, k)}</td>' for k in TABLE) + "</tr>")
    return f"<h2>Results</h2><table><tr>{head}</tr>{''.join(trs)}</table>"


def stage_table(out, stages, progress, records, live=True):
    """Each stage's status in the run that progress.json records, its last logged wall time, and
    what it reads and writes (entries not in out greyed)."""
    wall = {r["stage"]: r["wall_s"] for r in records if "wall_s" in r and "stage" in r}
    ran, done, current = progress.get("stages", []), progress.get("done", []), progress.get("current")
    entry = lambda e: esc(e) if os.path.exists(os.path.join(out, e)) else f'<span class="missing">{esc(e)}</span>'
    trs = []
    for name, (reads, writes) in stages.items():
        status = "done" if name in done else ("running" if live else "stopped") if name == current \
            and not progress.get("finished") else "to run" if name in ran else "not run"
        trs.append(f"<tr><td>{name}</td><td class=\"{status.replace(' ', '-')}\">{status}</td>"
                   f"<td class=\"num\">{duration(wall.get(name))}</td>"
                   f"<td>{', '.join(map(entry, reads)) or '-'}</td><td>{', '.join(map(entry, writes))}</td></tr>")
    note = "" if progress else "<p>No progress.json here: no stage status.</p>"
    return (f"<h2>Stages</h2>{note}<table><tr><th>stage</th><th>status</th><th>wall time</th><th>reads</th>"
            f"<th>writes</th></tr>{''.join(trs)}</table>")


def loop_curves(records):
    """{loop: {metric: [(step, value)]}} from the records with a "step". A step at or below the last
    one seen (a resumed or repeated loop in the same file) replaces the points from there on."""
    loops = {}
    for r in records:
        if not isinstance(r.get("step"), (int, float)) or "stage" not in r:
            continue
        loop, step = str(r["stage"]), r["step"]
        for metric in METRICS:
            v = r.get(metric)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                pts = loops.setdefault(loop, {}).setdefault(metric, [])
                while pts and pts[-1][0] >= step:
                    pts.pop()
                pts.append((step, v))
    return loops


def thin(points, n=MAX_POINTS):
    """At most n of the points, evenly spread, the first and the last kept."""
    if len(points) <= n:
        return points
    return [points[round(i * (len(points) - 1) / (n - 1))] for i in range(n)]


def nice_range(lo, hi, n=4, extend=True):
    """(lo', hi', ticks): about n round tick values over [lo, hi], which extend widens to the
    ticks around it."""
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1e-300):
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    if extend:
        first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
        lo, hi = first * step, last * step
    return lo, hi, [round(i * step, 12) for i in range(first, last + 1)]


def y_axis(ys):
    """(transform, lo, hi, [(tick, label)]) of a chart's y axis: log10 for positive values that span
    more than LOG_RATIO (an SFT loss falls 100x in its first steps; the slow part after is what one
    reads), else linear."""
    if min(ys) > 0 and max(ys) > LOG_RATIO * min(ys):
        lo, hi = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
        return math.log10, lo, hi, [(k, fmt(10.0 ** k)) for k in range(lo, hi + 1)]
    lo, hi, ticks = nice_range(min(ys), max(ys), n=5)
    return float, lo, hi, [(t, fmt(t)) for t in ticks]


def chart(loop, metric, points):
    """One curve as an inline SVG with its axes: id "curve-<loop>-<metric>"."""
    points = thin([(s, v) for s, v in points if math.isfinite(v)])
    ident, title = esc(f"curve-{loop}-{metric}"), esc(f"{loop}: {metric}")
    head = (f'<svg class="curve" id="{ident}" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
            f'viewBox="0 0 {W} {H}" font-size="10" font-family="sans-serif"><title>{title}</title>')
    last = f" = {fmt(points[-1][1])} at step {points[-1][0]}" if points else ": no finite value"
    parts = [head, f'<text x="{LEFT}" y="14" font-size="12" font-weight="bold">{esc(metric)}'
                   f'<tspan font-weight="normal" fill="#666">{esc(last)}</tspan></text>']
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1, xt = nice_range(min(xs), max(xs), extend=False)
        f, y0, y1, yt = y_axis(ys)
        px = lambda x: LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT)
        py = lambda y: H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM)
        for t, label in yt:
            parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>'
                         f'<text x="{LEFT - 4}" y="{py(t) + 3:.1f}" text-anchor="end">{label}</text>')
        for t in xt:
            parts.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{H - BOTTOM}" y2="{H - BOTTOM + 4}" '
                         f'stroke="#888"/><text x="{px(t):.1f}" y="{H - BOTTOM + 14}" text-anchor="middle">'
                         f'{fmt(t)}</text>')
        parts.append(f'<path d="M{LEFT} {TOP}V{H - BOTTOM}H{W - RIGHT}" fill="none" stroke="#888"/>'
                     f'<text x="{W - RIGHT}" y="{H - 3}" text-anchor="end" fill="#666">step</text>')
        color = COLORS.get(metric, "#555")
        if len(points) == 1:
            parts.append(f'<circle cx="{px(xs[0]):.1f}" cy="{py(f(ys[0])):.1f}" r="3" fill="{color}"/>')
        else:
            xy = " ".join(f"{px(x):.1f},{py(f(y)):.1f}" for x, y in points)
            parts.append(f'<polyline points="{xy}" fill="none" stroke="{color}" stroke-width="1.5"/>')
    return "".join(parts) + "</svg>"


def curves(records, stages):
    """A chart per (loop, metric), grouped per loop; a loop named after an output (rl_round1) is
    headed with the stage that writes it."""
    loops = loop_curves(records)
    if not loops:
        return "<h2>Learning curves</h2><p>No training loop has logged yet (metrics.jsonl).</p>"
    writer = {w: name for name, (_, writes) in stages.items() for w in writes}
    parts = ["<h2>Learning curves</h2>"]
    for loop, metrics in loops.items():
        stage = f" (stage {esc(writer[loop])})" if loop not in stages and loop in writer else ""
        parts.append(f'<h3 id="loop-{esc(loop)}">{esc(loop)}{stage}</h3><div class="charts">'
                     + "".join(chart(loop, m, metrics[m]) for m in METRICS if m in metrics) + "</div>")
    return "\n".join(parts)


def highlight(text):
    """Model text as HTML: escaped, each COAT token in a coloured span of its own class."""
    s = esc(text)
    for t in COAT_TOKENS:
        name = t.strip("<|>")
        s = s.replace(esc(t), f'<span class="coat coat-{name}">{esc(t)}</span>')
    return s


def responses(rows):
    """The first RESPONSES responses of each evaluated model (the same questions for every model)."""
    if not rows:
        return "<h2>Responses</h2><p>No responses yet (the eval stage writes responses.jsonl).</p>"
    by_model = {}
    for r in rows:
        by_model.setdefault(str(r.get("model", "?")), []).append(r)
    legend = " ".join(highlight(t) for t in COAT_TOKENS)
    parts = [f"<h2>Responses</h2><p>Greedy answers to the first {RESPONSES} test problems; COAT tokens: {legend}</p>"]
    for model, rs in by_model.items():
        right = sum(bool(r.get("correct")) for r in rs)
        parts.append(f'<h3 id="responses-{esc(model)}">{esc(model)}: {right}/{len(rs)} right</h3><div class="resps">')
        for r in rs[:RESPONSES]:
            ok = bool(r.get("correct"))
            parts.append(f'<div class="resp"><div class="q">{esc(str(r.get("question", "")))}</div>'
                         f'<pre>{highlight(str(r.get("response", "")))}</pre>'
                         f'<div>reference {esc(str(r.get("answer")))}, predicted {esc(str(r.get("pred")))}: '
                         f'<span class="{"right" if ok else "wrong"}">{"right" if ok else "wrong"}</span></div></div>')
        parts.append("</div>")
    return "\n".join(parts)
