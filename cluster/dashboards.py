"""tidal's Grafana dashboards as code (grafana-foundation-sdk); ``deploy/grafana/*.json`` is
this module's output: ``python -m cluster.dashboards`` writes it, and a test checks that it is
up to date and (tests/e2e/test_observability.py) that every query returns data from a real
Prometheus scraping a running tidal.

One dashboard, prefill/decode first. Its top row answers "add prefill or add decode?": the
planner's recommended prefill instances minus the serving ones (positive: move or add a prefill
instance; negative: decode), next to the reason, the busy fraction of each pool's step loops
and each pool's queue wait. Below: where TTFT goes (stacked parts), the recommended vs actual
ratio, KV pages and transfer GB/s per instance, prefix hits, admission rejects; pool changes and
EPLB rounds are annotations. Series names carry Ray's ``ray_`` prefix; labels follow
cluster/metrics.py (``tidal_instance``, ``role``, ``state``, ``part``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent.parent / "deploy" / "grafana"
RATE = "$__rate_interval"
DATASOURCE = "${datasource}"


def m(name: str) -> str:
    """A tidal series as Prometheus stores it (Ray's exporter prefixes ``ray_``)."""
    return f"ray_{name}"


def busy(role: str) -> str:
    """Mean busy fraction of one pool's step loops (busy seconds per second per serving rank)."""
    return (
        f'sum(rate({m("tidal_worker_busy_seconds_total")}{{role="{role}"}}[{RATE}])) '
        f'/ sum({m("tidal_ranks")}{{role="{role}"}})'
    )


def serving(role_re: str) -> str:
    return f'sum({m("tidal_instances")}{{role=~"{role_re}",state="serving"}})'


def part_quantile(q: float, parts: str) -> str:
    bucket = m("tidal_ttft_part_seconds_bucket")
    return f'histogram_quantile({q}, sum by (le, part) (rate({bucket}{{part=~"{parts}"}}[{RATE}])))'


def quantile(q: float, name: str) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({m(name)}_bucket[{RATE}])))"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class PanelSpec:
    """One panel: kind is ``timeseries`` or ``stat``."""

    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""
    is_stacked: bool = False
    width: int = 12
    height: int = 8
    mappings: tuple[tuple[float | None, float | None, str, str], ...] = ()  # from, to, text, color


ADD_WHICH = PanelSpec(
    "Add prefill or add decode?",
    (
        Query(
            f'sum({m("tidal_planner_recommended_instances")}{{role="prefill"}}) - '
            + serving("prefill"),
            "prefill instances wanted",
        ),
    ),
    kind="stat",
    width=6,
    height=5,
    description="The planner's recommended prefill instances minus the serving ones: positive "
    "means prefill is the bottleneck (move a decode instance to prefill, or add a prefill "
    "one), negative means decode is; 0 means the split is right. Read it with the reason and "
    "the utilisation next to it.",
    mappings=(
        (0.5, None, "add prefill", "orange"),
        (None, -0.5, "add decode", "blue"),
        (-0.5, 0.5, "balanced", "green"),
    ),
)

