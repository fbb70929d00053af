"""run_pipeline logs each pass's result at DEBUG on ``libra_fx.passes``: one record per pass, in pipeline
order, naming the pass and carrying its counts (the passes that do not apply to the method too)."""

import logging

from passkit import PASS_NAMES, make_ctx

from libra_fx.passes import run_pipeline

LOGGER = "libra_fx.passes"


def test_one_debug_record_per_pass(llava_graph, caplog):
    caplog.set_level(logging.DEBUG, logger="libra_fx")
    ctx = make_ctx(llava_graph, layers=(1, 2))
    results = run_pipeline(ctx)
    records = [r for r in caplog.records if r.name == LOGGER]
    assert [r.levelno for r in records] == [logging.DEBUG] * len(PASS_NAMES)
    messages = [r.getMessage() for r in records]
    assert [m.split(":", 1)[0] for m in messages] == list(PASS_NAMES) == [r.name for r in results]
    assert messages == [str(r) for r in results]
    by_pass = dict(zip(PASS_NAMES, messages))
    assert by_pass["insert_compression"].splitlines()[0] == "insert_compression: stages=2 compensation=2 inserted=11"
    assert by_pass["insert_vision_stage"].splitlines()[0] == "insert_vision_stage:"  # not applied: no counts


def test_nothing_logged_above_debug(llava_graph, caplog):
    caplog.set_level(logging.INFO, logger="libra_fx")
    run_pipeline(make_ctx(llava_graph, layers=(1,)))
    assert not [r for r in caplog.records if r.name == LOGGER]
