"""Writes ``rules/kvasir.rules.yml`` and its promtool unit tests ``tests/kvasir.test.yml``
from the SLO table below (``python deploy/prometheus/gen_rules.py``; a test checks the
committed files are what this writes). Edit the SLOs here, not in the YAML.

SLOs (per model): availability 99.9 % of inference responses not 5xx; 95 % of requests
with TTFT <= 1 s; 95 % with TPOT <= 100 ms; 95 % of finished requests within both
(goodput, thresholds set by ``kvasir serve --slo-ttft-ms/--slo-tpot-ms``). A latency
threshold must be a histogram bucket bound of ``kvasir.metrics.prometheus``.

Alerts on each SLO are the multi-window multi-burn-rate set of the Google SRE
workbook (chapter "Alerting on SLOs"): page on 2 % of a 30-day budget burnt in 1 h
(14.4x, checked over 1 h and 5 m) or 5 % in 6 h (6x, 6 h and 30 m); ticket on 10 % in
3 d (1x, 3 d and 6 h) or 3x over 1 d and 2 h. The short window makes the alert stop soon
after the burn stops.

Anomaly detection (TTFT and TPOT means per model): the 5-minute mean against its own
mean and standard deviation over the last day. Why these windows: 5 m smooths
per-request noise yet follows a regression within minutes; a 1-day baseline holds a full
daily traffic cycle, so the usual day/night swing is inside the standard deviation
instead of alerting every morning, and a 10-minute incident moves a 1-day baseline by
under 1 %, so the baseline does not absorb the anomaly before it fires. The alert needs
z > 3 for 10 minutes (two full 5 m windows: one slow batch or a scrape gap does not
page), a mean at least 20 % above the baseline (a statistically significant but tiny
shift is not an incident) and some traffic (0.05 request/s).
"""

from __future__ import annotations

from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
INFERENCE = 'endpoint=~"/v1/completions|/v1/chat/completions"'
WINDOWS = ["5m", "30m", "1h", "2h", "6h", "1d", "3d"]
# (severity, burn rate, long window, short window, for)
BURNS = [
    ("page", 14.4, "1h", "5m", "2m"),
    ("page", 6.0, "6h", "30m", "15m"),
    ("ticket", 3.0, "1d", "2h", "1h"),
    ("ticket", 1.0, "3d", "6h", "3h"),
]


def _latency_errors(hist: str, le: str, w: str) -> str:
    return (
        f'1 - (sum by (model_name) (rate(kvasir:{hist}_bucket{{le="{le}"}}[{w}]))'
        f" / sum by (model_name) (rate(kvasir:{hist}_count[{w}])))"
    )


# name -> (objective, description, error-ratio expression for a window)
SLOS = {
    "availability": (
        0.999,
        "inference responses that are not 5xx",
        # "or 0 * total": no 5xx series yet means zero errors, not no data.
        lambda w: (
            f'(sum by (model_name) (rate(kvasir:http_requests_total{{{INFERENCE},status=~"5.."}}[{w}]))'
            f" or 0 * sum by (model_name) (rate(kvasir:http_requests_total{{{INFERENCE}}}[{w}])))"
            f" / sum by (model_name) (rate(kvasir:http_requests_total{{{INFERENCE}}}[{w}]))"
        ),
    ),
    "ttft": (
        0.95,
        "requests with TTFT <= 1 s",
        lambda w: _latency_errors("time_to_first_token_seconds", "1.0", w),
    ),
    "tpot": (
        0.95,
        "requests with TPOT <= 100 ms",
        lambda w: _latency_errors("request_time_per_output_token_seconds", "0.1", w),
    ),
    "goodput": (
        0.95,
        "finished requests within the TTFT and TPOT SLOs",
        lambda w: (
            f"1 - (sum by (model_name) (rate(kvasir:request_goodput_total[{w}]))"
            f' / sum by (model_name) (rate(kvasir:request_success_total{{finished_reason=~"stop|length"}}[{w}])))'
        ),
    ),
}


def _title(s: str) -> str:
    return {"ttft": "TTFT", "tpot": "TPOT"}.get(s, s.capitalize())


