"""`qroute demo --engine core`: the engine-free data plane with an owner process; the copying model's answers
through route, fetch and auto equal one instance holding the corpus, and the report exits 0 (about 30 s)."""

import io

from qroute.ops.demo_core import default_corpus, run_core_demo


def test_core_demo_reproduces_the_single_instance():
    out = io.StringIO()
    assert run_core_demo(corpus=default_corpus(), transport="tcp", max_new=6, max_corpus_tokens=None, out=out) == 0
    text = out.getvalue()
    assert "routed, fetched and local attention reproduce the single instance" in text
    assert text.count("the corpus goes on") == 3
    for mode in ("route", "fetch", "auto"):
        assert any(line.startswith(mode) and " True " in line for line in text.splitlines())
