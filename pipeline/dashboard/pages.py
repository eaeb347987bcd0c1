"""HTML pages of the dashboard, and the per-day report.html (the day page without links).

Every value from the home is escaped (`_e`); plots are inline SVG (charts.py). Pages fit a
1280 px window: the body is at most 1240 px wide, tables wrap long paths, charts are 300 px.
"""

from __future__ import annotations

import datetime
import html
import json
from typing import Dict, List, Optional, Sequence

from feature_specs import specs
from pipeline.dashboard import charts
from pipeline.dashboard import data as data_lib

_STYLE = """
body{font-family:system-ui,sans-serif;font-size:14px;margin:0 auto;padding:8px 16px;max-width:1240px;color:#222}
h1{font-size:22px;margin:8px 0}h2{font-size:17px;margin:22px 0 8px;border-bottom:1px solid #ddd}
nav a{margin-right:14px}table{border-collapse:collapse;max-width:100%}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
.path{overflow-wrap:anywhere}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#08651b;font-weight:600}.bad{color:#b00020;font-weight:600}.muted{color:#777}
.step{display:inline-block;margin:1px 2px;padding:0 5px;border-radius:3px;font-size:12px;background:#eee}
.step.cached{background:#dbe9f6}.step.failed{background:#f8d0d6}.step.running,.step.new{background:#fde9c4}
.charts{display:flex;flex-wrap:wrap;gap:8px}svg.chart{font-size:10px;background:#fff}
svg.chart .title{font-size:12px;font-weight:600}svg.chart .grid{stroke:#eee}
svg.chart .axis{stroke:#999}svg.chart .reference{stroke:#888;stroke-dasharray:4 3}
.facts th{width:190px}table.runs td:nth-child(-n+6),table.runs td:nth-child(11){white-space:nowrap}.box{border:1px solid #ccd;background:#f7f8fc;padding:8px 12px;margin:8px 0}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _link(href: Optional[str], text, links: bool) -> str:
    return f'<a href="{_e(href)}">{_e(text)}</a>' if links and href else _e(text)


def _number(value) -> str:
    """A metric: 4 decimals."""
    return "-" if isinstance(value, bool) or not isinstance(value, (int, float)) else f"{value:.4f}"


def _count(value) -> str:
    return "-" if isinstance(value, bool) or not isinstance(value, (int, float)) else f"{int(value):,}"


def _seconds(value: Optional[float]) -> str:
    if value is None:
        return "-"
    minutes, seconds = divmod(int(round(value)), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{value:.1f} s"


def _time(moment: Optional[datetime.datetime]) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment else "-"


def _yes_no(value: Optional[bool], yes: str = "yes", no: str = "no") -> str:
    if value is None:
        return '<span class="muted">-</span>'
    return f'<span class="ok">{yes}</span>' if value else f'<span class="bad">{no}</span>'


def _status(status: str) -> str:
    css = {"complete": "ok", "ingested": "ok", "failed": "bad", "incomplete": "bad"}.get(status, "muted")
    return f'<span class="{css}">{_e(status)}</span>'


def layout(title: str, body: str, links: bool = True) -> str:
    nav = '<nav><a href="/">Runs</a><a href="/#serving">Serving</a><a href="/#trends">Trends</a></nav>' if links else ""
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<meta name=viewport content='width=device-width'><style>{_STYLE}</style></head>"
            f"<body>{nav}{body}</body></html>")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = (), css: str = "") -> str:
    """Rows hold HTML already escaped; `numeric` column indexes are right-aligned."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<table class="{css}"><tr>{head}</tr>{body}</table>' if css else f"<table><tr>{head}</tr>{body}</table>"


# --- the overview ------------------------------------------------------------------------------
def overview_page(home: str, days: List[data_lib.Day], serving: data_lib.Serving,
                  summaries: Dict[str, Dict[str, object]]) -> str:
    body = [f"<h1>POSO ranking: runs and models</h1><p class=muted>Home {_e(home)}</p>",
            '<h2 id="serving">Serving now</h2>', serving_box(serving),
            '<h2 id="runs">Runs by day</h2>', runs_table(days) if days else "<p>No run in this home yet.</p>",
            '<h2 id="trends">Metric trends</h2>', trend_charts(summaries)]
    return layout("POSO ranking dashboard", "".join(body))