def burn_alerts() -> list[dict]:
    out = []
    for slo, (objective, desc, _) in SLOS.items():
        budget = round(1 - objective, 6)
        for sev, rate, long_w, short_w, for_ in BURNS:
            thr = round(rate * budget, 6)
            out.append(
                {
                    "alert": f"Kvasir{_title(slo)}BudgetBurn",
                    "expr": (
                        f"kvasir:slo_{slo}_errors:ratio_rate{long_w} > {thr}"
                        f" and kvasir:slo_{slo}_errors:ratio_rate{short_w} > {thr}"
                    ),
                    "for": for_,
                    "labels": {"severity": sev, "slo": slo, "window": long_w},
                    "annotations": {
                        "summary": f"{_title(slo)} SLO ({objective:.1%} {desc}) burning its "
                        f"error budget {rate:g}x over {long_w} and {short_w}",
                    },
                }
            )
    return out


def slo_rules() -> list[dict]:
    rules: list[dict] = []
    for slo, (_, _, errors) in SLOS.items():
        for w in WINDOWS:
            rules.append({"record": f"kvasir:slo_{slo}_errors:ratio_rate{w}", "expr": errors(w)})
    return rules


def sli_rules() -> list[dict]:
    def p95(hist: str) -> str:
        return f"histogram_quantile(0.95, sum by (model_name, le) (rate(kvasir:{hist}_bucket[5m])))"

    return [
        {"record": "kvasir:sli_ttft_seconds:p95_5m", "expr": p95("time_to_first_token_seconds")},
        {
            "record": "kvasir:sli_tpot_seconds:p95_5m",
            "expr": p95("request_time_per_output_token_seconds"),
        },
        {
            "record": "kvasir:sli_availability:ratio_5m",
            "expr": "1 - kvasir:slo_availability_errors:ratio_rate5m",
        },
        {
            "record": "kvasir:sli_goodput:ratio_5m",
            "expr": "1 - kvasir:slo_goodput_errors:ratio_rate5m",
        },
        {
            "record": "kvasir:sli_goodput:rate5m",
            "expr": "sum by (model_name) (rate(kvasir:request_goodput_total[5m]))",
        },
    ]


def anomaly_rules() -> tuple[list[dict], list[dict]]:
    rec, alerts = [], []
    for short, hist in (
        ("ttft", "time_to_first_token_seconds"),
        ("tpot", "request_time_per_output_token_seconds"),
    ):
        m = f"kvasir:{short}_seconds:mean5m"
        rec += [
            {
                "record": m,
                "expr": f"sum by (model_name) (rate(kvasir:{hist}_sum[5m]))"
                f" / sum by (model_name) (rate(kvasir:{hist}_count[5m]))",
            },
            {"record": f"{m}:avg_1d", "expr": f"avg_over_time({m}[1d])"},
            {"record": f"{m}:stddev_1d", "expr": f"stddev_over_time({m}[1d])"},
            {"record": f"{m}:zscore", "expr": f"({m} - {m}:avg_1d) / ({m}:stddev_1d > 0)"},
        ]
        alerts.append(
            {
                "alert": f"Kvasir{_title(short)}Anomaly",
                "expr": (
                    f"{m}:zscore > 3 and {m} > 1.2 * {m}:avg_1d"
                    f" and sum by (model_name) (rate(kvasir:{hist}_count[5m])) > 0.05"
                ),
                "for": "10m",
                "labels": {"severity": "ticket"},
                "annotations": {
                    "summary": f"mean {_title(short)} more than 3 standard deviations above "
                    "its last day for 10 minutes"
                },
            }
        )
    return rec, alerts


