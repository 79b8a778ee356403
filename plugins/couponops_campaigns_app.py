"""The Campaigns view: a FastAPI app that the CouponOps Airflow plugin mounts on Airflow's API server.

``GET <prefix>/campaigns`` is a server-rendered page (Jinja2, inline CSS, no scripts, no CDN) that
lists the campaigns CouponOps ran with links to their Airflow run, MLflow training run and model
version, HTML report and the Data Docs of the batch they saw; ``GET <prefix>/api/campaigns`` is
the same as JSON; ``GET <prefix>/files/{reports,data_docs}/...`` serves those static files from
the state folder. Airflow mounts plugin apps without authentication, so every route requires
what Airflow's own API requires: a valid Airflow JWT (the UI's session cookie or a bearer token)
of a user allowed to read the runs of ``couponops_allocate``.

Light imports only: Airflow imports this module whenever it loads plugins. The rows come from
:func:`mlpkg.campaign_runs.campaign_runs`, imported per request.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from jinja2 import Environment, select_autoescape

from mlpkg import mlflow_links

URL_PREFIX = "/couponops"
#: Reading the Campaigns view needs the right to read this DAG's runs (campaigns are its runs).
ALLOCATE_DAG_ID = "couponops_allocate"
#: The folders of the state folder served under ``files/``: name -> Settings property.
FILE_ROOTS = {"reports": "reports_dir", "data_docs": "data_docs_dir"}

_bearer = HTTPBearer(auto_error=False)


def mlflow_run_url(mlflow_ui_url: str | None, run_id: str | None) -> str | None:
    """Return the MLflow UI page of a run (``None`` without a UI URL or a run)."""
    return mlflow_links.run_url(mlflow_ui_url, run_id)


def model_version_url(mlflow_ui_url: str | None, model_name: str | None, version: str | None) -> str | None:
    """Return the MLflow UI page of a registered model version (``None`` when something is missing)."""
    return mlflow_links.model_version_url(mlflow_ui_url, model_name, version)


async def airflow_user(
    request: Request, bearer: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> Any:  # noqa: ANN401 - the auth manager's user class
    """Authenticate as Airflow's API does and require read access to the allocation DAG's runs.

    Raises:
        HTTPException: 401 without a token or with an expired one, 403 for an invalid token or a
            user who may not read ``couponops_allocate``'s runs.
    """
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.api_fastapi.core_api.security import get_user

    user = await get_user(request, _oauth_token=None, bearer_credentials=bearer)
    allowed = get_auth_manager().is_authorized_dag(
        method="GET", access_entity=DagAccessEntity.RUN, details=DagDetails(id=ALLOCATE_DAG_ID), user=user
    )
    if not allowed:
        raise HTTPException(status_code=403, detail="Forbidden")
    return user


def _default_settings():  # noqa: ANN202 - mlpkg.config.Settings
    from mlpkg.config import get_settings

    return get_settings()


def _roots(request: Request) -> tuple[str, str]:
    """Return the app's own path prefix and Airflow's, from where the request was mounted."""
    app_root = request.scope.get("root_path", "").rstrip("/")
    airflow_root = app_root[: -len(URL_PREFIX)] if app_root.endswith(URL_PREFIX) else ""
    return app_root, airflow_root


def with_links(row: dict, *, app_root: str, airflow_root: str, mlflow_ui_url: str | None) -> dict:
    """Return a campaign row with ``links``: absolute paths or URLs a browser can open."""
    docs = row.get("data_docs") or []
    airflow_run = report = None
    if row.get("dag_id") and row.get("run_id"):
        dag_id, run_id = quote(row["dag_id"], safe=""), quote(row["run_id"], safe="")
        airflow_run = f"{airflow_root}/dags/{dag_id}/runs/{run_id}"
    if row.get("report_path"):
        report = f"{app_root}/files/reports/{quote(row['report_path'])}"
    return {
        **row,
        "links": {
            "airflow_run": airflow_run,
            "mlflow_run": mlflow_run_url(mlflow_ui_url, row.get("mlflow_run_id")),
            "model_version": model_version_url(
                mlflow_ui_url, row.get("model_name"), row.get("model_version")
            ),
            "report": report,
            "data_docs": [
                {"table": d["table"], "href": f"{app_root}/files/data_docs/{quote(d['path'])}"} for d in docs
            ],
        },
    }


def _fmt(value: Any, digits: int = 2) -> str:  # noqa: ANN401 - any number or None
    return "—" if value is None else f"{value:,.{digits}f}"


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CouponOps · Campaigns</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.2em;color:#1a202c;background:#fff}
h1{font-size:1.3em;margin:0 0 .3em}p.lead{color:#4a5568;margin:0 0 1em;font-size:.9em}
table{border-collapse:collapse;font-size:.82em;width:100%}
th,td{border-bottom:1px solid #e2e8f0;padding:.45em .55em;text-align:left;vertical-align:top}
th{background:#f7fafc;position:sticky;top:0}td.num{text-align:right;white-space:nowrap}
a{color:#2b6cb0}.muted{color:#718096}.tag{display:inline-block;border-radius:3px;padding:0 .35em;
font-size:.85em;background:#edf2f7;margin-right:.2em}.tag.champion{background:#c6f6d5}
.tag.provisional{background:#fefcbf}.tag.measured{background:#bee3f8}
details summary{cursor:pointer}ul{margin:.2em 0;padding-left:1.1em}
@media (prefers-color-scheme: dark){body{background:#1a202c;color:#e2e8f0}th{background:#2d3748}
th,td{border-color:#4a5568}a{color:#90cdf4}.tag{background:#4a5568}.tag.champion{background:#276749}
.tag.provisional{background:#744210}.tag.measured{background:#2c5282}}
</style></head><body>
<h1>Campaigns</h1>
<p class="lead">Every campaign CouponOps allocated, newest first. Spend: committed = the allocation's
expected cost; realised = coupons redeemed + messages sent. Incremental conversions and ROI are the
model policy's, measured against the random control group (95% interval).
{% if selected %} Showing <b>{{ selected }}</b> ·
<a href="{{ app_root }}/campaigns">all campaigns</a>.{% endif %}
</p>
{% if not rows %}<p class="muted">{% if selected %}No campaign {{ selected }}.{% else %}No campaign yet:
run <code>couponops_allocate</code>.{% endif %}</p>{% else %}
<table><thead><tr><th>Campaign</th><th>Created / as of</th><th>Airflow run</th><th>Model</th>
<th>Budget</th><th>Committed</th><th>Realised spend</th><th>Sent</th>
<th>Incremental conversions (95% CI)</th><th>ROI</th><th>Report</th><th>Data Docs</th></tr></thead><tbody>
{% for r in rows %}<tr id="{{ r.campaign_id }}">
<td><b>{{ r.campaign_id }}</b><br><span class="tag {{ r.status }}">{{ r.status }}</span>
{%- if r.provisional %}<span class="tag provisional">provisional</span>{% endif %}
<br><span class="muted">{{ r.objective }}</span></td>
<td>{{ r.created_at }}<br><span class="muted">as of {{ r.as_of }}</span></td>
<td>{% if r.links.airflow_run %}<a href="{{ r.links.airflow_run }}"
 target="_top">{{ r.dag_id }}<br>{{ r.run_id }}</a>
{%- else %}<span class="muted">{{ r.run_key or "—" }}</span>{% endif %}</td>
<td>{% if r.model_version %}{% if r.links.model_version %}<a href="{{ r.links.model_version }}"
 target="_blank" rel="noopener">{{ r.model_name }} v{{ r.model_version }}</a>{% else %}{{ r.model_name }}
 v{{ r.model_version }}{% endif %}
{%- for a in r.aliases %} <span class="tag {{ a }}">@{{ a }}</span>{% endfor %}
{%- if r.links.mlflow_run %}<br><a href="{{ r.links.mlflow_run }}" target="_blank"
 rel="noopener">MLflow run</a>{% endif %}
{%- else %}<span class="muted">cold start (no model)</span>{% endif %}</td>
<td class="num">{{ fmt(r.budget) }}</td><td class="num">{{ fmt(r.committed) }}</td>
<td class="num">{{ fmt(r.realised_cost) }}</td><td class="num">{{ r.sent }}</td>
<td class="num">{% if r.incremental_conversions is none %}<span class="muted">not measured</span>{% else %}
{{ fmt(r.incremental_conversions, 1) }}<br><span class="muted">[{{ fmt(r.incremental_conversions_ci[0], 1) }},
 {{ fmt(r.incremental_conversions_ci[1], 1) }}]</span>{% endif %}</td>
<td class="num">{{ fmt(r.roi) }}</td>
<td>{% if r.links.report %}<a href="{{ r.links.report }}">report</a>
{%- else %}<span class="muted">—</span>{% endif %}</td>
<td>{% if r.links.data_docs %}<details><summary>batch {{ r.batch }}</summary><ul>
{% for d in r.links.data_docs %}<li><a href="{{ d.href }}">{{ d.table }}</a></li>{% endfor %}</ul></details>
{%- elif r.batch %}batch {{ r.batch }}{% else %}<span class="muted">—</span>{% endif %}</td>
</tr>{% endfor %}</tbody></table>{% endif %}
<script src="{{ app_root }}/static/links.js"></script>
</body></html>
"""

