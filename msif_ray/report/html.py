"""The report's HTML: self-contained pages (inline CSS, inline SVG plots, a few lines of inline JS).

Nothing here computes influence; ``msif_ray.report`` gathers the numbers into the dataclasses
below and these functions turn them into pages. Every piece of corpus or query text goes through
``html.escape``: a document that contains ``<script>`` shows as text.

Token highlights work on character offsets (the fast tokenizer's offset mapping), not on decoded
token strings, so byte-level BPE pieces of one character (``é`` = two byte tokens with the same
offsets) render as that character once, carrying the sum of their scores.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Sequence

PRO, CON = "#15803d", "#b91c1c"  # proponent (positive) and opponent (negative) colours


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def fmt(score: float) -> str:
    return f"{score:+.3g}"


# --------------------------------------------------------------------------- what a page shows


@dataclass
class ShownDocument:
    """One shown document of one query, with its breakdowns (``tokens`` credited to predicted tokens)."""

    rank: int
    doc_id: str
    score: float
    text: str
    offsets: list[tuple[int, int]]
    tokens: list[float]
    layers: list[float]
    starts: list[int] = field(default_factory=list)  # a packed training sequence: its source documents' first tokens
    segments: list[float] = field(default_factory=list)  # ... and their shares of the score (they add up to it)
    raw: float | None = None  # the raw score when ``score`` is normalised (scoring.normalize): the breakdowns split it


@dataclass
class QueryView:
    query_id: str
    prompt: str
    completion: str
    page: str  # file name under report/queries/
    proponents: list[ShownDocument]
    opponents: list[ShownDocument]
    top_rows: list[tuple[int, str, float]]  # every row of topk for this query: (rank, doc_id, score)
    bottom_rows: list[tuple[int, str, float]]
    distribution: list[float]  # the scores the histogram shows
    distribution_note: str


@dataclass
class RunView:
    """The index page's run summary."""

    run_dir: str
    config: dict
    stages: list[dict]  # ops.summary.stage_rows: {"name", "state", "seconds", "work": [lines], "reused"}
    layers: list[str]
    report_note: str
    generated: str
    queries: list[QueryView] = field(default_factory=list)
    left_out: list[dict] = field(default_factory=list)  # the manifest's quarantine: {doc_id, path, row, reason}


# --------------------------------------------------------------------------- token highlights


def token_spans(text: str, offsets: Sequence[Sequence[int]], scores: Sequence[float]) -> list[tuple[int, int, float | None]]:
    """Cut ``text`` into consecutive spans (start, end, score); text no token covers has score None.

    Tokens with an empty span (special tokens) are skipped. A token that starts before the end
    of the previous span (byte pieces of one character share its offsets) is merged into it and
    their scores are added. The spans cover the text exactly once, in order.
    """
    spans: list[list] = []
    cursor = 0
    for (start, end), score in zip(offsets, scores):
        if end <= start:
            continue
        if spans and start < spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
            spans[-1][2] += score
            continue
        if start > cursor:
            spans.append([cursor, start, None])
        spans.append([start, end, float(score)])
        cursor = end
    if cursor < len(text):
        spans.append([cursor, len(text), None])
    return [(s, e, v) for s, e, v in spans]


def highlight(text: str, offsets: Sequence[Sequence[int]], scores: Sequence[float]) -> str:
    """The text as HTML, each token's background shaded by its score relative to the largest |score|."""
    spans = token_spans(text, offsets, scores)
    scale = max((abs(v) for _, _, v in spans if v is not None), default=0.0) or 1.0
    parts = []
    for start, end, value in spans:
        piece = text[start:end]
        if value is None:
            parts.append(esc(piece))
            continue
        core = piece.lstrip()  # a byte-level BPE token often carries the space before its word: leave it unshaded
        lead = piece[: len(piece) - len(core)]
        alpha = min(abs(value) / scale, 1.0) * 0.75
        rgb = "34,197,94" if value > 0 else "239,68,68"
        parts.append(f'{esc(lead)}<span class="tok" style="background:rgba({rgb},{alpha:.2f})" '
                     f'title="{fmt(value)}">{esc(core)}</span>' if core else esc(piece))
    return "".join(parts)