def ops_alerts() -> list[dict]:
    def a(name: str, expr: str, for_: str, sev: str, summary: str) -> dict:
        r = {"alert": name, "expr": expr, "for": for_, "labels": {"severity": sev}}
        r["annotations"] = {"summary": summary}
        return r

    return [
        a(
            "KvasirKVCacheSaturated",
            "max by (model_name, instance) (kvasir:kv_cache_usage_perc) > 0.95",
            "5m",
            "ticket",
            "KV cache over 95 % full for 5 minutes (expect preemptions and queueing)",
        ),
        a(
            "KvasirQueueGrowing",
            "sum by (model_name, instance) (kvasir:num_requests_waiting) > 8"
            " and sum by (model_name, instance) (deriv(kvasir:num_requests_waiting[10m])) > 0",
            "10m",
            "page",
            "waiting queue above 8 and still growing for 10 minutes",
        ),
        a(
            "KvasirEngineDown",
            'up{job="kvasir"} == 0',
            "1m",
            "page",
            "kvasir server not scrapeable",
        ),
        a(
            "KvasirGpuXid",
            # A GPU's first XID of a kind starts a new series at 1, which increase()
            # does not see: "unless ... offset" catches series born in the window.
            "increase(kvasir:gpu_xid_errors_total[10m]) > 0"
            " or (kvasir:gpu_xid_errors_total > 0 unless kvasir:gpu_xid_errors_total offset 10m)",
            "0m",
            "page",
            "GPU reported an XID error",
        ),
        a(
            "KvasirGpuEccUncorrected",
            'increase(kvasir:gpu_ecc_errors_total{type="uncorrected"}[10m]) > 0',
            "0m",
            "page",
            "GPU uncorrected (volatile) ECC errors",
        ),
        a(
            "KvasirGpuRetiredPagesPending",
            "kvasir:gpu_retired_pages_pending > 0",
            "0m",
            "ticket",
            "GPU memory pages wait for retirement: reset the GPU",
        ),
        a(
            "KvasirGpuThermalThrottle",
            'max by (model_name, instance, gpu, uuid) (kvasir:gpu_throttle_reason{reason=~"hw_thermal_slowdown|sw_thermal_slowdown"}) > 0',
            "5m",
            "ticket",
            "GPU clocks held down by temperature for 5 minutes",
        ),
        a(
            "KvasirGpuTemperatureHigh",
            'kvasir:gpu_temperature_celsius{sensor="gpu"} > 85',
            "5m",
            "ticket",
            "GPU above 85 C for 5 minutes",
        ),
    ]


def rules_doc() -> dict:
    an_rec, an_alerts = anomaly_rules()
    return {
        "groups": [
            {"name": "kvasir-slo-errors", "interval": "30s", "rules": slo_rules()},
            {"name": "kvasir-sli", "interval": "30s", "rules": sli_rules()},
            {"name": "kvasir-slo-alerts", "rules": burn_alerts()},
            {"name": "kvasir-anomaly", "interval": "1m", "rules": an_rec + an_alerts},
            {"name": "kvasir-ops", "rules": ops_alerts()},
        ]
    }


# ------------------------------------------------------------------ promtool tests


def _slo_series(slo: str, model: str, ratio: float, per_min: int, minutes: int) -> list[dict]:
    """Counters of ``per_min`` requests a minute of which ``ratio`` miss the SLO."""
    m = f'model_name="{model}"'
    good = f"0+{round(per_min * (1 - ratio), 6):g}x{minutes}"
    bad = f"0+{round(per_min * ratio, 6):g}x{minutes}"
    total = f"0+{per_min}x{minutes}"
    if slo == "availability":
        ep = 'endpoint="/v1/completions"'
        return [
            {"series": f'kvasir:http_requests_total{{{m},{ep},status="200"}}', "values": good},
            {"series": f'kvasir:http_requests_total{{{m},{ep},status="500"}}', "values": bad},
        ]
    if slo in ("ttft", "tpot"):
        hist = _HIST[slo]
        le = {"ttft": "1.0", "tpot": "0.1"}[slo]
        return [
            {"series": f'kvasir:{hist}_bucket{{{m},le="{le}"}}', "values": good},
            {"series": f"kvasir:{hist}_count{{{m}}}", "values": total},
        ]
    return [
        {"series": f"kvasir:request_goodput_total{{{m}}}", "values": good},
        {
            "series": f'kvasir:request_success_total{{{m},finished_reason="length"}}',
            "values": total,
        },
    ]


_HIST = {"ttft": "time_to_first_token_seconds", "tpot": "request_time_per_output_token_seconds"}