#: Airflow embeds the view in a frame sandboxed without ``allow-popups`` or ``allow-top-navigation``,
#: so a plain ``target="_blank"`` (MLflow) or ``target="_top"`` (the Airflow run) link would do
#: nothing there. The frame is same-origin with Airflow's page: the script follows such a link
#: through an anchor of the top page, whose navigations the sandbox does not restrict. Opened
#: outside Airflow (``/couponops/campaigns``), the page is the top window and links work as written.
_LINKS_JS = """(function () {
  if (window.top === window) { return; }
  document.addEventListener("click", function (event) {
    var link = event.target.closest ? event.target.closest("a[target]") : null;
    if (!link || (link.target !== "_blank" && link.target !== "_top")) { return; }
    var top;
    try { top = window.top.document; } catch (err) { return; }
    event.preventDefault();
    var proxy = top.createElement("a");
    proxy.href = link.href;
    proxy.target = link.target === "_blank" ? "_blank" : "_self";
    proxy.rel = "noopener";
    proxy.style.display = "none";
    top.body.appendChild(proxy);
    proxy.click();
    proxy.remove();
  });
})();
"""

_templates = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
_page = _templates.from_string(_PAGE)
# The page loads nothing from elsewhere and runs only its own link script; MLflow opens in its own tab.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; script-src 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
}


