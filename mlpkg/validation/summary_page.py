"""The validation summary of one batch: a self-contained HTML page (Jinja2) that opens offline.

Great Expectations' Data Docs load Bootstrap and jQuery from CDNs, so without a network their
pages render empty. This page says what an operator needs from them, with inline styles and no
script: the verdict, each file with its rows checked, every broken rule (column, rule, failing
count, the offending rows as the file has them) and warning, and the expectations that ran with
their outcome. The gate writes it for every batch it validates, passed or refused, to
``<data docs>/summaries/<batch>.html``, and a refused batch gets a copy in its quarantine folder.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jinja2 import Environment, select_autoescape

from mlpkg.validation.contract import Failure, ValidationReport

SUMMARY_DIR = "summaries"
QUARANTINE_SUMMARY_FILE = "validation_summary.html"

TEMPLATE = """{% macro finding(kind, f) -%}
<h3 style="font-size:.95rem;margin:.6rem 0 .2rem">{{ kind }}: <code>{{ f.expectation }}</code>
{%- if f.column %} on column <b>{{ f.column }}</b>{% endif %} — {{ f.failing_count }} failing</h3>
<p style="margin:.1rem 0">{{ f.rule_text }}</p>
{% if f.rows %}<table><thead><tr>{% for h in f.header %}<th>{{ h }}</th>{% endfor %}</tr></thead><tbody>
{% for row in f.rows %}<tr>{% for v in row %}<td>{{ v }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>
{% endif %}
{%- endmacro %}<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>CouponOps · batch {{ batch }} · {{ verdict }}</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:1040px;color:#222;
     padding:0 1rem;line-height:1.4}
