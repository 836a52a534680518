"""The evaluation report: `report/index.html` (self-contained, figures inline as base64 PNG), `report/report.md` and
`report/metrics.json`, built from the metrics that `kit finetune` and `kit evaluate` compute.

Sections: model card (intended use, data and time span, tasks and cohorts, limitations), metrics with 95% intervals
beside the count-feature baseline, calibration (reliability diagrams and ECE before/after, thresholds), forgetting
(next-event objective, held-out tasks, the LiNeS trade-off curve when searched), a comparison with another model when
`kit evaluate --compare` gave one, and subgroups (sex, age band) with their sizes.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from typing import Any

from kit import __version__

SECTIONS = ("Model card", "Metrics", "Calibration", "Forgetting", "Subgroups", "Limitations")
INTENDED_USE = (
    "Risk estimates for the tasks below, from a patient's coded record up to the prediction time, to support (not "
    "replace) professional review: ranking worklists and flagging records for attention. Not a diagnosis. Valid only "
    "for populations and coding practices like the training data; re-evaluate with `kit evaluate` before use elsewhere."
)
LIMITATIONS = (
    "Metrics come from one population's held-out subjects; intervals are a percentile bootstrap over subjects (each "
    "subject's samples are resampled together, as they are not independent). Subgroups with few samples or a single "
    "outcome give undefined or wide estimates. Calibration was fit on the validation split and can drift with "
    "prevalence or coding changes. Labels come from coded events (no chart review), so they carry coding errors. "
    "The count-feature baseline is a sanity bar, not the best possible classical model."
)


def _num(v: Any, digits: int = 3) -> str:
    if v is None or isinstance(v, str):
        return "-" if v is None else v
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "-"
    return "n/a" if math.isnan(f) else f"{f:.{digits}f}"


def _metric(block: dict | None, key: str) -> str:
    if not block or key not in block:
        return "-"
    v = block[key]
    if not isinstance(v, dict):
        return _num(v)
    lo, hi = (v.get("ci95") or [None, None])[:2]
    ci = f" [{_num(lo, 2)}, {_num(hi, 2)}]" if lo is not None and _num(lo) != "n/a" else ""
    return _num(v.get("value")) + ci


def _prevalence(p: Any) -> str:
    if isinstance(p, list):
        return "per class: " + ", ".join(_num(x, 2) for x in p[:8]) + (" ..." if len(p) > 8 else "")
    return _num(p)


# ---------------------------------------------------------------- figures


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def reliability_figure(name: str, entry: dict) -> str | None:
    rel = entry.get("reliability")
    if not rel:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.3), sharey=True)
    for ax, key, title in ((axes[0], "before", "before calibration"), (axes[1], "after", "after calibration")):
        bins = rel.get(key) or []
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
        if bins:
            ax.scatter([b["confidence"] for b in bins], [b["frequency"] for b in bins],
                       s=[12 + 140 * b["n"] / max(1, max(x["n"] for x in bins)) for b in bins], color="#2b6cb0", alpha=0.8)
            ax.plot([b["confidence"] for b in bins], [b["frequency"] for b in bins], color="#2b6cb0", lw=1)
        ece = entry.get("uncalibrated", {}).get("ece") if key == "before" else (entry.get("model", {}).get("ece") or {}).get("value")
        ax.set_title(f"{title}\nECE {_num(ece)}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("mean predicted probability", fontsize=8)
    axes[0].set_ylabel("observed frequency", fontsize=8)
    fig.suptitle(name, fontsize=10, y=1.06)
    return _png(fig)


def baseline_figure(tasks: dict[str, dict]) -> str | None:
    rows = [(n, t) for n, t in tasks.items() if (t.get("model") or {}).get("auroc") and t.get("baseline")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.2, 0.5 + 0.45 * len(rows)))
    y = np.arange(len(rows))
    for off, who, color in ((-0.18, "model", "#2b6cb0"), (0.18, "baseline", "#a0aec0")):
        vals, errs = [], [[], []]
        for _, t in rows:
            m = t[who].get("auroc", {})
            v = m.get("value")
            v = float("nan") if v is None else float(v)
            lo, hi = (m.get("ci95") or [None, None])[:2]
            vals.append(v)
            # A percentile interval need not contain the point estimate (few subjects): clip, never a negative bar.
            errs[0].append(0 if lo is None or math.isnan(float(lo)) or math.isnan(v) else max(0.0, v - float(lo)))
            errs[1].append(0 if hi is None or math.isnan(float(hi)) or math.isnan(v) else max(0.0, float(hi) - v))
        ax.barh(y + off, np.nan_to_num(vals), height=0.34, xerr=errs, color=color, label=who, capsize=2)
    ax.axvline(0.5, color="grey", ls=":", lw=1)
    ax.set_yticks(y, [n for n, _ in rows], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("test AUROC (95% CI)")
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not math.isnan(float(v))


def lines_figure(lines: dict | None) -> str | None:
    """The LiNeS trade-off: validation task score against forgetting per (alpha, beta), the chosen point ringed."""
    curve = [p for p in (lines or {}).get("curve") or [] if _finite(p.get("task_score"))]
    if not curve:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["forgetting"] if _finite(p.get("forgetting")) else 0.0 for p in curve]
    ys = [p["task_score"] for p in curve]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.scatter(xs, ys, c=[p["alpha"] for p in curve], cmap="viridis", vmin=0, vmax=1, s=28, zorder=3)
    for p, x, y in zip(curve, xs, ys, strict=True):
        ax.annotate(f"{p['alpha']:g},{p['beta']:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    chosen = (lines or {}).get("curve", [])[(lines or {}).get("chosen", -1)] if (lines or {}).get("curve") else None
    if chosen and _finite(chosen.get("task_score")):
        cx = chosen["forgetting"] if _finite(chosen.get("forgetting")) else 0.0
        ax.scatter([cx], [chosen["task_score"]], s=160, facecolors="none", edgecolors="#c53030", lw=1.5, zorder=4,
                   label=f"chosen (alpha={chosen['alpha']:g}, beta={chosen['beta']:g})")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xlabel("forgetting: next-event loss increase over the base (validation)", fontsize=8)
    ax.set_ylabel("validation task score", fontsize=8)
    ax.set_title("LiNeS trade-off (labels: alpha,beta)", fontsize=9)
    return _png(fig)


# ---------------------------------------------------------------- document model


def _rows_metrics(tasks: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    head = ["task", "type", "n", "prevalence", "AUROC", "AUPRC / acc.", "Brier", "ECE (15 bins)", "ECE (equal mass)",
            "threshold", "F1", "sensitivity", "specificity", "baseline AUROC", "baseline AUPRC / acc.", "GBT AUROC"]
    rows = []
    for name, t in tasks.items():
        m, b = t.get("model"), t.get("baseline")
        second = "auprc" if t.get("type") in ("binary", "multilabel") else "accuracy"
        thr = (t.get("threshold") or {}).get("value")
        rows.append([name, t.get("type", "-"), str(t.get("n", 0)), _prevalence(t.get("prevalence")), _metric(m, "auroc"),
                     _metric(m, second), _metric(m, "brier"), _metric(m, "ece"), _metric(m, "ece_equal_mass"), _num(thr),
                     _metric(m, "f1"), _metric(m, "sensitivity"), _metric(m, "specificity"), _metric(b, "auroc"),
                     _metric(b, second), _metric(t.get("baseline_gbt"), "auroc")])
    return head, rows


def _rows_calibration(tasks: dict[str, dict], calibration: dict) -> tuple[list[str], list[list[str]]]:
    head = ["task", "method", "temperature", "threshold (rule)", "val n", "val ECE before", "val ECE after",
            "test ECE before", "test ECE after", "test Brier before", "test Brier after", "note"]
    rows = []
    for name, c in (calibration.get("tasks") or {}).items():
        t = tasks.get(name, {})
        val = c.get("val") or {}
        thr = f"{_num(c.get('threshold'))} ({c.get('threshold_rule')})" if "threshold" in c else "-"
        rows.append([name, c.get("method", "-"), _num(c.get("temperature"), 2), thr, str(val.get("n", 0)),
                     _num(val.get("ece_before")), _num(val.get("ece_after")), _num((t.get("uncalibrated") or {}).get("ece")),
                     _metric(t.get("model"), "ece"), _num((t.get("uncalibrated") or {}).get("brier")),
                     _metric(t.get("model"), "brier"), c.get("note", "")])
    return head, rows


def _rows_subgroups(tasks: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    head = ["task", "subgroup", "value", "n", "prevalence", "AUROC", "AUPRC / acc.", "Brier", "ECE"]
    rows = []
    for name, t in tasks.items():
        second = "auprc" if t.get("type") in ("binary", "multilabel") else "accuracy"
        for group, values in (t.get("subgroups") or {}).items():
            for value, s in values.items():
                rows.append([name, group, value, str(s.get("n")), _prevalence(s.get("prevalence")), _metric(s, "auroc"),
                             _metric(s, second), _num(s.get("brier")), _num(s.get("ece"))])
    return head, rows


def _with_ci(value: Any, ci: list | None) -> str:
    return _metric({"v": {"value": value, "ci95": ci or [None, None]}}, "v")


def _rows_forgetting(forgetting: dict | None) -> tuple[list[str], list[list[str]]]:
    head = ["measure", "before finetuning", "after finetuning", "change"]
    rows = []
    for key, v in ((forgetting or {}).get("next_event") or {}).items():
        if isinstance(v, dict) and "before" in v:
            rows.append([f"next-event {key}", _num(v["before"]), _num(v["after"]),
                         _num(v["after"] - v["before"]) if v["before"] is not None else "-"])
    for task, v in ((forgetting or {}).get("held_out_tasks") or {}).items():
        label = f"{task} {str(v.get('metric', '')).upper()} (held out, probe; n={v.get('n_test', '-')})"
        if "before" not in v:
            rows.append([label, "-", "-", v.get("note", "-")])
            continue
        rows.append([label, _with_ci(v.get("before"), v.get("before_ci95")), _with_ci(v.get("after"), v.get("after_ci95")),
                     _with_ci(v.get("change"), v.get("change_ci95"))])
    return head, rows


def _rows_lines(lines: dict | None) -> tuple[list[str], list[list[str]]]:
    head = ["alpha", "beta", "validation task score", "next-event loss", "forgetting", "chosen"]
    rows = []
    for i, p in enumerate((lines or {}).get("curve") or []):
        rows.append([f"{p['alpha']:g}", f"{p['beta']:g}", _num(p.get("task_score")), _num(p.get("next_event_loss")),
                     _num(p.get("forgetting")), "yes" if i == lines.get("chosen") else ""])
    return head, rows


def _lines_text(lines: dict | None) -> str:
    if not lines:
        return ""
    return (f"LiNeS scaling: layer l of L keeps alpha + beta * l / (L - 1) of its finetuning update (embeddings and LM "
            f"head alpha). Chosen on the validation split: alpha={lines['alpha']:g}, beta={lines['beta']:g} "
            f"({lines.get('rule', '')}); the shipped model and every metric above use it.")


def _rows_comparison(comparison: dict | None) -> tuple[list[str], list[list[str]]]:
    c = comparison or {}
    this, other = c.get("this_label", "this model"), c.get("other_label", "other model")
    head = ["task", "metric", "n", this, other, "difference (95% CI)", "verdict"]
    rows = []
    for name, t in (c.get("tasks") or {}).items():
        rows.append([name, str(t.get("metric", "-")).upper(), str(t.get("n", "-")), _metric(t, "this"),
                     _metric(t, "other"), _metric(t, "difference"), t.get("verdict", "-")])
    return head, rows


def _cohort_rows(metrics: dict) -> tuple[list[str], list[list[str]]]:
    head = ["task", "type", "test samples", "prevalence", "prediction times (test)"]
    rows = []
    for name, t in (metrics.get("tasks") or {}).items():
        span = t.get("time_span") or ["-", "-"]
        rows.append([name, t.get("type", "-"), str(t.get("n", 0)), _prevalence(t.get("prevalence")), f"{span[0]} to {span[1]}"])
    return head, rows


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "_none_\n"
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _html_table(head: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _facts(metrics: dict) -> list[tuple[str, str]]:
    data = metrics.get("data") or {}
    return [
        ("vertical", str(metrics.get("vertical", "-"))),
        ("kit version", str(metrics.get("kit_version", __version__))),
        ("model", f"{metrics.get('backbone', '-')} ({metrics.get('size', '-')}), LoRA: {metrics.get('lora', '-')}"),
        ("evaluated on", f"{metrics.get('split', '-')} split of {metrics.get('dataset', '-')}"),
        ("subjects per split", json.dumps(metrics.get("subjects"))),
        ("data time span", f"{data.get('start', '-')} to {data.get('end', '-')}"),
        ("bundle", str(metrics.get("bundle", "-"))),
    ]


def render_report(metrics: dict, calibration: dict | None = None, *, title: str | None = None,
                  figures: bool = True) -> dict[str, str]:
    """{'report/index.html': ..., 'report/report.md': ..., 'report/metrics.json': ...} from a metrics dict.

    `figures=False` leaves the (slow) figures out of index.html; the Markdown never has them."""
    calibration = calibration or {}
    tasks = metrics.get("tasks") or {}
    forgetting = metrics.get("forgetting")
    title = title or f"kit {metrics.get('vertical', '')} model report"
    lines, comparison = metrics.get("lines"), metrics.get("comparison")
    tables = {
        "cohorts": _cohort_rows(metrics),
        "metrics": _rows_metrics(tasks),
        "calibration": _rows_calibration(tasks, calibration),
        "forgetting": _rows_forgetting(forgetting),
        "lines": _rows_lines(lines),
        "comparison": _rows_comparison(comparison),
        "subgroups": _rows_subgroups(tasks),
    }
    sections = [*SECTIONS[:4], *(["Comparison"] if comparison else []), *SECTIONS[4:]]
    draw = figures
    figures = {"baseline": baseline_figure(tasks) if draw else None, "lines": lines_figure(lines) if draw else None}
    held_note = (forgetting or {}).get("held_out_note", "")
    probe_note = ("Held-out tasks were left out of finetuning; each is scored by a linear probe fit on train-split "
                  "features of the frozen model, the same procedure before and after finetuning; the change has a "
                  "paired subject-level bootstrap interval." if (forgetting or {}).get("held_out_tasks") else "")
    comparison_note = (comparison or {}).get("note", "")
    reliability = {n: reliability_figure(n, t) for n, t in tasks.items()} if draw else {}
    forgetting_note = (forgetting or {}).get("note") or ("" if forgetting else
                                                         "Forgetting was not measured for this bundle.")

    md = [f"# {title}", "", "## Model card", "", *[f"- **{k}**: {v}" for k, v in _facts(metrics)], "",
          "### Intended use", "", INTENDED_USE, "", "### Tasks and cohorts", "", _md_table(*tables["cohorts"]),
          "## Metrics", "", "Test metrics with 95% subject-level bootstrap intervals; probabilities are calibrated.", "",
          _md_table(*tables["metrics"]), "## Calibration", "", _md_table(*tables["calibration"]),
          "Reliability diagrams are in index.html.", "", "## Forgetting", "", forgetting_note, "",
          *([probe_note, ""] if probe_note else []), *([held_note, ""] if held_note else []),
          _md_table(*tables["forgetting"]),
          *(["### LiNeS trade-off", "", _lines_text(lines), "", _md_table(*tables["lines"])] if lines else []),
          *(["## Comparison", "", comparison_note, "", _md_table(*tables["comparison"])] if comparison else []),
          "## Subgroups", "", _md_table(*tables["subgroups"]),
          "## Limitations", "", LIMITATIONS, ""]

    def img(b64: str | None, alt: str) -> str:
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">' if b64 else ""

    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _facts(metrics))
    rel_imgs = "".join(f"<figure>{img(b, f'reliability diagram {n}')}</figure>" for n, b in reliability.items() if b)
    body = f"""
