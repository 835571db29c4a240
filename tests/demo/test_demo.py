"""The demo end to end (on the small toy spec): attribution finds the gold documents."""

from msif_ray.demo.run import run_demo
from msif_ray.demo.toy import ToySpec


def test_demo_finds_gold_documents_and_reruns_from_cache(tmp_path, ray_session, capsys):
    mrr, recall = run_demo(tmp_path, num_workers=2, spec=ToySpec.small())
    out = capsys.readouterr().out
    assert "MRR" in out and "query q-000" in out
    # Chance level is about (gold documents per query) / (documents) ≈ 0.03 here.
    assert mrr > 0.3 and recall > 0.2
    assert (tmp_path / "run" / "report" / "index.html").exists()
    assert run_demo(tmp_path, num_workers=2, spec=ToySpec.small()) == (mrr, recall)
    rerun = capsys.readouterr().out
    assert "[scores] up to date, skipped" in rerun and "[report] up to date, skipped" in rerun