def top_tokens(text: str, offsets: Sequence[Sequence[int]], scores: Sequence[float], sign: float, n: int = 6) -> str:
    """Chips of the ``n`` tokens contributing most in the direction ``sign`` (+1 pushes the query up)."""
    spans = [(s, e, v) for s, e, v in token_spans(text, offsets, scores) if v is not None and v * sign > 0]
    spans.sort(key=lambda span: -abs(span[2]))
    chips = [f'<span class="chip {"pos" if v > 0 else "neg"}">{esc(text[s:e].strip() or text[s:e])}'
             f' <small>{fmt(v)}</small></span>' for s, e, v in spans[:n]]
    return " ".join(chips) or '<span class="muted">none</span>'


# --------------------------------------------------------------------------- plots (inline SVG)


def layer_plot(values: Sequence[float], names: Sequence[str], width: int = 300, height: int = 96) -> str:
    """Bars of the per-layer split of one score (model order) from a zero line: positive up, negative down."""
    top, bottom = 6, 18
    plot_h = height - top - bottom
    lo, hi = min(0.0, *values) if values else 0.0, max(0.0, *values) if values else 0.0
    span = (hi - lo) or 1.0
    y_of = lambda v: top + (hi - v) / span * plot_h  # noqa: E731
    zero = y_of(0.0)
    step = width / max(len(values), 1)
    bars = []
    for i, (value, name) in enumerate(zip(values, names)):
        y0, y1 = sorted((zero, y_of(value)))
        bars.append(f'<rect x="{i * step + step * 0.1:.1f}" y="{y0:.1f}" width="{max(step * 0.8, 1):.1f}" '
                    f'height="{max(y1 - y0, 0.5):.1f}" fill="{PRO if value > 0 else CON}">'
                    f'<title>{esc(name)}: {fmt(value)}</title></rect>')
    first, last = (short_name(names[0]), short_name(names[-1])) if names else ("", "")
    return (f'<svg class="plot" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="score per layer">'
            f'<line x1="0" x2="{width}" y1="{zero:.1f}" y2="{zero:.1f}" stroke="#9ca3af" stroke-width="0.75"/>{"".join(bars)}'
            f'<text x="0" y="{height - 4}" class="axis">{esc(first)}</text>'
            f'<text x="{width}" y="{height - 4}" class="axis" text-anchor="end">{esc(last)}</text></svg>')