def serving_box(serving: data_lib.Serving) -> str:
    if not serving.served:
        why = "no version pushed yet" if not serving.versions else f"no version on disk matches {serving.policy}"
        return f'<div class="box"><span class="bad">Nothing served</span>: {_e(why)}.</div>'
    lines = []
    for version in reversed(serving.served):
        push = serving.pushes.get(version)
        since = (f", since {_e(_time(push.pushed_at))}, pushed by the run of "
                 + _link(f"/runs/{push.date}", push.date, True) if push else "")
        lines.append(f"Version <b>{_link(f'/versions/{version}', version, True)}</b>{since}")
    if serving.pin:
        lines.append(f"Pinned to version {_e(serving.pin.get('version'))} by <code>poso rollback</code> at "
                     f"{_e(serving.pin.get('pinned_at'))}: later pushes are not served until "
                     f"<code>poso rollback --release</code>")
    elif serving.policy.startswith("specific"):
        lines.append(f"Pinned in models.config since {_e(_time(serving.config_written))}")
    others = [_link(f"/versions/{v}", v, v in serving.pushes) for v in reversed(serving.versions) if v not in serving.served]
    return (f'<div class="box">{"<br>".join(lines)}<br><span class=muted>Policy {_e(serving.policy)} in '
            f'{_e(serving.models_config or "(no models.config)")}; other versions on disk: '
            f'{", ".join(others) or "none"}</span></div>')


def _primary_auc(day: data_lib.Day, earlier: List[data_lib.Day]) -> str:
    """Each primary task's overall AUC and its change since the previous day with a summary."""
    if not day.summary:
        return "-"
    before = next((d.summary for d in earlier if d.summary), None)
    cells = []
    for task in (t.name for t in specs.TASKS if t.primary):
        value = data_lib.metric_value(day.summary.get("metrics"), "overall", task, "auc")
        previous = data_lib.metric_value(before.get("metrics"), "overall", task, "auc") if before else None
        change = f" <span class=muted>({value - previous:+.3f})</span>" if value is not None and previous is not None else ""
        cells.append(f"{_e(task)} {value:.3f}{change}" if value is not None else f"{_e(task)} -")
    return "<br>".join(cells)


def runs_table(days: List[data_lib.Day]) -> str:
    """Newest first; `days` comes newest first."""
    rows = []
    for i, day in enumerate(days):
        run, summary = day.latest_run, day.summary or {}
        blessed = summary.get("blessed") if summary else None
        version = summary.get("pushed_version") if summary.get("pushed") else None
        failure = run.failed_step.component + " failed" if run and run.failed_step else ""
        rows.append([
            _link(f"/runs/{day.date}", day.date, True), _status(day.status), _yes_no(blessed),
            _link(f"/versions/{version}", version, True) if version else '<span class="muted">-</span>',
            f"{run.cached} of {len(run.components)}" if run else "-", _seconds(day.seconds),
            _count(summary.get("train_rows")), _count(day.rows if day.rows is not None else summary.get("eval_rows")),
            _count(day.quarantined), _count(len(day.anomalies)) if day.anomalies is not None else "-",
            _primary_auc(day, days[i + 1:]),
            _e(failure or "; ".join(summary.get("blessing_failures") or [])[:300])])
    return _table(["Day", "Status", "Blessed", "Pushed", "Cached steps", "Duration", "Train rows", "Day rows",
                   "Quarantined", "Anomalies", "AUC (change)", "Why"], rows, numeric=(5, 6, 7, 8, 9), css="runs")


def trend_charts(summaries: Dict[str, Dict[str, object]]) -> str:
    if not summaries:
        return "<p>No run summary yet: trends appear after the first daily run.</p>"
    dates = sorted(summaries)
    labels = [d[5:] for d in dates]  # MM-DD
    tasks = [t.name for t in specs.TASKS]
    gauc = [charts.line_chart(f"{task}: GAUC per user group", labels,
                              data_lib.metric_trends(summaries, "gauc", specs.USER_GROUP, task), "GAUC", 0.5)
            for task in tasks]
    auc = {task: data_lib.metric_trends(summaries, "auc", specs.USER_GROUP, task)["overall"] for task in tasks}
    rows = {"train rows": [summaries[d].get("train_rows") for d in dates],
            "day rows": [summaries[d].get("eval_rows") for d in dates]}
    return (f'<p class=muted>{_e(dates[0])} to {_e(dates[-1])}, one point per daily run summary.</p>'
            f'<div class="charts">{"".join(gauc)}'
            f'{charts.line_chart("AUC overall per task", labels, auc, "AUC", 0.5)}'
            f'{charts.line_chart("Rows per run", labels, rows, "rows")}</div>')