<h1>{html.escape(title)}</h1>
<nav>{" · ".join(f'<a href="#{s.lower().replace(" ", "-")}">{s}</a>' for s in sections)}</nav>
<section id="model-card"><h2>Model card</h2><table class="facts">{facts}</table>
<h3>Intended use</h3><p>{html.escape(INTENDED_USE)}</p>
<h3>Tasks and cohorts</h3>{_html_table(*tables["cohorts"])}</section>
<section id="metrics"><h2>Metrics</h2><p>Test metrics with 95% subject-level bootstrap intervals; probabilities are calibrated.
The count-feature logistic regression baseline is trained on the same splits.</p>
{_html_table(*tables["metrics"])}<figure>{img(figures["baseline"], "model versus baseline AUROC")}</figure></section>
<section id="calibration"><h2>Calibration</h2><p>Fit on the {html.escape(str(calibration.get("fit_on", "validation")))} split;
decision thresholds chosen there by {html.escape(str(calibration.get("threshold_rule", "-")))}.</p>
{_html_table(*tables["calibration"])}<div class="figs">{rel_imgs}</div></section>
<section id="forgetting"><h2>Forgetting</h2><p>{html.escape(forgetting_note)}</p>
{f"<p>{html.escape(probe_note)}</p>" if probe_note else ""}{f"<p>{html.escape(held_note)}</p>" if held_note else ""}
{_html_table(*tables["forgetting"])}
{f'<h3>LiNeS trade-off</h3><p>{html.escape(_lines_text(lines))}</p>' if lines else ""}
<figure>{img(figures["lines"], "LiNeS trade-off: validation task score versus forgetting")}</figure>
{_html_table(*tables["lines"]) if lines else ""}</section>
{f'<section id="comparison"><h2>Comparison</h2><p>{html.escape(comparison_note)}</p>{_html_table(*tables["comparison"])}</section>' if comparison else ""}
<section id="subgroups"><h2>Subgroups</h2>{_html_table(*tables["subgroups"])}</section>
<section id="limitations"><h2>Limitations</h2><p>{html.escape(LIMITATIONS)}</p></section>
"""
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#1a202c}"
             "table{border-collapse:collapse;margin:.5em 0;font-size:13px}td,th{border:1px solid #cbd5e0;padding:3px 6px;"
             "text-align:left}thead th{background:#edf2f7}.facts th{background:#f7fafc}figure{display:inline-block;margin:.5em}"
             "img{max-width:100%}nav a{margin-right:.3em}section{margin-top:1.5em}")
    page = (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>")
    return {
        "report/index.html": page,
        "report/report.md": "\n".join(md),
        "report/metrics.json": json.dumps({"metrics": metrics, "calibration": calibration}, indent=1, default=str),
    }


def model_card_markdown(metrics: dict, calibration: dict | None = None) -> str:
    """model_card.md: the report's Markdown (the card, metrics, calibration, forgetting, subgroups, limitations)."""
    return render_report(metrics, calibration, figures=False)["report/report.md"]
