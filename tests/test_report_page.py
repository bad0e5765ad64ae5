"""The review page's cards (serving/report_page.py) read back with the standard library's HTML parser: every value
as predictions.csv has it (small probabilities included), decisions, calibrated values, the OOD badge, errors and
names escaped. The page in a real browser: tests/test_predict.py (test_review_page_in_a_headless_browser)."""

from __future__ import annotations

import html.parser

import numpy as np
import pytest

from metachex_jax.contract.calibration import PlattScaling
from metachex_jax.contract.outputs import Output
from metachex_jax.serving import report_page
from metachex_jax.serving.predict import csv_rows
from metachex_jax.serving.predictor import FilePredictions


class Cards(html.parser.HTMLParser):
    """Each card's data attributes and the text of its value cells, badges and error."""

    def __init__(self):
        super().__init__()
        self.cards, self._in = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div" and "card" in attrs.get("class", "").split():
            self.cards.append({"attrs": attrs, "values": [], "text": []})
        elif self.cards and tag == "td" and attrs.get("class") == "v":
            self._in = "values"

    def handle_endtag(self, tag):
        self._in = None if tag == "td" else self._in

    def handle_data(self, data):
        if self.cards:
            self.cards[-1][self._in or "text"].append(data)


def test_cards_show_every_value_decision_flag_and_error(tmp_path):
    platt = PlattScaling(0.5, -0.3)
    outputs = [Output("tb", "probability", threshold=0.3, calibration=platt), Output("age", "years")]
    values = np.array([[4.7246223e-05, 61.25], [0.9, 33.0], [np.nan, np.nan]])
    result = FilePredictions(["a/x<1>.png", "a/y.png", "a/bad.png"], outputs, values, None, [None] * 3,
                             [None, None, "a/bad.png: read failed (empty file)"], 0.1,
                             ood_distance=np.array([12.5, 80.25, np.nan]), ood_threshold=50.0, calibrated=True)
    rows = csv_rows(result, {})
    summary = {"predicted": 2, "images": 3, "failed": 1, "model": {"model": "m", "kind": "k"},
               "input_contract": {"description": "d"},
               "ood": {"columns": True, "threshold": 50.0, "expected_flag_rate": 0.01, "flagged": 1, "scored": 2}}
    page = (tmp_path / report_page.PAGE)
    assert report_page.write_page(str(tmp_path), result, rows, summary) == str(page)
    parser = Cards()
    parser.feed(page.read_text())
    first, second, failed = parser.cards
    assert [float(v) for v in first["values"]] == pytest.approx([4.7246223e-05, float(platt(4.7246223e-05)), 61.25],
                                                                 rel=1e-3)
    assert [float(v) for v in second["values"]] == pytest.approx([0.9, float(platt(0.9)), 33.0], rel=1e-3)
    assert failed["values"] == []
    assert (first["attrs"]["data-d0"], second["attrs"]["data-d0"]) == ("0", "1")  # the decisions, at 0.3
    assert (first["attrs"]["data-flag"], second["attrs"]["data-flag"], failed["attrs"]["data-flag"]) == (
        "0", "1", "failed")
    texts = ["".join(c["text"]) for c in parser.cards]
    assert "in distribution" in texts[0] and "out of distribution" in texts[1] and "x<1>.png" in texts[0]
    assert "read failed (empty file)" in texts[2] and "distribution" not in texts[2]