# --- one day -----------------------------------------------------------------------------------
_SHOWN_FIELDS = {"date", "variant", "train_window", "train_rows", "eval_rows", "eval_examples_uri", "blessed",
                 "infra_blessed", "infra_reason", "pushed", "pushed_version", "pushed_destination",
                 "serving_base_directory", "models_config", "pinned_version", "pipeline_root", "metadata",
                 "candidate_model_dir",
                 "evaluation_uri", "metrics", "blessing_checks", "blessing_failures", "baseline_metrics",
                 "wall_seconds"}


def day_page(date: str, summary: Optional[Dict[str, object]], day: Optional[data_lib.Day],
             gate_means: Dict[str, Dict[str, float]], model_id: Optional[int] = None, links: bool = True) -> str:
    """The dashboard's page of one day; with links=False, the standalone report.html."""
    summary = summary or {}
    body = [f"<h1>POSO ranking: daily run {_e(date)}</h1>", _facts(date, summary, day, model_id, links)]
    if summary:
        body += ["<h2>Blessing decision</h2>", blessing_section(summary),
                 "<h2>Metrics of the candidate</h2>", day_charts(summary, gate_means), metrics_table(summary)]
    else:
        body.append("<p>No run summary for this day (the run did not finish, or only ingested the day).</p>")
    if day is not None and day.runs:
        body += ["<h2>Pipeline runs of the day</h2>", pipeline_runs_table(day.runs)]
    return layout(f"POSO run {date}", "".join(body), links)


def _facts(date: str, summary: Dict[str, object], day: Optional[data_lib.Day], model_id: Optional[int],
           links: bool) -> str:
    run = day.latest_run if day else None
    facts = [("Status", _status(day.status) if day else "-")]
    if run is not None and run.failed_step is not None:
        facts.append(("Failed step", f"{_e(run.failed_step.component)} (execution {run.failed_step.execution_id}; "
                                     f"the cause is in the run's log)"))
    if summary:
        window = summary.get("train_window") or ["?", "?"]
        facts += [("Model", _e(summary.get("variant") or "-")),
                  ("Training window", f"{_e(window[0])} .. {_e(window[-1])}, {_count(summary.get('train_rows'))} rows"),
                  ("Evaluated on", f"{_e(date)}, {_count(summary.get('eval_rows'))} rows"),
                  ("Blessed", _yes_no(summary.get("blessed"))),
                  ("Infra validation", _yes_no(summary.get("infra_blessed"), "passed", "FAILED")
                   + (f" {_e(summary['infra_reason'])}" if summary.get("infra_reason") else "")),
                  ("Pushed", _link(f"/versions/{summary.get('pushed_version')}", f"version {summary.get('pushed_version')}",
                                   links) + f" to {_e(summary.get('pushed_destination'))}"
                   + (f"; not served: version {_e(summary['pinned_version'])} was pinned by poso rollback"
                      if summary.get("pinned_version") is not None else "")
                   if summary.get("pushed") else "no")]
    if day is not None:
        facts += [("Day's rows", _count(day.rows)), ("Quarantined rows", _count(day.quarantined) + _ingest_counts(day)),
                  ("Anomalies", "<br>".join(_e(a) for a in day.anomalies) or "none" if day.anomalies is not None else "-")]
    if run is not None:
        facts += [("Cached steps", f"{run.cached} of {len(run.components)}"),
                  ("Duration", _seconds(day.seconds) + (" (with the ingest of earlier days)"
                                                        if summary.get("wall_seconds") else ""))]
    if model_id is not None:
        facts.append(("Candidate model", _link(f"/models/{model_id}", f"model {model_id}: lineage", links)))
    for key in ("candidate_model_dir", "evaluation_uri"):
        if summary.get(key):
            facts.append((key.replace("_", " ").capitalize(), f'<span class="path">{_e(summary[key])}</span>'))
    for key, value in sorted(summary.items()):  # fields other parts of the pipeline added
        if key not in _SHOWN_FIELDS:
            shown = value if isinstance(value, str) else json.dumps(value, default=str)
            facts.append((key.replace("_", " "), _e(shown[:2000])))
    if links and summary:
        facts.append(("Summary", _link(f"/runs/{date}.json", f"{date}.json", links)))
    return '<table class="facts">' + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in facts) + "</table>"


