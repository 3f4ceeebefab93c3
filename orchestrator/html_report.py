"""`orchestrator report RUN_DIR`: one self-contained HTML file with the run's plots, config and summary.

The plots come from the request records (work/requests/), the result files' `status` and
`output_tokens` columns, and what `orchestrator status` reads; the PNGs are embedded as data URIs, so
the file can be mailed or archived alone, and are also written beside it.
"""
from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter, defaultdict
from pathlib import Path

from .commits import error_reason
from .errors import RunError
from .rundir import RunPaths, atomic_write_text
from .sinks import sink_for
from .status import collect, read_requests

MAX_REASONS = 6  # error groups drawn one by one; the rest are "other"


def write_report(run_dir: str | Path) -> Path:
    """Write <run_dir>/report/report.html (and each plot as a PNG beside it); returns its path."""
    status = collect(run_dir)
    paths = RunPaths(Path(status["run_dir"]))
    out = paths.root / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot create {out} ({exc.strerror or exc}); check the run directory's permissions") from None
    records = read_requests(paths)
    plots = {
        "throughput": ("Throughput over time, overall and per replica", _throughput(records)),
        "latency": ("Request latency", _latency(records)),
        "output_tokens": ("Output tokens per row", _output_tokens(paths, status)),
        "errors": ("Failed requests by reason over time", _errors(records)),
    }
    for name, (_, png) in plots.items():
        _write_bytes(out / f"{name}.png", png)
    page = out / "report.html"
    atomic_write_text(page, _page(paths, status, plots))
    return page


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunError(f"cannot write {path} ({exc.strerror or exc}); free some space or check permissions") from None


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _bins(records: list[dict]) -> tuple[float, float, int]:
    """(start, bin width in s, number of bins) over the records' time span, about 80 bins of >= 1 s."""
    start = min(r["at"] - (r.get("latency_s") or 0) for r in records)
    span = max(r["at"] for r in records) - start
    width = max(1.0, span / 80)
    return start, width, int(span // width) + 1


def _throughput(records: list[dict]) -> bytes:
    plt, fig, ax = _figure()
    done = [r for r in records if r.get("ok", 0) + r.get("failed", 0)]
    if not done:
        _empty(ax, "no request records yet")
        return _png(plt, fig)
    start, width, n = _bins(done)
    series: dict[str, list[float]] = defaultdict(lambda: [0.0] * n)
    for r in done:
        i = min(n - 1, int((r["at"] - start) // width))
        rows = r.get("ok", 0) + r.get("failed", 0)
        series["all replicas"][i] += rows / width
        series[str(r.get("replica", "?"))][i] += rows / width
    xs = [i * width for i in range(n)]
    ax.plot(xs, series.pop("all replicas"), label="all replicas", linewidth=2, color="black")
    if len(series) > 1:
        for name in sorted(series):
            ax.plot(xs, series[name], label=name, linewidth=1)
    ax.set_xlabel(f"seconds since the first request ({width:g} s bins)")
    ax.set_ylabel("prompts/s")
    ax.legend(loc="best", fontsize="small")
    ax.grid(alpha=0.3)
    return _png(plt, fig)


def _latency(records: list[dict]) -> bytes:
    plt, fig, ax = _figure()
    timed = [r for r in records if isinstance(r.get("latency_s"), (int, float))]
    ok = [r["latency_s"] for r in timed if r.get("error") is None]
    bad = [r["latency_s"] for r in timed if r.get("error") is not None]
    if not ok and not bad:
        _empty(ax, "no request records yet")
        return _png(plt, fig)
    ax.hist([ok, bad], bins=40, stacked=True, label=[f"answered ({len(ok)})", f"failed ({len(bad)})"],
            color=["tab:blue", "tab:red"])
    ax.set_xlabel("latency of one HTTP request (s)")
    ax.set_ylabel("requests")
    ax.legend(loc="best", fontsize="small")
    return _png(plt, fig)


def _output_tokens(paths: RunPaths, status: dict) -> bytes:
    """From the committed result files' status and output_tokens columns (ok rows)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    plt, fig, ax = _figure()
    values: list = []
    sink = sink_for(paths)
    for unit in sorted(sink.done_units()):
        try:
            table = sink.read(unit, columns=["status", "output_tokens"])
        except (OSError, pa.ArrowInvalid):
            continue
        tokens = pc.filter(table.column("output_tokens"), pc.equal(table.column("status"), "ok"))
        values.extend(t for t in tokens.to_pylist() if t is not None)
    if not values:
        _empty(ax, "no answered row committed yet")
        return _png(plt, fig)
    ax.hist(values, bins=min(50, max(1, len(set(values)))), color="tab:green")
    ax.set_xlabel(f"output tokens per answered row ({len(values)} rows)")
    ax.set_ylabel("rows")
    return _png(plt, fig)


def _errors(records: list[dict]) -> bytes:
    """Failed HTTP requests (retried ones included) per reason, per time bin."""
    plt, fig, ax = _figure()
    failed = [r for r in records if r.get("error") is not None]
    if not failed:
        _empty(ax, "no request failed")
        return _png(plt, fig)
    start, width, n = _bins(records)
    top = [reason for reason, _ in Counter(error_reason(r["error"]) for r in failed).most_common(MAX_REASONS)]
    counts: dict[str, list[int]] = {reason: [0] * n for reason in top}
    for r in failed:
        reason = error_reason(r["error"])
        key = reason if reason in counts else "other"
        counts.setdefault(key, [0] * n)[min(n - 1, int((r["at"] - start) // width))] += 1
    xs = [i * width for i in range(n)]
    bottom = [0] * n
    for reason, ys in counts.items():
        label = reason if len(reason) <= 70 else reason[:67] + "..."
        ax.bar(xs, ys, width=width, bottom=bottom, align="edge", label=label)
        bottom = [b + y for b, y in zip(bottom, ys)]
    ax.set_xlabel(f"seconds since the first request ({width:g} s bins)")
    ax.set_ylabel("failed requests")
    ax.legend(loc="upper left", fontsize="x-small")
    return _png(plt, fig)


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:60em;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}
pre{background:#f6f6f6;padding:.8em;overflow-x:auto;font-size:.85em}img{max-width:100%;display:block}
figure{margin:1em 0}figcaption{color:#555;font-size:.9em}"""

# set on <body> once the page has loaded: how many images decoded, of how many (a headless browser checks it)
_SCRIPT = """window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-decoded", ok + "/" + imgs.length);
});"""


def _table(rows) -> str:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_cell(v))}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _blank(value) -> str:
    return "" if value is None else str(value)


def _cell(value) -> str:
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _schema_counts(rows: dict) -> str:
    """Structured answers (sampling.json_schema): the re-asks and the rows that never matched, when any."""
    if not (rows.get("invalid_structured") or rows.get("schema_retries")):
        return ""
    return (f"<p id=\"schema-counts\">JSON schema: {rows['schema_retries']} re-ask(s) of answers that did not match, "
            f"{rows['invalid_structured']} row(s) InvalidStructuredOutput.</p>")


def _gpu_table(gpu: dict) -> str:
    """GPU-hours by state and their cost (status's `gpu`, the fields of summary.json: report.gpu_usage)."""
    if gpu.get("gpu_hours_basis") == "endpoint":
        return ('<p id="gpu-hours">No GPU-hours: engine=endpoint sends to a server this run did not start, whose '
                'GPUs are not this run\'s to count.</p>')
    if gpu.get("gpu_hours") is None:
        return '<p id="gpu-hours">No GPU-hours: the run directory has no config.yaml to count them with.</p>'
    total, states = gpu["gpu_hours"], gpu["gpu_hours_by_state"]
    rows = [("GPUs", f"{gpu['gpus']} ({gpu['replicas_with_gpus']} replica(s) x {gpu['gpus_per_replica']})"),
            ("GPU-hours", f"{total:.6g}")]
    rows += [(f"  {state}", f"{hours:.6g} ({100 * hours / total:.1f}%)" if total else f"{hours:.6g}")
             for state, hours in states.items()]
    rows += [("output tokens (this attempt)", gpu["output_tokens_this_attempt"]),
             ("output tokens per GPU-hour", _blank(gpu["output_tokens_per_gpu_hour"])),
             ("GPU-hours per million output tokens", _blank(gpu["gpu_hours_per_million_output_tokens"]))]
    cost = gpu.get("cost")
    if cost:
        rows += [("cost (cluster.gpu_hour_cost = " + f"{cost['gpu_hour_cost']:g})", f"{cost['total']:.6g}"),
                 ("cost per million output tokens", _blank(cost["per_million_output_tokens"]))]
    note = ("<p>engine=mock: the embedded engine runs the layout's ranks on CPUs; these are the GPU-hours the layout "
            "would hold for the same time.</p>" if gpu.get("gpu_hours_basis") == "simulated" else "")
    return f'<div id="gpu-hours">{_table(rows)}{note}</div>'


def _page(paths: RunPaths, status: dict, plots: dict) -> str:
    rows = status["rows"]
    overall = status["rates"]["overall"]
    counted = f"answers ({rows['prompts']} prompts x {rows['rollouts']} rollouts)" if rows.get("rollouts", 1) > 1 \
        else "rows"
    try:
        config = (paths.root / "config.yaml").read_text()
    except OSError:
        config = "(config.yaml is missing)"
    summary = status["summary"]
    errors = "".join(f"<tr><td>{e['rows']}</td><td>{html.escape(e['reason'])}</td></tr>" for e in status["errors"])
    jobs = "".join(f"<tr><td>{html.escape(r['replica'])}</td><td>{html.escape(str(r['job']))}</td>"
                   f"<td>{html.escape(r['state'])}</td><td>{r.get('rows', '')}</td>"
                   f"<td>{_blank(r.get('queue_wait_s'))}</td><td>{_blank(r.get('startup_s'))}</td>"
                   f"<td>{_blank(r.get('generation_s'))}</td></tr>"
                   for r in status["replicas"])
    figures = "".join(
        f'<figure><img id="plot-{name}" alt="{html.escape(title)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode()}"><figcaption>{html.escape(title)} ({name}.png)</figcaption></figure>'
        for name, (title, png) in plots.items())
    title = f"orchestrator run {paths.root.name}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style>
<script>{_SCRIPT}</script></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(str(paths.root))}: <b>{html.escape(status['state'])}</b>, {rows['committed']}/{rows['total']} {counted}
committed, {rows['ok']} ok, {rows['failed']} failed; overall {overall['prompts_per_s']:.1f} prompts/s and
{overall['output_tokens_per_s']:.1f} output tokens/s over {overall['window_s']:.0f} s of generation.</p>
{_schema_counts(rows)}
<h2>Plots</h2>
{figures}
<h2>Errors by reason</h2>
{f'<table><tr><th>rows</th><th>reason</th></tr>{errors}</table>' if errors else '<p>No row failed.</p>'}
<h2>Replicas</h2>
<table><tr><th>replica</th><th>job</th><th>state</th><th>rows</th><th>queue wait (s)</th><th>start-up (s)</th>
<th>generating (s)</th></tr>{jobs}</table>
<h2>GPU-hours and cost</h2>
<p>Start-up: engine launch to its first proven generation; generating: first request to last commit of each
segment; idle: the rest until the engine stopped (this attempt).</p>
{_gpu_table(status.get('gpu') or {})}
<h2>Summary (summary.json)</h2>
{_table(summary.items()) if summary else '<p>No summary.json yet: the run has not finished.</p>'}
<h2>Resolved config (config.yaml)</h2>
<pre id="config">{html.escape(config)}</pre>
</body></html>
"""