ROWS: tuple[tuple[str, tuple[PanelSpec, ...]], ...] = (
    (
        "Add prefill or add decode?",
        (
            ADD_WHICH,
            PanelSpec(
                "Planner: why",
                (Query(f"max by (reason) ({m('tidal_planner_reason')}) == 1", "{{reason}}"),),
                kind="stat",
                width=6,
                height=5,
                description="What set the planner's split: prefill_bound, decode_bound, "
                "over_budget (the budget cannot meet both SLOs) or idle (no traffic yet).",
            ),
            PanelSpec(
                "Utilisation: prefill vs decode",
                (Query(busy("prefill"), "prefill"), Query(busy("decode"), "decode")),
                unit="percentunit",
                kind="stat",
                width=6,
                height=5,
                description="Busy fraction of the step loops, per pool (measured by the workers); "
                "for one rate window after a move the moved instance's busy time still counts in "
                "its old pool.",
            ),
            PanelSpec(
                "Queue wait p90 by pool",
                (
                    Query(
                        part_quantile(0.9, "scheduler_queue|prefill_queue|decode_admission"),
                        "{{part}}",
                    ),
                ),
                unit="s",
                kind="stat",
                width=6,
                height=5,
            ),
        ),
    ),
    (
        "Time to first token",
        (
            PanelSpec(
                "Where TTFT goes (mean per request, stacked)",
                (
                    Query(
                        f"sum by (part) (rate({m('tidal_ttft_part_seconds_sum')}[{RATE}])) / "
                        f"sum by (part) (rate({m('tidal_ttft_part_seconds_count')}[{RATE}]))",
                        "{{part}}",
                    ),
                ),
                unit="s",
                is_stacked=True,
                description="scheduler queue, prefill queue, prefill compute, transfer tail "
                "(last chunk computed to the decode side holding the verified KV) and decode "
                "admission; they add up to the TTFT.",
            ),
            PanelSpec(
                "TTFT and inter-token latency",
                (
                    Query(quantile(0.5, "tidal_ttft_seconds"), "TTFT p50"),
                    Query(quantile(0.99, "tidal_ttft_seconds"), "TTFT p99"),
                    Query(quantile(0.5, "tidal_itl_seconds"), "ITL p50"),
                    Query(quantile(0.99, "tidal_itl_seconds"), "ITL p99"),
                ),
                unit="s",
            ),
        ),
    ),
    (
        "Prefill vs decode",
        (
            PanelSpec(
                "Utilisation by pool",
                (Query(busy("prefill"), "prefill"), Query(busy("decode"), "decode")),
                unit="percentunit",
            ),
            PanelSpec(
                "Prefill share: planner vs actual",
                (
                    Query(m("tidal_planner_prefill_fraction"), "recommended"),
                    Query(f"{serving('prefill')} / {serving('prefill|decode')}", "actual"),
                ),
                unit="percentunit",
            ),
            PanelSpec(
                "Instances: recommended vs serving",
                (
                    Query(
                        f"sum by (role) ({m('tidal_planner_recommended_instances')})",
                        "recommended {{role}}",
                    ),
                    Query(
                        f'sum by (role) ({m("tidal_instances")}{{state="serving"}})',
                        "serving {{role}}",
                    ),
                ),
            ),
            PanelSpec(
                "Planner rounds by action",
                (
                    Query(
                        f"sum by (action) (increase({m('tidal_planner_actions_total')}[5m]))",
                        "{{action}}",
                    ),
                ),
                description="move, hold, cooldown, confirming, warming, manual (per 5 min).",
            ),
        ),
    ),
    (
        "KV cache and transfer",
        (
            PanelSpec(
                "KV pages used per instance",
                (
                    Query(
                        f"sum by (tidal_instance, role) ({m('tidal_kv_pages_used')})",
                        "{{tidal_instance}} {{role}}",
                    ),
                ),
            ),
            PanelSpec(
                "KV transfer GB/s per instance",
                (
                    Query(
                        f"sum by (tidal_instance) "
                        f"(rate({m('tidal_kv_transfer_bytes_total')}[{RATE}])) / 1e9",
                        "{{tidal_instance}}",
                    ),
                ),
                unit="GBs",
                description="Bytes the receivers verified, measured on the wire by the sender.",
            ),
            PanelSpec(
                "KV transfer speed while sending (GB/s)",
                (
                    Query(
                        f"sum by (tidal_instance) "
                        f"(increase({m('tidal_kv_transfer_bytes_total')}[5m])) / sum by "
                        f"(tidal_instance) (increase({m('tidal_kv_transfer_seconds_total')}[5m]))"
                        " / 1e9",
                        "{{tidal_instance}}",
                    ),
                ),
                unit="GBs",
                description="Bytes per second of transfer time (open to verified close).",
            ),
            PanelSpec(
                "Transfer tail p50 / p99",
                (
                    Query(part_quantile(0.5, "transfer_tail"), "p50"),
                    Query(part_quantile(0.99, "transfer_tail"), "p99"),
                ),
                unit="s",
            ),
        ),
    ),
    (
        "Cache, admission and traffic",
        (
            PanelSpec(
                "Prefix-cache hit rate",
                (
                    Query(m("tidal_prefix_hit_rate"), "expected (scheduler)"),
                    Query(
                        f"sum(rate({m('tidal_prefix_hit_tokens_total')}[{RATE}])) / "
                        f"sum(rate({m('tidal_prompt_tokens_total')}[{RATE}]))",
                        "served",
                    ),
                ),
                unit="percentunit",
            ),
            PanelSpec(
                "Admission rejects by reason",
                (
                    Query(
                        f"sum by (reason) (increase({m('tidal_admission_rejects_total')}[5m]))",
                        "{{reason}}",
                    ),
                ),
                description="Requests refused per 5 min (400 too long, 429 overloaded, 503).",
            ),
            PanelSpec(
                "Tokens per second",
                (
                    Query(f"sum(rate({m('tidal_generation_tokens_total')}[{RATE}]))", "generated"),
                    Query(f"sum(rate({m('tidal_prompt_tokens_total')}[{RATE}]))", "prompt"),
                ),
            ),
            PanelSpec(
                "Scheduler queue and active requests",
                (
                    Query(f"sum({m('tidal_scheduler_queue_len')})", "queued"),
                    Query(f"sum({m('tidal_scheduler_active_requests')})", "active"),
                ),
            ),
        ),
    ),
)