def _ingest_counts(day: data_lib.Day) -> str:
    """AvcExampleGen's other counts and the bad rows' reasons, when it recorded them."""
    ingest = day.ingest or {}
    counts = [f"{_e(k.replace('_', ' '))} {_count(v)}" for k, v in sorted(ingest.items())
              if k.endswith("_rows") and k not in ("good_rows", "bad_rows") and isinstance(v, int)]
    reasons = ingest.get("reasons") or {}
    if isinstance(reasons, dict) and reasons:
        counts.append("reasons: " + "; ".join(f"{_e(r)} {_count(n)}" for r, n in sorted(reasons.items())))
    return f" <span class=muted>({', '.join(counts)})</span>" if counts else ""


def blessing_section(summary: Dict[str, object]) -> str:
    verdict = ('<p class="ok">BLESSED</p>' if summary.get("blessed") else '<p class="bad">NOT blessed</p>')
    rows = []
    for check in data_lib.blessing_checks(summary):
        candidate, baseline = check["candidate"], check["baseline"]
        change = candidate - baseline if candidate is not None and baseline is not None else None
        rows.append([_e(check["task"]), _e(check["slice"]), _e(check["metric"]), _e(check["rule"]),
                     _number(candidate), _number(baseline),
                     f"{change:+.4f}" if change is not None else "-", _count(check["size"]),
                     _yes_no(check["passed"], "pass", "FAIL") if check["passed"] is not None
                     else '<span class="muted">not applied</span>'])
    failures = summary.get("blessing_failures") or []
    listed = ("<p>Failed checks:</p><ul>" + "".join(f"<li>{_e(f)}</li>" for f in failures)
              + "</ul>") if failures else ""
    baseline_note = ("" if summary.get("baseline_metrics") else
                     "<p class=muted>No baseline: no earlier blessed model, so only the floors apply.</p>")
    return verdict + _table(["Task", "Slice", "Metric", "Threshold", "Candidate", "Baseline", "Change",
                             "Slice size", "Result"], rows, numeric=(4, 5, 6, 7)) + baseline_note + listed


def day_charts(summary: Dict[str, object], gate_means: Dict[str, Dict[str, float]]) -> str:
    candidate, baseline = summary.get("metrics") or [], summary.get("baseline_metrics") or []
    groups = list(specs.USER_GROUPS)
    parts = []
    for task in (t.name for t in specs.TASKS):
        series = {"candidate": [data_lib.metric_value(candidate, f"{specs.USER_GROUP}={g}", task, "gauc") for g in groups]}
        if baseline:
            series["last blessed"] = [data_lib.metric_value(baseline, f"{specs.USER_GROUP}={g}", task, "gauc") for g in groups]
        parts.append(charts.bar_chart(f"{task}: GAUC per user group", groups, series, "GAUC", 0.5))
    buckets = sorted({r["slice"].split("=", 1)[1] for r in candidate
                      if str(r["slice"]).startswith(specs.AVC_BUCKET + "=")}, key=int)
    for metric in ("gauc", "auc"):
        series = {task: [data_lib.metric_value(candidate, f"{specs.AVC_BUCKET}={b}", task, metric) for b in buckets]
                  for task in (t.name for t in specs.TASKS)}
        parts.append(charts.line_chart(f"{metric.upper()} against the AVC bucket", buckets, series, metric.upper(), 0.5))
    if gate_means:
        gate_buckets = sorted({b for by in gate_means.values() for b in by}, key=int)
        series = {name: [by.get(b) for b in gate_buckets] for name, by in sorted(gate_means.items())}
        parts.append(charts.line_chart("Gates against the AVC bucket (POSO Fig. 4)", gate_buckets, series,
                                       "mean gate output", 1.0))
    return f'<div class="charts">{"".join(parts)}</div>'