def histogram(scores: Sequence[float], marks: Sequence[float] = (), bins: int = 40, width: int = 520, height: int = 150) -> str:
    """Counts of ``scores`` in ``bins`` equal bins; ``marks`` (the shown documents) as ticks below."""
    if not scores:
        return '<p class="muted">no scores recorded</p>'
    lo, hi = min(scores), max(scores)
    if hi == lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    counts = [0] * bins
    for s in scores:
        counts[min(int((s - lo) / (hi - lo) * bins), bins - 1)] += 1
    left, top, bottom = 4, 14, 30
    plot_w, plot_h = width - 2 * left, height - top - bottom
    step, peak = plot_w / bins, max(counts)
    x_of = lambda v: left + (v - lo) / (hi - lo) * plot_w  # noqa: E731
    parts = []
    for i, count in enumerate(counts):
        if count:
            h = count / peak * plot_h
            centre = lo + (i + 0.5) * (hi - lo) / bins
            parts.append(f'<rect x="{left + i * step + 0.5:.1f}" y="{top + plot_h - h:.1f}" width="{max(step - 1, 1):.1f}" '
                         f'height="{h:.1f}" fill="{PRO if centre > 0 else CON}" opacity="0.8">'
                         f'<title>{count} documents around {fmt(centre)}</title></rect>')
    for value in marks:
        parts.append(f'<line x1="{x_of(value):.1f}" x2="{x_of(value):.1f}" y1="{top + plot_h + 2}" y2="{top + plot_h + 8}" '
                     f'stroke="#111827" stroke-width="1"/>')
    if lo < 0 < hi:
        parts.append(f'<line x1="{x_of(0):.1f}" x2="{x_of(0):.1f}" y1="{top - 4}" y2="{top + plot_h}" stroke="#6b7280" '
                     f'stroke-dasharray="3 2"/><text x="{x_of(0):.1f}" y="{top - 5}" class="axis" text-anchor="middle">0</text>')
    base = top + plot_h
    return (f'<svg class="plot" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="distribution of scores"><line x1="{left}" x2="{left + plot_w}" y1="{base}" y2="{base}" stroke="#9ca3af"/>'
            f'{"".join(parts)}<text x="{left}" y="{height - 4}" class="axis">{fmt(lo)}</text>'
            f'<text x="{left + plot_w}" y="{height - 4}" class="axis" text-anchor="end">{fmt(hi)}</text>'
            f'<text x="{left}" y="{top - 4}" class="axis">max {peak} per bin</text></svg>')