def _safe_file(root: Path, relative: str) -> Path:
    """Resolve ``relative`` inside ``root``; anything outside it, hidden or missing is a 404."""
    parts = Path(relative).parts
    if not relative or "\x00" in relative or Path(relative).is_absolute() or any(
        p in ("..", "") or p.startswith((".", "_")) for p in parts
    ):
        raise HTTPException(status_code=404, detail="Not Found")
    base = root.resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base) or not target.is_file():
        raise HTTPException(status_code=404, detail="Not Found")
    return target


def create_app(settings_factory: Callable[[], Any] | None = None) -> FastAPI:
    """Build the Campaigns app; ``settings_factory`` returns the CouponOps settings for each request.

    Args:
        settings_factory: Default: :func:`mlpkg.config.get_settings` (the ``COUPONOPS_*``
            variables of the API server's process).
    """
    settings_of = settings_factory or _default_settings
    app = FastAPI(
        title="CouponOps campaigns",
        description="The campaigns CouponOps ran, with links to what produced and measured them.",
        dependencies=[Depends(airflow_user)],
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    def rows(request: Request, campaign: str | None) -> list[dict]:
        from mlpkg.campaign_runs import campaign_runs

        settings = settings_of()
        app_root, airflow_root = _roots(request)
        found = [
            with_links(r, app_root=app_root, airflow_root=airflow_root, mlflow_ui_url=settings.mlflow_ui_url)
            for r in campaign_runs(settings)
        ]
        return [r for r in found if campaign is None or r["campaign_id"] == campaign]

    @app.get("/campaigns", response_class=HTMLResponse)
    def campaigns_page(request: Request, campaign: str | None = None) -> HTMLResponse:
        """List the campaigns as an HTML page (``?campaign=ID`` shows one)."""
        found = rows(request, campaign)
        html = _page.render(rows=found, selected=campaign, app_root=_roots(request)[0], fmt=_fmt)
        return HTMLResponse(html, headers=_PAGE_HEADERS)

    @app.get("/static/links.js")
    def links_script() -> Response:
        """Serve the page's link script (see ``_LINKS_JS``)."""
        return Response(
            _LINKS_JS,
            media_type="text/javascript",
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=3600"},
        )

    @app.get("/api/campaigns")
    def campaigns_json(request: Request, campaign: str | None = None) -> dict:
        """List the campaigns as JSON, each with its ``links``."""
        found = rows(request, campaign)
        return {"campaigns": found, "total_entries": len(found)}

    @app.get("/files/{kind}/{path:path}")
    def state_file(kind: str, path: str) -> FileResponse:
        """Serve a report or Data Docs file from the state folder (nothing outside those folders)."""
        if kind not in FILE_ROOTS:
            raise HTTPException(status_code=404, detail="Not Found")
        root = getattr(settings_of(), FILE_ROOTS[kind])
        return FileResponse(_safe_file(root, path), headers={"X-Content-Type-Options": "nosniff"})

    return app


app = create_app()