def metrics_table(summary: Dict[str, object]) -> str:
    rows = summary.get("metrics") or []
    tasks = [t.name for t in specs.TASKS]
    slices = sorted({str(r["slice"]) for r in rows}, key=lambda s: (s != "overall", s))
    table = []
    for name in slices:
        cells = [_e(name)]
        for task in tasks:
            gauc, auc = data_lib.metric_value(rows, name, task, "gauc"), data_lib.metric_value(rows, name, task, "auc")
            count = data_lib.metric_value(rows, name, task, "example_count")
            cells.append(f"{_number(gauc)} / {_number(auc)} <span class=muted>({_count(count)})</span>")
        table.append(cells)
    return ("<p class=muted>GAUC / AUC (examples) per slice; '-' where a metric is undefined "
            "(one class only).</p>" + _table(["Slice"] + tasks, table, numeric=range(1, len(tasks) + 1)))


def pipeline_runs_table(runs: List[data_lib.PipelineRun]) -> str:
    rows = []
    for run in sorted(runs, key=lambda r: r.id, reverse=True):
        steps = " ".join(f'<span class="step {_e(s.state)}" title="{_e(s.state)}, {_seconds(s.seconds)}">'
                         f'{_e(s.component)}</span>' for s in run.components)
        rows.append([_e(run.name), "daily run" if run.daily else "ingest", _status(run.status),
                     _e(_time(run.started)), _seconds(run.seconds), f"{run.cached} of {len(run.components)}", steps])
    return ("<p class=muted>Steps: blue cached, red failed, amber never finished.</p>"
            + _table(["Run", "Kind", "Status", "Started", "Duration", "Cached", "Steps"], rows, numeric=(4,)))


# --- lineage -----------------------------------------------------------------------------------
def lineage_page(title: str, lineage: data_lib.Lineage) -> str:
    model = lineage.model
    run = lineage.trainer_run
    facts = [("Model", f"{model.id}: {_e(model.uri)}"),
             ("Trainer", (f"execution {lineage.trainer.execution_id}, {_e(lineage.trainer.state)}, "
                          f"started {_e(_time(lineage.trainer.started))}, {_seconds(lineage.trainer.seconds)}")
              if lineage.trainer else "-"),
             ("Trainer run", f"{_e(run.name)} (daily run of " + _link(f"/runs/{run.date}", run.date, True) + ")"
              if run else "-")]
    if lineage.transform_graph is not None:
        transform = lineage.transform
        transform_run = lineage.transform_run
        where = (f"; run {_e(transform_run.name)} of " + _link(f"/runs/{transform_run.date}", transform_run.date, True)
                 if transform_run else "")
        facts.append(("Transform", f"graph {lineage.transform_graph.id}: {_e(lineage.transform_graph.uri)}<br>"
                      + (f"execution {transform.execution_id}, {_e(transform.state)}, {_seconds(transform.seconds)}"
                         if transform else "execution not found") + where))
    for evaluation in lineage.evaluations:
        day, baseline = evaluation["date"], evaluation["baseline_model_id"]
        facts.append(("Evaluation", f"on {_link(f'/runs/{day}', day, True)}: "
                      + _yes_no(evaluation["blessed"], "blessed", "NOT blessed") + ", baseline "
                      + (_link(f"/models/{baseline}", f"model {baseline}", True) if baseline else "none")))
    for push in lineage.pushes:
        facts.append(("Pushed", f"version {_link(f'/versions/{push.version}', push.version, True)} "
                      f"at {_e(_time(push.pushed_at))}"))
    window = [[_e(a.date), _count(a.properties.get("rows")), f"{a.id}", f'<span class="path">{_e(a.uri)}</span>']
              for a in lineage.window]
    body = (f"<h1>{_e(title)}</h1>"
            + '<table class="facts">' + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in facts)
            + "</table><h2>Training window</h2>"
            + (_table(["Day", "Rows", "Examples artifact", "URI"], window, numeric=(1, 2)) if window else "<p>-</p>"))
    return layout(title, body)


def not_found_page(what: str) -> str:
    return layout("Not found", f"<h1>Not found</h1><p>{_e(what)}</p>")
