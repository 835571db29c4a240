"""``msif report``: the breakdowns add up to the scores, text is escaped, and the pages render in Chromium.

The run is the small pipeline world (tests/world.py) plus two documents that test the pages: one
holding markup (``<script>`` must show as text) and one of non-ASCII text, whose characters the
byte-level BPE splits into several tokens with the same character offsets.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from browser import check_report_pages, chromium, screenshot
from msif_ray.cli import main
from msif_ray.config import config_from_dict
from msif_ray.engine.scoring import credit_predicted_tokens
from msif_ray.store.layout import TOPK
from msif_ray.pipeline.run import Pipeline
from msif_ray.report.build import _distribution, build_report
from msif_ray.report.html import QueryView, RunView, ShownDocument, highlight, index_page, query_page, token_spans
from msif_ray.store.storage import RunDir
from msif_ray.store.layout import BREAKDOWNS, REPORT_INDEX, REPORT_STATS
from tiny import make_tokenizer
from world import corpus_documents

SCRIPT_TEXT = 'Mira Tolsen said <script>window.__pwned = 1</script> & <b>loudly</b> "Elsk".'
UNICODE_TEXT = "Zoë Brûlé was born in Ålesund — 東京 too 🙂, naïvely."
QUERY_IDS = ["q0", "q1"]


# --------------------------------------------------------------------------- no Ray, no browser


def test_spans_merge_byte_pieces_of_one_character():
    """Byte-level BPE splits 'ë', '東' and '🙂' into byte tokens sharing one character span: the span
    appears once, carrying the sum of their scores, and the spans rebuild the text exactly."""
    tokenizer = make_tokenizer()
    encoding = tokenizer(UNICODE_TEXT, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    assert len(offsets) > len(set(map(tuple, offsets))), "no character was split into byte tokens; the test is void"
    scores = [float(i + 1) for i in range(len(offsets))]
    spans = token_spans(UNICODE_TEXT, offsets, scores)
    assert "".join(UNICODE_TEXT[s:e] for s, e, _ in spans) == UNICODE_TEXT
    assert sum(v for _, _, v in spans if v is not None) == pytest.approx(sum(scores))
    for char in "ë東🙂":
        at = UNICODE_TEXT.index(char)
        covering = [score for (s, e), score in zip(offsets, scores) if s <= at < e]
        [span] = [(s, e, v) for s, e, v in spans if s <= at < e]
        assert span[2] == pytest.approx(sum(covering)) and len(covering) >= 2


def test_highlight_escapes_markup():
    tokenizer = make_tokenizer()
    offsets = tokenizer(SCRIPT_TEXT, return_offsets_mapping=True)["offset_mapping"]
    rendered = highlight(SCRIPT_TEXT, offsets, [1.0] * len(offsets))
    assert "<script" not in rendered and "<b>" not in rendered
    assert html.unescape(re.sub(r"<[^>]*>", "", rendered)) == SCRIPT_TEXT  # our spans removed: the text, as text


def test_pages_escape_query_and_document_text():
    markup = '<img src=x onerror="alert(1)">'
    doc = ShownDocument(1, f"id {markup}", 2.0, markup, [(0, 4), (4, len(markup))], [0.0, 2.0], [1.5, 0.5])
    view = QueryView(f"q {markup}", markup, f" {markup}", "q.html", [doc], [], [(1, doc.doc_id, 2.0)], [], [2.0], markup)
    run = RunView(markup, {"models": {"pretrained": markup}, "data": {"corpus": {"paths": [markup]}}},
                  [{"name": markup, "state": "done", "seconds": "", "work": [markup], "reused": markup}], ["l0", "l1"],
                  markup, markup, [view])
    for rendered in (index_page(run), query_page(view, ["l0", "l1"], None, None, 1, 1)):
        assert "<img" not in rendered and "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in rendered


def test_credit_goes_to_the_predicted_token():
    per_position = torch.tensor([[1.0], [2.0], [3.0], [0.0]])
    assert credit_predicted_tokens(per_position).squeeze(1).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_distribution_says_which_scores_it_shows():
    top = [(1, "a", 3.0), (2, "b", 1.0)]
    bottom = [(1, "c", -2.0), (2, "b", 1.0)]
    scores, note = _distribution(top, bottom, num_documents=10, top_k=2)
    assert sorted(scores) == [-2.0, 1.0, 3.0] and "only the top and bottom k" in note.lower()
    scores, note = _distribution(top, bottom, num_documents=2, top_k=5)
    assert scores == [3.0, 1.0] and "all 2 scored documents" in note


def test_report_of_a_directory_without_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


# --------------------------------------------------------------------------- a run and its report


@pytest.fixture(scope="module")
def report_run(world, ray_session, tmp_path_factory):
    """A run that keeps every pair (top_k above the corpus size) and its report, built by ``msif report``.

    grad_dot keeps the run short: the report pass takes Ṽ as the run stored it, whatever the method.
    """
    root = tmp_path_factory.mktemp("report")
    corpus = root / "corpus.parquet"
    docs = corpus_documents() + [{"id": "markup", "text": SCRIPT_TEXT}, {"id": "unicode", "text": UNICODE_TEXT}]
    pq.write_table(pa.Table.from_pylist(docs), corpus)
    run_dir = root / "run"
    overrides = {"method": "grad_dot", "scoring.top_k": 100, "data.corpus.paths": [str(corpus)]}
    Pipeline(config_from_dict(world.config(run_dir, **overrides), base_dir=world.root), log=lambda line: None).run()
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert main(["report", str(run_dir), "--show", str(len(docs))]) == 0
    return run_dir, docs, output.getvalue()


def test_breakdowns_add_up_to_the_scores(report_run):
    """Per-token and per-layer shares of every shown (query, document) sum to the run's score.

    Tolerance: the run scores windows in batches (Σ_t s_t a_tᵀ first, then ⟨Ṽ, G⟩), the report one
    document and one position at a time, both in float32; terms of both signs cancel, so the
    error is bounded relative to Σ|terms| (1e-4), not to the score.
    """
    run_dir, docs, _ = report_run
    breakdowns = pq.read_table(run_dir / BREAKDOWNS).to_pylist()
    topk = pq.read_table(run_dir / TOPK).to_pylist()
    score = {(r["query_id"], r["doc_id"]): r["score"] for r in topk}
    assert {(r["query_id"], r["doc_id"]) for r in breakdowns if r["side"] == "top"} == set(score)
    layers = json.loads((run_dir / REPORT_STATS).read_text())["layers"]
    for row in breakdowns:
        expected = score[row["query_id"], row["doc_id"]]
        assert row["score"] == expected
        assert len(row["layer_scores"]) == len(layers)
        for parts in (row["token_scores"], row["layer_scores"]):
            assert sum(parts) == pytest.approx(expected, abs=1e-4 * sum(map(abs, parts)) + 1e-9)
        assert row["token_scores"][0] == 0.0  # the first token is context only: nothing predicts it
        assert len(row["token_offsets"]) == len(row["token_scores"])
    longest = max(len(row["token_scores"]) for row in breakdowns)
    assert longest > 32, "no shown document spans several windows (max_length 32); the window path is untested"


def test_normalized_report_shows_both_scores(world, ray_session, tmp_path):
    """With ``scoring.normalize: unit`` the report ranks by the normalised score, shows the raw one
    beside it, and its breakdowns split the raw score (which ``raw_score`` records)."""
    run_dir = tmp_path / "run"
    overrides = {"method": "grad_dot", "scoring.top_k": 3, "scoring.normalize": "unit"}
    Pipeline(config_from_dict(world.config(run_dir, **overrides), base_dir=world.root), log=lambda line: None).run()
    assert main(["report", str(run_dir), "--show", "2"]) == 0
    topk = {(r["query_id"], r["doc_id"]): r for r in pq.read_table(run_dir / TOPK).to_pylist()}
    for row in pq.read_table(run_dir / BREAKDOWNS).to_pylist():
        result = topk.get((row["query_id"], row["doc_id"]))
        if result is None:
            continue  # an opponent
        assert (row["score"], row["raw_score"]) == (result["score"], result["raw_score"])
        assert abs(row["score"]) <= 1 + 1e-6  # a cosine
        assert sum(row["layer_scores"]) == pytest.approx(row["raw_score"], abs=1e-4 * sum(map(abs, row["layer_scores"])) + 1e-9)
    page = next((run_dir / "report" / "queries").iterdir()).read_text()
    assert "Normalised scores" in page and 'class="muted raw"' in page


def test_cli_summary_names_the_report(report_run):
    run_dir, _, stdout = report_run
    assert "msif report: finished in" in stdout
    assert f"report   {run_dir / REPORT_INDEX}" in stdout and "result   " in stdout
    assert "scores: shards 4 computed / 0 reused" in stdout  # the report runs no stage: the run's own work


@pytest.fixture(scope="module")
def browser():
    if chromium() is None:
        pytest.skip("chromium is not installed (CI installs Debian's chromium in .ci/run)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        yield instance
        instance.close()


def test_every_query_page_renders(report_run, browser, tmp_path):
    run_dir, docs, _ = report_run
    report = run_dir / "report"
    doms = check_report_pages(report, QUERY_IDS)
    for dom in doms.values():
        assert dom.count('class="doc proponent"') == len(docs) and dom.count('class="doc opponent"') == len(docs)
    screenshot(report / "queries" / "q0.html", tmp_path / "q0.png")
    assert (tmp_path / "q0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_query_page_fails_the_check(report_run, tmp_path):
    if chromium() is None:
        pytest.skip("chromium is not installed (CI installs Debian's chromium in .ci/run)")
    copy = tmp_path / "report"
    shutil.copytree(report_run[0] / "report", copy)
    (copy / "queries" / "q1.html").unlink()
    with pytest.raises(AssertionError, match="q1.html is missing"):
        check_report_pages(copy, QUERY_IDS)


def test_pages_run_without_console_errors_and_show_text_as_text(report_run, browser, tmp_path):
    run_dir, _, _ = report_run
    report = run_dir / "report"
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: errors.append(f"network: {request.url}")
            if not request.url.startswith(("file:", "data:")) else None)

    page.goto((report / "index.html").as_uri())
    assert page.inner_text("#count") == "2 of 2 queries"
    page.fill("#search", "ravi ode")  # q1's prompt
    assert page.inner_text("#count") == "1 of 2 queries"
    assert [row.inner_text().split("\t")[0] for row in page.query_selector_all("#queries tbody tr:not([hidden])")] == ["q1"]

    for query_id in QUERY_IDS:
        page.goto((report / "queries" / f"{query_id}.html").as_uri())
        assert page.evaluate("typeof window.__pwned") == "undefined"
        shown = page.locator('.doc.proponent[data-doc-id="markup"] .text').inner_text()
        assert shown == SCRIPT_TEXT
        assert page.locator('.doc.proponent[data-doc-id="unicode"] .text').inner_text() == UNICODE_TEXT
    page.screenshot(path=str(tmp_path / "q1.png"), full_page=False)
    assert errors == []


def test_report_of_a_run_directory_on_s3(report_run, s3_bucket):
    """The same run directory copied to (moto) S3: the report is written there, with the same numbers."""
    import s3fs

    run_dir, _, _ = report_run
    fs = s3fs.S3FileSystem()
    for path in run_dir.rglob("*"):
        if path.is_file() and not path.relative_to(run_dir).parts[0] == "report":
            fs.put_file(str(path), f"{s3_bucket}/run/{path.relative_to(run_dir).as_posix()}")
    url = build_report(f"{s3_bucket}/run", show=3, log=lambda line: None)
    assert url == f"{s3_bucket}/run/report/index.html"
    store = RunDir(f"{s3_bucket}/run")
    assert sorted(store.list("report/queries")) == ["report/queries/q0.html", "report/queries/q1.html"]
    local = {(r["query_id"], r["side"], r["doc_id"]): r for r in pq.read_table(run_dir / BREAKDOWNS).to_pylist()}
    for row in store.read_parquet(BREAKDOWNS).to_pylist():
        assert row["rank"] <= 3
        assert row["token_scores"] == pytest.approx(local[row["query_id"], row["side"], row["doc_id"]]["token_scores"], rel=1e-9)
