from __future__ import annotations

from rich.console import Console

from onnxcomp import report
from onnxcomp.cost import ModelCost, NodeCost


def test_human_and_ratio():
    assert report.human(1234567) == "1.23 M"
    assert report.human(999) == "999"
    assert report.human(2.5e9, "B") == "2.5 GB"
    assert report.ratio(200, 100) == "2.00x"
    assert report.ratio(1, 0) == "-"


def test_markdown_table():
    text = report.markdown_table(["a", "b"], [[1, 2], ["x", "y"]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |", "| x | y |"]


def test_layer_table_renders_totals():
    nodes = (NodeCost("conv", "Conv", 100, 1000, 400, (1, 4, 5, 5)),
             NodeCost("relu", "Relu", 0, 0, 0, (1, 4, 5, 5)))
    cost = ModelCost(nodes, 100, 1000, 400)
    console = Console(width=120, record=True)
    console.print(report.layer_table(cost, "m"))
    text = console.export_text()
    assert "conv" in text and "relu" not in text and "total" in text


def test_realized_is_speedup_over_mac_cut():
    before, after = ModelCost((), 10, 4000, 40), ModelCost((), 5, 1000, 20)
    assert report.realized({"speedup": 3.0}, before, after) == 0.75
    assert report.realized(None, before, after) is None  # not timed
    assert report.realized({"speedup": 1.4}, before, before) is None  # no MAC cut to realize


def _latency(median, p10, p90):
    return {"speedup": median, "speedup_p10": p10, "speedup_p90": p90, "runs": 60}


def test_speed_verdict_says_how_sure_the_figure_is():
    text, noisy = report.speed_verdict(_latency(2.1, 2.05, 2.15), 2.0)
    assert not noisy and "met beyond noise" in text
    text, noisy = report.speed_verdict(_latency(2.1, 1.6, 2.6), 2.0)
    assert noisy and "noisy" in text and "met by the median, not beyond noise" in text
    text, _ = report.speed_verdict(_latency(1.9, 1.5, 2.3), 2.0)
    assert "not met (within noise" in text
    text, _ = report.speed_verdict(_latency(1.5, 1.45, 1.55), 2.0)
    assert text.endswith("not met")
    text, noisy = report.speed_verdict(_latency(1.5, 1.45, 1.55), None)
    assert "target" not in text and not noisy
