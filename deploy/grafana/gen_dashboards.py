"""Writes the three provisioned Grafana dashboards in ``dashboards/``
(``python deploy/grafana/gen_dashboards.py``; a test checks the committed JSON is what
this writes, and evaluates every panel's PromQL against a real Prometheus).

(a) infrastructure: GPU utilisation, memory-bandwidth proxy, temperatures, power,
clocks, throttling, ECC/XID, NVLink, beside kvasir's step time (a bandwidth drop lines
up with a TPOT rise), and NVIDIA's DCGM exporter joined by GPU UUID;
(b) model performance: TTFT/TPOT/ITL/e2e percentiles, queue, KV usage, prefix hit rate,
preemptions by reason, batch sizes, spec-decode acceptance, throughput;
(c) business: requests and tokens per tenant and model, error rate, availability
against its SLO, cost per million tokens from a $/GPU-hour variable.

Every dashboard has a Prometheus datasource variable and model/instance selectors.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEL = 'model_name=~"$model", instance=~"$instance"'
RI = "$__rate_interval"


def _var_query(name: str, query: str, label: str, include_all: bool = True) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": name},
        "definition": query,
        "refresh": 2,
        "includeAll": include_all,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": "All", "value": "$__all"},
    }


def _templating(extra: list[dict] | None = None) -> dict:
    return {
        "list": [
            {
                "name": "datasource",
                "label": "Prometheus",
                "type": "datasource",
                "query": "prometheus",
                "current": {},
            },
            _var_query("model", "label_values(kvasir:num_requests_running, model_name)", "model"),
            _var_query(
                "instance",
                'label_values(kvasir:num_requests_running{model_name=~"$model"}, instance)',
                "instance",
            ),
            *(extra or []),
        ]
    }


class Board:
    def __init__(self, uid: str, title: str, tags: list[str]) -> None:
        self.uid, self.title, self.tags = uid, title, tags
        self.panels: list[dict] = []
        self.x = self.y = 0

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y = 0, self.y + 8
        self.panels.append(
            {
                "type": "row",
                "title": title,
                "id": len(self.panels) + 1,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def panel(
        self,
        title: str,
        targets: list[tuple[str, str]],
        unit: str = "short",
        kind: str = "timeseries",
        w: int = 8,
        key: bool = False,
        description: str = "",
    ) -> None:
        if self.x + w > 24:
            self.x, self.y = 0, self.y + 8
        self.panels.append(
            {
                "type": kind,
                "title": title,
                "description": description,
                "id": len(self.panels) + 1,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": 8, "w": w, "x": self.x, "y": self.y},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                "targets": [
                    {
                        "datasource": {"type": "prometheus", "uid": "${datasource}"},
                        "expr": expr,
                        "legendFormat": legend,
                        "refId": chr(ord("A") + i),
                    }
                    for i, (expr, legend) in enumerate(targets)
                ],
                # Checked non-empty under load by tests/observability/test_prometheus.py.
                "kvasir_key_panel": key,
            }
        )
        self.x += w

    def to_json(self, extra_vars: list[dict] | None = None) -> dict:
        return {
            "uid": self.uid,
            "title": self.title,
            "tags": ["kvasir", *self.tags],
            "schemaVersion": 39,
            "version": 1,
            "editable": True,
            "time": {"from": "now-1h", "to": "now"},
            "refresh": "10s",
            "timezone": "browser",
            "templating": _templating(extra_vars),
            "annotations": {"list": []},
            "panels": self.panels,
        }


def _pct(hist: str, by: str = "model_name") -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by ({by}, le) (rate(kvasir:{hist}_bucket{{{SEL}}}[{RI}])))",
            f"p{int(q * 100)} {{{{{by}}}}}",
        )
        for q in (0.5, 0.9, 0.99)
    ]


def infrastructure() -> dict:
    b = Board("kvasir-infra", "kvasir / infrastructure", ["gpu"])
    g = SEL
    b.row("GPU")
    b.panel(
        "SM utilisation",
        [(f"kvasir:gpu_utilization_ratio{{{g}}}", "GPU {{gpu}} {{instance}}")],
        "percentunit",
        key=True,
    )
    b.panel(
        "Memory bandwidth (memory-controller busy)",
        [(f"kvasir:gpu_memory_utilization_ratio{{{g}}}", "GPU {{gpu}} {{instance}}")],
        "percentunit",
        key=True,
        description="The share of time device memory was read or written: a bandwidth proxy.",
    )
    b.panel(
        "Engine step time p50 / p99 (line up with bandwidth)",
        [
            (
                f"histogram_quantile(0.5, sum by (instance, le) (rate(kvasir:engine_step_duration_seconds_bucket{{{g}}}[{RI}])))",
                "p50 {{instance}}",
            ),
            (
                f"histogram_quantile(0.99, sum by (instance, le) (rate(kvasir:engine_step_duration_seconds_bucket{{{g}}}[{RI}])))",
                "p99 {{instance}}",
            ),
        ],
        "s",
        key=True,
    )
    b.panel(
        "Memory used / total",
        [
            (f"kvasir:gpu_memory_used_bytes{{{g}}}", "used GPU {{gpu}}"),
            (f"kvasir:gpu_memory_total_bytes{{{g}}}", "total GPU {{gpu}}"),
        ],
        "bytes",
        key=True,
    )
    b.panel(
        "Temperature",
        [(f"kvasir:gpu_temperature_celsius{{{g}}}", "GPU {{gpu}} {{sensor}}")],
        "celsius",
        key=True,
    )
    b.panel(
        "Power draw and limit",
        [
            (f"kvasir:gpu_power_watts{{{g}}}", "draw GPU {{gpu}}"),
            (f"kvasir:gpu_power_limit_watts{{{g}}}", "limit GPU {{gpu}}"),
        ],
        "watt",
        key=True,
    )
    b.panel("Clocks", [(f"kvasir:gpu_clock_hz{{{g}}}", "GPU {{gpu}} {{clock}}")], "hertz", key=True)
    b.panel(
        "Throttle reasons (active)",
        [(f"kvasir:gpu_throttle_reason{{{g}}} > 0", "GPU {{gpu}} {{reason}}")],
        "short",
    )
    b.panel(
        "NVLink throughput",
        [(f"rate(kvasir:gpu_nvlink_bytes_total{{{g}}}[{RI}])", "GPU {{gpu}} {{direction}}")],
        "Bps",
        key=True,
    )
    b.row("Errors")
    b.panel(
        "ECC errors (volatile) per hour",
        [(f"increase(kvasir:gpu_ecc_errors_total{{{g}}}[1h])", "GPU {{gpu}} {{type}}")],
        "short",
    )
    b.panel(
        "XID events",
        [(f"increase(kvasir:gpu_xid_errors_total{{{g}}}[1h])", "GPU {{gpu}} XID {{xid}}")],
        "short",
    )
    b.panel(
        "Retired pages",
        [
            (f"kvasir:gpu_retired_pages{{{g}}}", "GPU {{gpu}} {{cause}}"),
            (f"kvasir:gpu_retired_pages_pending{{{g}}}", "pending GPU {{gpu}}"),
        ],
        "short",
        key=True,
    )
    b.row("DCGM exporter (joined by GPU UUID)")
    join = (
        f" * on (UUID) group_left (model_name, instance, gpu) label_replace(kvasir:gpu_info{{{g}}},"
        ' "UUID", "$1", "uuid", "(.*)")'
    )
    b.panel(
        "DCGM SM active",
        [(f"DCGM_FI_PROF_SM_ACTIVE{join}", "GPU {{gpu}} {{instance}}")],
        "percentunit",
        description="Empty unless NVIDIA's dcgm-exporter is scraped (deploy/prometheus).",
    )
    b.panel(
        "DCGM DRAM active",
        [(f"DCGM_FI_PROF_DRAM_ACTIVE{join}", "GPU {{gpu}} {{instance}}")],
        "percentunit",
    )
    b.panel(
        "DCGM XID (last)",
        [(f"DCGM_FI_DEV_XID_ERRORS{join}", "GPU {{gpu}} {{instance}}")],
        "short",
    )
    return b.to_json()


def performance() -> dict:
    b = Board("kvasir-perf", "kvasir / model performance", ["performance"])
    b.row("Latency")
    b.panel("TTFT", _pct("time_to_first_token_seconds"), "s", key=True)
    b.panel("TPOT (per request)", _pct("request_time_per_output_token_seconds"), "s", key=True)
    b.panel("Inter-token latency", _pct("inter_token_latency_seconds"), "s", key=True)
    b.panel("End-to-end latency", _pct("e2e_request_latency_seconds"), "s", key=True)
    b.panel("Queue time", _pct("request_queue_time_seconds"), "s", key=True)
    b.panel(
        "SLIs: TTFT p95 and TPOT p95 (recorded)",
        [
            ('kvasir:sli_ttft_seconds:p95_5m{model_name=~"$model"}', "TTFT p95 {{model_name}}"),
            ('kvasir:sli_tpot_seconds:p95_5m{model_name=~"$model"}', "TPOT p95 {{model_name}}"),
        ],
        "s",
    )
    b.row("Engine")
    b.panel(
        "Requests running / waiting",
        [
            (
                f"sum by (model_name) (kvasir:num_requests_running{{{SEL}}})",
                "running {{model_name}}",
            ),
            (
                f"sum by (model_name) (kvasir:num_requests_waiting{{{SEL}}})",
                "waiting {{model_name}}",
            ),
        ],
        key=True,
    )
    b.panel(
        "KV-cache usage",
        [(f"kvasir:kv_cache_usage_perc{{{SEL}}}", "{{instance}}")],
        "percentunit",
        key=True,
    )
    b.panel(
        "Prefix-cache hit rate",
        [
            (
                f"sum by (model_name) (rate(kvasir:prefix_cache_hits_total{{{SEL}}}[{RI}]))"
                f" / sum by (model_name) (rate(kvasir:prefix_cache_queries_total{{{SEL}}}[{RI}]))",
                "{{model_name}}",
            )
        ],
        "percentunit",
        key=True,
    )
    b.panel(
        "Preemptions by reason",
        [
            (
                f"sum by (model_name, reason) (rate(kvasir:num_preemptions_total{{{SEL}}}[{RI}]))",
                "{{reason}}",
            )
        ],
        "ops",
        key=True,
    )
    b.panel(
        "Batch size: requests per step (mean)",
        [
            (
                f"sum by (model_name) (rate(kvasir:iteration_num_requests_sum{{{SEL}}}[{RI}]))"
                f" / sum by (model_name) (rate(kvasir:iteration_num_requests_count{{{SEL}}}[{RI}]))",
                "{{model_name}}",
            )
        ],
        key=True,
    )
    b.panel(
        "Batch size: tokens per step (mean)",
        [
            (
                f"sum by (model_name) (rate(kvasir:iteration_tokens_total_sum{{{SEL}}}[{RI}]))"
                f" / sum by (model_name) (rate(kvasir:iteration_tokens_total_count{{{SEL}}}[{RI}]))",
                "{{model_name}}",
            )
        ],
        key=True,
    )
    b.panel(
        "Step and scheduling time (mean)",
        [
            (
                f"sum by (model_name) (rate(kvasir:engine_step_duration_seconds_sum{{{SEL}}}[{RI}]))"
                f" / sum by (model_name) (rate(kvasir:engine_step_duration_seconds_count{{{SEL}}}[{RI}]))",
                "step {{model_name}}",
            ),
            (
                f"sum by (model_name) (rate(kvasir:engine_schedule_duration_seconds_sum{{{SEL}}}[{RI}]))"
                f" / sum by (model_name) (rate(kvasir:engine_schedule_duration_seconds_count{{{SEL}}}[{RI}]))",
                "schedule {{model_name}}",
            ),
        ],
        "s",
        key=True,
    )
    b.panel(
        "Speculative decoding acceptance",
        [
            (
                f"sum by (model_name) (rate(kvasir:spec_decode_num_accepted_tokens_total{{{SEL}}}[{RI}]))"
                f" / sum by (model_name) (rate(kvasir:spec_decode_num_draft_tokens_total{{{SEL}}}[{RI}]))",
                "{{model_name}}",
            )
        ],
        "percentunit",
        description="Empty unless the server runs with --speculative-config.",
    )
    b.panel(
        "Throughput (tokens/s)",
        [
            (
                f"sum by (model_name) (rate(kvasir:prompt_tokens_total{{{SEL}}}[{RI}]))",
                "prompt {{model_name}}",
            ),
            (
                f"sum by (model_name) (rate(kvasir:generation_tokens_total{{{SEL}}}[{RI}]))",
                "generation {{model_name}}",
            ),
        ],
        "short",
        key=True,
    )
    b.panel(
        "KV-block lifetime p50 (sampled, --kv-cache-metrics)",
        [
            (
                f"histogram_quantile(0.5, sum by (model_name, le) (rate(kvasir:kv_block_lifetime_seconds_bucket{{{SEL}}}[{RI}])))",
                "{{model_name}}",
            )
        ],
        "s",
    )
    return b.to_json()


def business() -> dict:
    b = Board("kvasir-business", "kvasir / business", ["business"])
    tsel = f'{SEL}, tenant=~"$tenant"'
    b.row("Usage")
    b.panel(
        "Requests per tenant",
        [(f"sum by (tenant) (rate(kvasir:tenant_requests_total{{{tsel}}}[{RI}]))", "{{tenant}}")],
        "reqps",
        key=True,
        description="Needs kvasir serve --enable-tenant-metrics.",
    )
    b.panel(
        "Tokens per tenant",
        [
            (
                f"sum by (tenant) (rate(kvasir:tenant_prompt_tokens_total{{{tsel}}}[{RI}]))",
                "prompt {{tenant}}",
            ),
            (
                f"sum by (tenant) (rate(kvasir:tenant_generation_tokens_total{{{tsel}}}[{RI}]))",
                "generation {{tenant}}",
            ),
        ],
        "short",
        key=True,
    )
    b.panel(
        "Requests and tokens per model",
        [
            (
                f"sum by (model_name) (rate(kvasir:request_success_total{{{SEL}}}[{RI}]))",
                "requests/s {{model_name}}",
            ),
            (
                f"sum by (model_name) (rate(kvasir:generation_tokens_total{{{SEL}}}[{RI}]) + rate(kvasir:prompt_tokens_total{{{SEL}}}[{RI}]))",
                "tokens/s {{model_name}}",
            ),
        ],
        "short",
        key=True,
    )
    b.row("Reliability")
    inference = 'endpoint=~"/v1/completions|/v1/chat/completions"'
    b.panel(
        "Error rate (5xx share of inference responses)",
        [
            (
                f'(sum by (model_name) (rate(kvasir:http_requests_total{{{SEL}, {inference}, status=~"5.."}}[{RI}]))'
                f" or 0 * sum by (model_name) (rate(kvasir:http_requests_total{{{SEL}, {inference}}}[{RI}])))"
                f" / sum by (model_name) (rate(kvasir:http_requests_total{{{SEL}, {inference}}}[{RI}]))",
                "{{model_name}}",
            )
        ],
        "percentunit",
        key=True,
    )
    b.panel(
        "Availability vs SLO (99.9 %)",
        [
            (
                'kvasir:sli_availability:ratio_5m{model_name=~"$model"}',
                "availability {{model_name}}",
            ),
            ("vector(0.999)", "SLO"),
        ],
        "percentunit",
    )
    b.panel(
        "Goodput (requests/s within TTFT and TPOT SLOs)",
        [
            (
                f"sum by (model_name) (rate(kvasir:request_goodput_total{{{SEL}}}[{RI}]))",
                "{{model_name}}",
            )
        ],
        "reqps",
    )
    b.row("Cost")
    # GPUs per instance from NVML; an instance without GPUs counts as one (CPU) unit.
    gpus = (
        f"(count by (model_name, instance) (kvasir:gpu_info{{{SEL}}})"
        f" or count by (model_name, instance) (kvasir:num_requests_running{{{SEL}}}))"
    )
    tokens = (
        f"sum by (model_name, instance) (rate(kvasir:generation_tokens_total{{{SEL}}}[{RI}])"
        f" + rate(kvasir:prompt_tokens_total{{{SEL}}}[{RI}]))"
    )
    b.panel(
        "Estimated cost per million tokens ($)",
        [
            (
                f"sum by (model_name) ($gpu_hour_usd * {gpus}) / sum by (model_name) ({tokens} > 0) / 3600 * 1e6",
                "{{model_name}}",
            )
        ],
        "currencyUSD",
        key=True,
        description="$gpu_hour_usd x GPUs / tokens per hour x 1e6 (prompt and generated tokens).",
    )
    b.panel(
        "GPUs in service",
        [(f"sum by (model_name) ({gpus})", "{{model_name}}")],
        "short",
        kind="stat",
        key=True,
    )
    extra = [
        _var_query(
            "tenant",
            'label_values(kvasir:tenant_requests_total{model_name=~"$model"}, tenant)',
            "tenant",
        ),
        {
            "name": "gpu_hour_usd",
            "label": "$ per GPU-hour",
            "type": "textbox",
            "query": "2.5",
            "current": {"text": "2.5", "value": "2.5"},
        },
    ]
    return b.to_json(extra)


def render() -> dict[Path, str]:
    boards = {
        "infrastructure": infrastructure(),
        "performance": performance(),
        "business": business(),
    }
    return {
        HERE / "dashboards" / f"kvasir-{name}.json": json.dumps(board, indent=2) + "\n"
        for name, board in boards.items()
    }


if __name__ == "__main__":
    for path, text in render().items():
        path.write_text(text)
        print(path)
