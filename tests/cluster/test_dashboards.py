"""The dashboards are code: deploy/grafana/*.json is exactly cluster/dashboards.py's output, and
the PD-first dashboard has what users tune pools with (tests/e2e/test_observability.py runs
every query against a real Prometheus)."""

import json

from cluster import dashboards


def test_the_json_in_deploy_is_the_generated_output():
    files = sorted(p.name for p in dashboards.OUT_DIR.glob("*.json"))
    assert files == sorted(dashboards.DASHBOARDS), "regenerate: python -m cluster.dashboards"
    for name, builder in dashboards.DASHBOARDS.items():
        on_disk = (dashboards.OUT_DIR / name).read_text()
        assert on_disk == dashboards.render(builder), (
            f"deploy/grafana/{name} is stale: python -m cluster.dashboards"
        )


def test_the_pd_dashboard_answers_the_tuning_questions():
    board = json.loads((dashboards.OUT_DIR / "tidal-pd.json").read_text())
    titles = [p["title"] for p in board["panels"]]
    assert titles[0] == "Add prefill or add decode?" and board["panels"][0]["type"] == "row"
    assert titles[1] == "Add prefill or add decode?" and board["panels"][1]["type"] == "stat"
    for needed in (
        "Where TTFT goes (mean per request, stacked)",
        "Utilisation by pool",
        "Prefill share: planner vs actual",
        "KV pages used per instance",
        "KV transfer GB/s per instance",
        "Prefix-cache hit rate",
        "Admission rejects by reason",
    ):
        assert needed in titles, needed
    names = [a["name"] for a in board["annotations"]["list"]]
    assert names == ["Pool changes", "EPLB rebalances"]
    queries = dashboards.panel_queries(board)
    assert all(p["targets"] for p in board["panels"] if p["type"] != "row")
    for _, expr in queries:  # labels that survive scraping; states that exist
        assert "instance)" not in expr.replace("tidal_instance", ""), expr
        assert 'state="ready"' not in expr, expr
    stacked = next(p for p in board["panels"] if p["title"].startswith("Where TTFT"))
    assert stacked["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