ANNOTATIONS = (
    (
        "Pool changes",
        f"sum by (kind, source) (increase({m('tidal_pool_changes_total')}[1m])) > 0",
        "orange",
    ),
    (
        "EPLB rebalances",
        f"sum by (outcome) (increase({m('tidal_eplb_rebalances_total')}[1m])) > 0",
        "purple",
    ),
)


def build_pd_dashboard():
    """The PD-first dashboard (a grafana-foundation-sdk ``Dashboard``)."""
    from grafana_foundation_sdk.builders import common as cb
    from grafana_foundation_sdk.builders import dashboard as db
    from grafana_foundation_sdk.builders import prometheus, stat, timeseries
    from grafana_foundation_sdk.models import common as cm
    from grafana_foundation_sdk.models import dashboard as dm

    ds = dm.DataSourceRef(type_val="prometheus", uid=DATASOURCE)
    board = (
        db.Dashboard("tidal: prefill / decode")
        .uid("tidal-pd")
        .tags(["tidal", "llm-serving"])
        .refresh("10s")
        .time("now-30m", "now")
        .timezone("browser")
        .with_variable(db.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
    )
    for name, expr, color in ANNOTATIONS:
        board = board.annotation(
            db.AnnotationQuery().name(name).datasource(ds).expr(expr).enable(True).icon_color(color)
        )
    for row_title, specs in ROWS:
        board = board.with_row(db.Row(row_title))
        for spec in specs:
            panel = stat.Panel() if spec.kind == "stat" else timeseries.Panel()
            panel = (
                panel.title(spec.title)
                .datasource(ds)
                .unit(spec.unit)
                .span(spec.width)
                .height(spec.height)
            )
            if spec.description:
                panel = panel.description(spec.description)
            for i, q in enumerate(spec.queries):
                target = prometheus.Dataquery().expr(q.expr).ref_id(chr(ord("A") + i))
                if q.legend:
                    target = target.legend_format(q.legend)
                panel = panel.with_target(target)
            if spec.is_stacked:
                panel = panel.stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL))
                panel = panel.fill_opacity(40)
            if spec.mappings:
                panel = panel.mappings(
                    [
                        dm.RangeMap(
                            dm.DashboardRangeMapOptions(lo, hi, dm.ValueMappingResult(text, color))
                        )
                        for lo, hi, text, color in spec.mappings
                    ]
                )
            board = board.with_panel(panel)
    return board.build()


DASHBOARDS = {"tidal-pd.json": build_pd_dashboard}


def render(builder) -> str:
    from grafana_foundation_sdk.cog.encoder import JSONEncoder

    return json.dumps(builder(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def panel_queries(board: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel, rows included."""
    out = []
    for panel in board.get("panels", []):
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []) or []:
                if target.get("expr"):
                    out.append((inner.get("title", ""), target["expr"]))
    return out


def write(out_dir: Path = OUT_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, builder in DASHBOARDS.items():
        path = out_dir / name
        path.write_text(render(builder))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in write(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR):
        print(f"wrote {p}")