h1{margin-bottom:.2rem} .sub{color:#666;margin-top:0}
.verdict{display:inline-block;padding:.15rem .6rem;border-radius:6px;font-weight:600}
.passed{background:#e3f5e1;color:#17611b} .rejected{background:#fde2e1;color:#8a1c14}
.warn{background:#fff4d6;color:#7a5300}
section.table{border:1px solid #ddd;border-radius:8px;padding:.6rem 1rem;margin:1rem 0}
section.table h2{font-size:1.1rem;margin:.2rem 0}
table{border-collapse:collapse;font-size:.88rem;margin:.4rem 0 .8rem}
td,th{border-bottom:1px solid #e3e3e3;padding:.25rem .55rem;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right} code{font-size:.85rem}
.muted{color:#777} details{margin:.4rem 0}
</style></head><body>
<h1>Batch {{ batch }} <span class="verdict {{ 'passed' if passed else 'rejected' }}">{{ verdict }}</span></h1>
<p class="sub">Validated {{ validated_at }} · {{ reports|length }} file(s), {{ total_rows }} rows checked
{%- if quarantine %} · moved to <code>{{ quarantine }}</code>{% endif %}</p>
{% if batch_warnings %}<p><span class="verdict warn">warnings</span></p><ul>
{% for w in batch_warnings %}<li>{{ w }}</li>{% endfor %}</ul>{% endif %}
{% for r in reports %}
<section class="table" id="{{ r.table }}">
<h2>{{ r.name }} <span class="verdict {{ 'passed' if r.passed else 'rejected' }}">
{{- 'passed' if r.passed else r.failures|length ~ ' rule(s) broken' }}</span></h2>
<p class="muted">table <b>{{ r.table }}</b> · {{ r.rows }} rows checked · <code>{{ r.source }}</code></p>
{% for f in r.failures %}{{ finding('Broken rule', f) }}{% endfor %}
{% for f in r.warnings %}{{ finding('Warning', f) }}{% endfor %}
{% if r.expectations %}<details><summary>{{ r.expectations|length }} expectation(s) ran
({{ r.expectations|selectattr('success')|list|length }} passed)</summary>
<table><thead><tr><th>Expectation</th><th>Column</th><th>Outcome</th><th>Unexpected</th></tr></thead><tbody>
{% for e in r.expectations %}<tr><td><code>{{ e.type }}</code></td><td>{{ e.column }}</td>
<td>{{ 'passed' if e.success else 'failed' }}</td><td class="num">{{ e.unexpected }}</td></tr>{% endfor %}
</tbody></table></details>{% endif %}
</section>{% endfor %}
<p class="muted">Great Expectations' own Data Docs for this batch are under <code>{{ docs }}</code>; they need
a network for their styles and scripts.</p>
</body></html>
"""

_env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
_page = _env.from_string(TEMPLATE)


def _cell(value: Any) -> str:  # noqa: ANN401 - any sample value
    """Show a sample value as the file has it: strings quoted (so blanks and padding show)."""
    if value is None:
        return "(empty)"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _finding(f: Failure, max_rows: int) -> dict[str, Any]:
    rows = f.sample_rows[:max_rows]
    position = [k for k in ("_line", "_row") if any(k in r for r in rows)]
    columns = sorted({k for r in rows for k in r if not k.startswith("_")})
    header = [{"_line": "line", "_row": "row"}[k] for k in position] + columns
    return {
        "expectation": f.expectation,
        "column": f.column,
        "rule_text": f.rule_text,
        "failing_count": f"{f.failing_count:,}",
        "header": header,
        "rows": [[r.get(k, "") for k in position] + [_cell(r.get(c)) for c in columns] for r in rows],
    }


def _expectations(gx_result: Any) -> list[dict[str, Any]]:  # noqa: ANN401 - a GX suite result
    out = []
    for item in getattr(gx_result, "results", None) or []:
        config = getattr(item, "expectation_config", None)
        kwargs = dict(getattr(config, "kwargs", {}) or {})
        column = kwargs.get("column") or "+".join(kwargs.get("column_list") or []) or ""
        result = getattr(item, "result", {}) or {}
        unexpected = result.get("unexpected_count")
        out.append({
            "type": getattr(config, "type", "?"),
            "column": column,
            "success": bool(getattr(item, "success", False)),
            "unexpected": "" if unexpected is None else f"{int(unexpected):,}",
        })
    return out


def render(batch: str, reports: Mapping[str, ValidationReport], *, warnings: Sequence[str] = (),
           quarantine: Path | None = None, docs: Path | None = None, max_rows: int = 10,
           validated_at: dt.datetime | None = None) -> str:
    """Return the summary page of one validated batch.

    Args:
        batch: The batch's name.
        reports: The gate's reports by table.
        warnings: Batch-level warnings (files ignored and the like).
        quarantine: Where a refused batch was moved.
        docs: The GX Data Docs index of the run, named at the bottom.
        max_rows: Offending rows shown per broken rule.
        validated_at: When the gate ran (default: now).
    """
    rows = []
    for name, report in reports.items():
        is_file = Path(report.source).suffix != "" and name != "batch"
        rows.append({
            "table": report.table,
            "name": Path(report.source).name if is_file else report.table,
            "source": report.source,
            "rows": f"{report.row_count:,}",
            "passed": report.success,
            "failures": [_finding(f, max_rows) for f in report.failures],
            "warnings": [_finding(w, max_rows) for w in report.warnings],
            "expectations": _expectations(report.gx_result),
        })
    passed = all(r.success for r in reports.values())
    stamp = (validated_at or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%d %H:%M:%S UTC")
    return _page.render(
        batch=batch, verdict="passed" if passed else "rejected", passed=passed, validated_at=stamp,
        reports=rows, total_rows=f"{sum(r.row_count for r in reports.values()):,}",
        batch_warnings=list(warnings), quarantine=quarantine, docs=docs or "(not built)",
    )


def write(
    data_docs_dir: Path | None, batch: str, reports: Mapping[str, ValidationReport], *,
    warnings: Sequence[str] = (), quarantine: Path | None = None, docs: Path | None = None,
) -> Path | None:
    """Write the batch's summary under ``<data_docs_dir>/summaries/`` (and into its quarantine folder).

    Returns:
        The summary's path under the Data Docs folder (the quarantine copy when there is no such
        folder), or ``None`` when there is neither.
    """
    html = render(batch, reports, warnings=warnings, quarantine=quarantine, docs=docs)
    written: Path | None = None
    if quarantine is not None:
        written = Path(quarantine) / QUARANTINE_SUMMARY_FILE
        written.write_text(html, encoding="utf-8")
    if data_docs_dir is not None:
        folder = Path(data_docs_dir) / SUMMARY_DIR
        folder.mkdir(parents=True, exist_ok=True)
        written = folder / f"{batch or 'batch'}.html"
        tmp = written.with_suffix(".html.tmp")
        tmp.write_text(html, encoding="utf-8")
        tmp.replace(written)
    return written