def short_name(name: str) -> str:
    """``gpt_neox.layers.3.mlp.dense_4h_to_h`` -> ``3.mlp.dense_4h_to_h``: the part after the block list."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i:])
    return name


# --------------------------------------------------------------------------- pages

CSS = """
:root { --pro: #15803d; --con: #b91c1c; --ink: #111827; --muted: #6b7280; --line: #e5e7eb; --bg: #f8fafc; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--ink); background: var(--bg); }
main { max-width: 1180px; margin: 0 auto; padding: 20px 28px 48px; }
h1 { font-size: 24px; margin: 4px 0 4px; } h2 { font-size: 18px; margin: 28px 0 10px; } h3 { font-size: 15px; margin: 0; }
a { color: #1d4ed8; text-decoration: none; } a:hover { text-decoration: underline; }
.muted { color: var(--muted); } small { color: var(--muted); }
.bar { display: flex; gap: 16px; align-items: baseline; flex-wrap: wrap; font-size: 14px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 14px 18px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 14px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 14px; margin: 0; font-size: 14px; }
dt { color: var(--muted); } dd { margin: 0; overflow-wrap: anywhere; }
table { border-collapse: collapse; width: 100%; font-size: 14px; background: #fff; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-weight: 600; color: var(--muted); font-size: 13px; background: #f1f5f9; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.pos { color: var(--pro); } .neg { color: var(--con); }
input[type=search] { width: 100%; max-width: 460px; padding: 8px 12px; font-size: 15px; border: 1px solid #cbd5e1; border-radius: 8px; }
.query { font-size: 17px; } .query .prompt { color: #374151; } .query .completion { font-weight: 650; background: #fef3c7; border-radius: 4px; padding: 0 2px; }
.doc { background: #fff; border: 1px solid var(--line); border-left: 4px solid var(--pro); border-radius: 8px; padding: 10px 14px; margin: 10px 0; }
.doc.opponent { border-left-color: var(--con); }
.doc header { display: flex; gap: 12px; align-items: baseline; margin-bottom: 6px; }
.doc .rank { font-weight: 700; color: var(--muted); } .doc .id { font-family: ui-monospace, monospace; font-size: 13px; }
.doc .score { margin-left: auto; font-weight: 700; font-variant-numeric: tabular-nums; }
.doc .body { display: grid; grid-template-columns: 1fr 300px; gap: 18px; align-items: start; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; max-height: 11.5em; overflow: auto; line-height: 1.65; }
.tok { border-radius: 3px; }
.chip { display: inline-block; border-radius: 999px; padding: 0 8px; margin: 2px 2px 0 0; font-size: 13px; background: #f1f5f9; white-space: pre; }
.chip.pos { background: #dcfce7; color: #14532d; } .chip.neg { background: #fee2e2; color: #7f1d1d; }
.tops { font-size: 13px; margin-top: 6px; color: var(--muted); }
.segments { font-size: 13px; margin-top: 6px; color: var(--muted); }
figure { margin: 0; } figcaption { font-size: 12px; color: var(--muted); }
svg.plot { max-width: 100%; height: auto; } svg .axis { font-size: 10px; fill: var(--muted); }
details summary { cursor: pointer; color: var(--muted); margin: 10px 0; }
.legend { font-size: 13px; color: var(--muted); }
.legend .sw { display: inline-block; width: 12px; height: 12px; border-radius: 3px; vertical-align: -2px; margin: 0 3px 0 8px; }
"""

SEARCH_JS = """
const box = document.getElementById('search');
const rows = Array.from(document.querySelectorAll('#queries tbody tr'));
const count = document.getElementById('count');
function filter() {
  const words = box.value.toLowerCase().split(/\\s+/).filter(Boolean);
  let shown = 0;
  for (const row of rows) {
    const hit = words.every(w => row.dataset.text.includes(w));
    row.hidden = !hit;
    if (hit) shown++;
  }
  count.textContent = shown + ' of ' + rows.length + ' queries';
}
box.addEventListener('input', filter);
filter();
"""


def page(title: str, body: str, script: str = "") -> str:
    scripts = f"<script>{script}</script>" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{esc(title)}</title><style>{CSS}</style></head>'
            f'<body><main>{body}</main>{scripts}</body></html>\n')


def index_page(run: RunView) -> str:
    cfg = run.config
    models, data, factors, scoring = cfg.get("models", {}), cfg.get("data", {}), cfg.get("factors", {}), cfg.get("scoring", {})
    modules = cfg.get("modules", {})

    def paths(section: dict) -> str:
        return "<br>".join(esc(p) for p in section.get("paths", [])) or '<span class="muted">not used</span>'

    settings = [
        ("method", esc(cfg.get("method", "?"))),
        ("pre-trained", esc(models.get("pretrained"))),
        ("fine-tuned", esc(models.get("finetuned") or "none")),
        ("tokenizer", esc(models.get("tokenizer") or "the query model's")),
        ("damping λ (pre-train)", esc(factors.get("damping_pretrain"))),
        ("damping α (fine-tune)", esc(factors.get("damping_finetune"))),
        ("Fisher", esc(factors.get("fisher"))),
        ("tracked layers", f"{len(run.layers)}: " + esc(", ".join(f"{k} {modules[k]!r}" for k in ("include", "exclude")
                                                               if modules.get(k)) or "every Linear in the blocks")),
    ]
    data_rows = [
        ("corpus", paths(data.get("corpus", {}))),
        ("fine-tuning data", paths(data.get("finetune", {}))),
        ("queries", paths(data.get("queries", {}))),
        ("max length", esc(data.get("max_length"))),
        ("scoring", esc(f"{scoring.get('mode', 'exact')}, top k {scoring.get('top_k')}")),
    ]
    stage_rows = "".join(
        f'<tr><td>{esc(s["name"])}</td><td>{esc(s["state"])}</td><td class="num">{esc(s["seconds"])}</td>'
        f'<td>{"<br>".join(esc(w) for w in s["work"])}</td><td>{esc(s["reused"])}</td></tr>' for s in run.stages)
    query_rows = "".join(_index_row(q) for q in run.queries)
    body = f"""
<h1>msif-ray report</h1>
<div class="bar muted"><span>run <code>{esc(run.run_dir)}</code></span><span>{esc(run.generated)}</span></div>
<h2>Run</h2>
<div class="grid">
  <div class="card"><dl>{"".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in settings)}</dl></div>
  <div class="card"><dl>{"".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in data_rows)}</dl></div>
</div>
<h2>Stages</h2>
<table><thead><tr><th>stage</th><th>state</th><th class="num">time</th><th>work (last run)</th><th>reused</th></tr></thead>
<tbody>{stage_rows}</tbody></table>
<p class="muted">{esc(run.report_note)}</p>
{_left_out(run.left_out)}
<h2>Queries</h2>
<div class="bar"><input id="search" type="search" placeholder="Search queries by id, prompt or completion" autocomplete="off">
<span id="count" class="muted">{len(run.queries)} queries</span></div>
<table id="queries"><thead><tr><th>query</th><th>prompt → completion</th><th>top proponent</th><th class="num">score</th></tr></thead>
<tbody>{query_rows}</tbody></table>
"""
    return page("msif-ray report", body, SEARCH_JS)


def _left_out(bad: list[dict]) -> str:
    """The documents the run left out (data.on_bad_document: skip), or nothing when there are none."""
    if not bad:
        return ""
    rows = "".join(f'<tr><td class="id">{esc(b["doc_id"] if b["doc_id"] is not None else "(unreadable)")}</td>'
                   f'<td>{esc(b["path"])}</td><td class="num">{b["row"]}</td><td>{esc(b["reason"])}</td></tr>' for b in bad)
    return (f'<h2 id="left-out">Left out: {len(bad)} bad document{"s" if len(bad) != 1 else ""}</h2>'
            '<p class="muted">Not in any sum or result of this run (data.on_bad_document: skip).</p>'
            f'<table><thead><tr><th>document</th><th>file</th><th class="num">row</th><th>reason</th></tr></thead>'
            f'<tbody>{rows}</tbody></table>')


def _index_row(q: QueryView) -> str:
    searchable = esc(f"{q.query_id} {q.prompt} {q.completion}".lower())
    top = q.top_rows[0] if q.top_rows else None
    top_cells = (f'<td class="id">{esc(top[1])}</td><td class="num pos">{fmt(top[2])}</td>' if top
                 else '<td class="muted">none</td><td></td>')
    return (f'<tr data-text="{searchable}"><td><a href="queries/{esc(q.page)}">{esc(q.query_id)}</a></td>'
            f'<td><span class="muted">{esc(q.prompt)}</span><b>{esc(q.completion)}</b></td>{top_cells}</tr>')


def query_page(q: QueryView, layers: list[str], previous: QueryView | None, following: QueryView | None,
               number: int, total: int) -> str:
    nav = ['<a href="../index.html">← all queries</a>']
    if previous:
        nav.append(f'<a href="{esc(previous.page)}">‹ {esc(previous.query_id)}</a>')
    if following:
        nav.append(f'<a href="{esc(following.page)}">{esc(following.query_id)} ›</a>')
    nav.append(f'<span class="muted">query {number} of {total}</span>')
    shown_scores = [d.score for d in q.proponents + q.opponents]
    body = f"""
<div class="bar">{" ".join(nav)}</div>
<section id="query" data-query-id="{esc(q.query_id)}">
<h1>Query {esc(q.query_id)}</h1>
<div class="card query"><span class="prompt">{esc(q.prompt)}</span>{_completion(q.completion)}</div>
<div class="grid" style="margin-top:14px">
  <figure class="card">{histogram(q.distribution, shown_scores)}<figcaption>{esc(q.distribution_note)}
  Ticks under the axis: the documents shown below.</figcaption></figure>
  <div class="card legend"><b>How to read this page.</b> A score is the change in the log-probability of the
  completion when the document is up-weighted in pre-training: positive (<span class="pos">proponent</span>) raises it,
  negative (<span class="neg">opponent</span>) lowers it. Tokens are shaded by their share of the document's score:
  <span class="sw" style="background:rgba(34,197,94,.6)"></span>raises
  <span class="sw" style="background:rgba(239,68,68,.6)"></span>lowers the query. A token's share is the term of the
  position that predicts it (s<sub>t</sub>ᵀ Ṽ a<sub>t</sub> at position t is credited to token t+1), so the shares
  sum to the score; hover a token for its value. The bars split each score over the {len(layers)} tracked layers, in model order.{_normalized_note(q)}</div>
</div>
<h2 class="pos">Top proponents <small>{len(q.proponents)} of {len(q.top_rows)} kept</small></h2>
{"".join(_document(d, layers, "proponent") for d in q.proponents) or '<p class="muted">none</p>'}
<h2 class="neg">Top opponents <small>{len(q.opponents)} of {len(q.bottom_rows)} kept</small></h2>
{"".join(_document(d, layers, "opponent") for d in q.opponents) or '<p class="muted">none</p>'}
<details><summary>Every kept row of this query (top and bottom k)</summary>
<div class="grid">{_rows_table("top k", q.top_rows)}{_rows_table("bottom k", q.bottom_rows)}</div></details>
</section>
"""
    return page(f"Query {q.query_id} — msif-ray report", body)


def _normalized_note(q: QueryView) -> str:
    if not any(d.raw is not None for d in q.proponents + q.opponents):
        return ""
    return (" <b>Normalised scores</b> (scoring.normalize): documents are ranked by the score divided by the square root "
            "of their self-influence (and, for <i>unit</i>, the query's norm); the raw score is shown beside it, and the "
            "token shades and layer bars split the raw score.")


def _completion(completion: str) -> str:
    """The completion, marked; its leading space (completions usually start with one) stays outside the mark."""
    core = completion.lstrip()
    return f'{esc(completion[: len(completion) - len(core)])}<span class="completion">{esc(core)}</span>'


def _raw(d: ShownDocument) -> str:
    """The raw score beside a normalised one (the tokens and layer bars split the raw score)."""
    return "" if d.raw is None else f'<span class="muted raw" title="before scoring.normalize">raw {fmt(d.raw)}</span>'


def _document(d: ShownDocument, layers: list[str], kind: str) -> str:
    sign = 1.0 if kind == "proponent" else -1.0
    return f"""<article class="doc {kind}" data-doc-id="{esc(d.doc_id)}">
<header><span class="rank">#{d.rank}</span><span class="id">{esc(d.doc_id)}</span>
<span class="score {"pos" if d.score > 0 else "neg"}">{fmt(d.score)}</span>{_raw(d)}</header>
<div class="body"><div><div class="text">{highlight(d.text, d.offsets, d.tokens)}</div>
<div class="tops">{"raise" if sign > 0 else "lower"} the query most: {top_tokens(d.text, d.offsets, d.tokens, sign)}</div></div>
<figure>{layer_plot(d.layers, layers)}<figcaption>{"raw " if d.raw is not None else ""}score per layer (Σ = {fmt(sum(d.layers))})</figcaption></figure></div>
{_segments(d)}</article>"""


def _segments(d: ShownDocument) -> str:
    """A packed training sequence's score split over the source documents inside it."""
    if not d.starts:
        return ""
    edges = d.starts + [len(d.tokens)]
    parts = " · ".join(f'tokens {lo}–{hi - 1}: <span class="{"pos" if s > 0 else "neg"}">{fmt(s)}</span>'
                       for lo, hi, s in zip(edges, edges[1:], d.segments))
    return f'<div class="segments">source documents in this training sequence: {parts}</div>\n'


def _rows_table(title: str, rows: list[tuple[int, str, float]]) -> str:
    body = "".join(f'<tr><td class="num">{rank}</td><td>{esc(doc)}</td><td class="num {"pos" if s > 0 else "neg"}">{fmt(s)}</td></tr>'
                   for rank, doc, s in rows)
    return f'<table><thead><tr><th class="num">{esc(title)}</th><th>document</th><th class="num">score</th></tr></thead><tbody>{body}</tbody></table>'