def _burn_case() -> dict:
    """Every SLO at once: model "bad" misses it 18-20x faster than its budget allows,
    model "good" at half the budget. The 3x/1d and 1x/3d tickets judge the traffic
    seen so far (rate over less than their window), so all four fire within hours;
    each only after its ``for``."""
    series = []
    for slo, (objective, _, _) in SLOS.items():
        budget = 1 - objective
        series += _slo_series(slo, "bad", min(20 * budget, 0.9), 600, 240)
        series += _slo_series(slo, "good", 0.5 * budget, 600, 240)
    checks = []
    for at, firing in (("30m", {"1h", "6h"}), ("3h30m", {"1h", "6h", "1d", "3d"})):
        for slo in SLOS:
            alerts = [a for a in burn_alerts() if a["labels"]["slo"] == slo]
            exp = [
                {
                    "exp_labels": {"model_name": "bad", **a["labels"]},
                    "exp_annotations": a["annotations"],
                }
                for a in alerts
                if a["labels"]["window"] in firing
            ]
            checks.append({"eval_time": at, "alertname": alerts[0]["alert"], "exp_alerts": exp})
    return {
        "name": "SLO burn rates: breach vs within budget",
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": checks,
    }


def _anomaly_case() -> dict:
    """1 day of noisy baseline (mean 0.2 s, per-minute jitter of +-0.04 s), then
    model "bad" jumps to 1.0 s while model "good" carries on with the same noise."""
    per_min = 60
    series = []
    for model in ("bad", "good"):
        sums, counts = [0.0], [0]
        for i in range(1440 + 30):
            mean = 0.2 + (0.04 if i % 2 else -0.04)
            if model == "bad" and i >= 1440:
                mean = 1.0
            sums.append(round(sums[-1] + per_min * mean, 3))
            counts.append(counts[-1] + per_min)
        for hist in _HIST.values():
            series += [
                {
                    "series": f'kvasir:{hist}_sum{{model_name="{model}"}}',
                    "values": " ".join(f"{x:.3f}" for x in sums),
                },
                {
                    "series": f'kvasir:{hist}_count{{model_name="{model}"}}',
                    "values": " ".join(str(x) for x in counts),
                },
            ]
    checks = []
    for alert in anomaly_rules()[1]:
        exp = [
            {
                "exp_labels": {"model_name": "bad", **alert["labels"]},
                "exp_annotations": alert["annotations"],
            }
        ]
        checks += [
            {"eval_time": "23h59m", "alertname": alert["alert"], "exp_alerts": []},
            {"eval_time": "24h6m", "alertname": alert["alert"], "exp_alerts": []},
            {"eval_time": "24h25m", "alertname": alert["alert"], "exp_alerts": exp},
        ]
    return {
        "name": "TTFT/TPOT z-score: jump vs normal noise",
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": checks,
    }


M = 'model_name="m"'


