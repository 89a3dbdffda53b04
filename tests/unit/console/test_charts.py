"""What the charts plot: the numbers of the read model and of the pipeline's minute samples, nothing invented."""

from __future__ import annotations

from services.console.charts import (
    PipelineSample,
    dead_letter_bars,
    latency_lines,
    quality_lines,
    rate_lines,
    recent_samples,
    score_lines,
    segment_heatmap,
    segment_sankey,
    uplift_forest,
)


def test_the_heatmap_has_a_cell_per_segment_and_stage_with_customers() -> None:
    chart = segment_heatmap({("champion", "active"): 5, ("at_risk", "lapsing"): 2, ("champion", "lapsing"): 1})
    assert (chart["rows"], chart["columns"], chart["max"]) == (["at_risk", "champion"], ["active", "lapsing"], 5)
    cells = {(chart["rows"][y], chart["columns"][x]): n for x, y, n in chart["cells"]}
    assert cells == {("champion", "active"): 5, ("at_risk", "lapsing"): 2, ("champion", "lapsing"): 1}
    assert segment_heatmap({})["cells"] == []


def test_the_sankey_keeps_both_sides_apart_so_a_change_back_is_no_cycle() -> None:
    chart = segment_sankey([("loyal|active", "at_risk|lapsing", 3), ("at_risk|lapsing", "loyal|active", 1),
                            ("", "loyal|active", 4)])
    assert chart["nodes"] == ["from loyal · active", "from at_risk · lapsing", "from new customer",
                              "to at_risk · lapsing", "to loyal · active"]
    assert all(link["source"].startswith("from ") and link["target"].startswith("to ") for link in chart["links"])
    assert sum(link["value"] for link in chart["links"]) == 8


def test_the_last_hour_has_one_point_a_minute_per_series() -> None:
    samples = [PipelineSample(m, {"ingest": 10.0 + m, "identity": None}, {"a touchpoint": {"0.5": 0.1, "0.95": 0.2,
                                                                                           "0.99": 0.3}},
                              {"roc_auc": 0.7, "log_loss": None}) for m in (1000, 1001, 900)]
    last_hour = recent_samples(samples, now_minute=1001)
    assert [s.minute for s in last_hour] == [1000, 1001]
    rates = rate_lines(last_hour, ["ingest", "identity"])
    assert rates["series"] == [{"name": "ingest", "points": [[60_000_000, 1010.0], [60_060_000, 1011.0]]}]
    latency = {s["name"]: s["points"] for s in latency_lines(last_hour, ["a touchpoint", "a score"])["series"]}
    assert latency == {"a touchpoint p50": [[60_000_000, 0.1], [60_060_000, 0.1]],
                       "a touchpoint p95": [[60_000_000, 0.2], [60_060_000, 0.2]],
                       "a touchpoint p99": [[60_000_000, 0.3], [60_060_000, 0.3]]}
    assert [s["name"] for s in quality_lines(last_hour)["series"]] == ["ROC AUC"]


def test_dead_letters_and_the_forest_plot_carry_the_counts_and_intervals_as_given() -> None:
    bars = dead_letter_bars([("identity", "no usable identifier", 7), ("ingest", "schema", 2)])
    assert [(b["label"], b["value"]) for b in bars["bars"]] == [("identity: no usable identifier", 7),
                                                                 ("ingest: schema", 2)]
    rows = [{"rule_id": "a", "outcome": {"enough_data": True, "treated_rate": 0.75, "holdout_rate": 0.25,
                                         "uplift": 0.5, "ci_low": 0.1, "ci_high": 0.9}},
            {"rule_id": "b", "outcome": {"enough_data": False, "treated_rate": None}}]
    forest = uplift_forest(rows)
    assert forest["rules"] == [{"rule": "a", "treated": 75.0, "holdout": 25.0, "uplift": 50.0, "low": 10.0,
                                "high": 90.0}]
    assert forest["waiting"] == ["b"]


def test_the_score_chart_orders_points_by_event_time_and_keeps_thresholds_and_actions() -> None:
    chart = score_lines([(300, 0.9, 0.1), (100, 0.2, 0.8)], [("churn-high (churn_risk 0.7)", 0.7)],
                        [(300, "fired", "churn-high"), (100, "held_out", "other")])
    assert chart["risk"] == [[100, 0.2], [300, 0.9]] and chart["propensity"] == [[100, 0.8], [300, 0.1]]
    assert chart["thresholds"] == [{"label": "churn-high (churn_risk 0.7)", "value": 0.7}]
    assert [a["outcome"] for a in chart["actions"]] == ["held_out", "fired"]