def _ops_cases() -> list[dict]:
    by = {a["alert"]: a for a in ops_alerts()}

    def exp(name: str, **labels: str) -> list[dict]:
        a = by[name]
        return [{"exp_labels": {**labels, **a["labels"]}, "exp_annotations": a["annotations"]}]

    g = 'model_name="m",instance="i",gpu="0",uuid="GPU-1"'
    gl = {"model_name": "m", "instance": "i", "gpu": "0", "uuid": "GPU-1"}
    return [
        {
            "name": "KV cache saturated vs busy",
            "interval": "1m",
            "input_series": [
                {"series": f'kvasir:kv_cache_usage_perc{{{M},instance="i"}}', "values": "0.97x20"},
                {
                    "series": 'kvasir:kv_cache_usage_perc{model_name="ok",instance="i"}',
                    "values": "0.9x20",
                },
            ],
            "alert_rule_test": [
                {
                    "eval_time": "10m",
                    "alertname": "KvasirKVCacheSaturated",
                    "exp_alerts": exp("KvasirKVCacheSaturated", model_name="m", instance="i"),
                },
            ],
        },
        {
            "name": "queue growing vs steady",
            "interval": "1m",
            "input_series": [
                {"series": f'kvasir:num_requests_waiting{{{M},instance="i"}}', "values": "10+1x40"},
                {
                    "series": 'kvasir:num_requests_waiting{model_name="ok",instance="i"}',
                    "values": "20x40",
                },
            ],
            "alert_rule_test": [
                {
                    "eval_time": "30m",
                    "alertname": "KvasirQueueGrowing",
                    "exp_alerts": exp("KvasirQueueGrowing", model_name="m", instance="i"),
                },
            ],
        },
        {
            "name": "engine down vs up",
            "interval": "1m",
            "input_series": [
                {"series": 'up{job="kvasir",instance="a"}', "values": "1 1 0 0 0 0"},
                {"series": 'up{job="kvasir",instance="b"}', "values": "1x5"},
            ],
            "alert_rule_test": [
                {
                    "eval_time": "5m",
                    "alertname": "KvasirEngineDown",
                    "exp_alerts": exp("KvasirEngineDown", job="kvasir", instance="a"),
                },
            ],
        },
        {
            "name": "GPU XID, ECC, retired pages, thermal",
            "interval": "1m",
            "input_series": [
                {"series": f'kvasir:gpu_xid_errors_total{{{g},xid="79"}}', "values": "0 0 1 1 1"},
                # A first XID 48 creates its series at 1 (no zero before it).
                {"series": f'kvasir:gpu_xid_errors_total{{{g},xid="48"}}', "values": "_ _ _ 1 1"},
                {
                    "series": f'kvasir:gpu_ecc_errors_total{{{g},type="uncorrected"}}',
                    "values": "0 0 0 2 2",
                },
                {
                    "series": f'kvasir:gpu_ecc_errors_total{{{g},type="corrected"}}',
                    "values": "0 5 9 12 20",
                },
                {"series": f"kvasir:gpu_retired_pages_pending{{{g}}}", "values": "0 0 0 1 1"},
                {
                    "series": f'kvasir:gpu_throttle_reason{{{g},reason="hw_thermal_slowdown"}}',
                    "values": "1x10",
                },
                {
                    "series": f'kvasir:gpu_throttle_reason{{{g},reason="sw_power_cap"}}',
                    "values": "1x10",
                },
                {
                    "series": f'kvasir:gpu_temperature_celsius{{{g},sensor="gpu"}}',
                    "values": "80x10",
                },
                {
                    "series": 'kvasir:gpu_temperature_celsius{model_name="m",instance="i",gpu="1",uuid="GPU-2",sensor="gpu"}',
                    "values": "90x10",
                },
            ],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "KvasirGpuXid", "exp_alerts": []},
                {
                    "eval_time": "2m",
                    "alertname": "KvasirGpuXid",
                    "exp_alerts": exp("KvasirGpuXid", **gl, xid="79"),
                },
                {
                    "eval_time": "3m",
                    "alertname": "KvasirGpuXid",
                    "exp_alerts": exp("KvasirGpuXid", **gl, xid="79")
                    + exp("KvasirGpuXid", **gl, xid="48"),
                },
                {"eval_time": "2m", "alertname": "KvasirGpuEccUncorrected", "exp_alerts": []},
                {
                    "eval_time": "4m",
                    "alertname": "KvasirGpuEccUncorrected",
                    "exp_alerts": exp("KvasirGpuEccUncorrected", **gl, type="uncorrected"),
                },
                {"eval_time": "2m", "alertname": "KvasirGpuRetiredPagesPending", "exp_alerts": []},
                {
                    "eval_time": "4m",
                    "alertname": "KvasirGpuRetiredPagesPending",
                    "exp_alerts": exp("KvasirGpuRetiredPagesPending", **gl),
                },
                {
                    "eval_time": "8m",
                    "alertname": "KvasirGpuThermalThrottle",
                    "exp_alerts": exp("KvasirGpuThermalThrottle", **gl),
                },
                {"eval_time": "3m", "alertname": "KvasirGpuTemperatureHigh", "exp_alerts": []},
                {
                    "eval_time": "8m",
                    "alertname": "KvasirGpuTemperatureHigh",
                    "exp_alerts": exp(
                        "KvasirGpuTemperatureHigh",
                        model_name="m",
                        instance="i",
                        gpu="1",
                        uuid="GPU-2",
                        sensor="gpu",
                    ),
                },
            ],
        },
    ]


def tests_doc() -> dict:
    return {
        "rule_files": ["../rules/kvasir.rules.yml"],
        "evaluation_interval": "1m",
        "tests": [_burn_case(), _anomaly_case(), *_ops_cases()],
    }


def render() -> dict[Path, str]:
    head = "# Generated by deploy/prometheus/gen_rules.py: edit that file, not this one.\n"
    dump = lambda d: head + yaml.safe_dump(d, sort_keys=False, width=1000)  # noqa: E731
    return {
        HERE / "rules" / "kvasir.rules.yml": dump(rules_doc()),
        HERE / "tests" / "kvasir.test.yml": dump(tests_doc()),
    }


if __name__ == "__main__":
    for path, text in render().items():
        path.write_text(text)
        print(path)
