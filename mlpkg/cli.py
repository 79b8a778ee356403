"""The ``couponops`` command line: each command calls the same stage function as a DAG task."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mlpkg import stages
from mlpkg.config import get_settings

app = typer.Typer(
    help="CouponOps: uplift-driven coupon allocation with a measured feedback loop.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console()


def _show(title: str, payload) -> None:  # noqa: ANN001 - dict or list of dicts
    """Render a dict (key/value) or a list of dicts (rows) as a rich table."""
    if isinstance(payload, list):
        table = Table(title=title, show_lines=False)
        if not payload:
            console.print(f"[dim]{title}: none[/dim]")
            return
        for col in payload[0]:
            table.add_column(str(col))
        for row in payload:
            table.add_row(*[_fmt(v) for v in row.values()])
    else:
        table = Table(title=title, show_header=False)
        table.add_column("key", style="bold")
        table.add_column("value")
        for key, value in payload.items():
            table.add_row(str(key), _fmt(value))
    console.print(table)


def _fmt(value) -> str:  # noqa: ANN001
    if isinstance(value, float):
        return f"{value:,.4f}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def _clock(settings) -> str:  # noqa: ANN001 - mlpkg.config.Settings
    """Return the product's clock as ISO text, or exit with a hint when there is no data yet."""
    now = stages.product_now(settings)
    if now is None:
        console.print("[red]error:[/red] no batch has been loaded yet; run `couponops ingest` first")
        raise typer.Exit(code=2)
    return now.isoformat()


def _run(fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    """Call a stage with a status spinner and turn known errors into a clean exit."""
    from mlpkg.db.queries import CampaignBusyError
    from mlpkg.validation import DataContractError

    known = (LookupError, FileNotFoundError, ValueError, CampaignBusyError, DataContractError)
    with console.status(f"[bold]{fn.__name__}[/bold] running…"):
        try:
            return fn(*args, **kwargs)
        except known as exc:
            # One unwrapped line per message line; the text is escaped so ids in brackets stay text.
            console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(code=2) from exc


@app.command()
def init() -> None:
    """Create the state folder, migrate the warehouse and create the MLflow experiment."""
    # Settings are read inside _run: a bad value is a one-line error (never echoing a secret).
    settings = _run(get_settings)
    _show("stores", _run(stages.init_stores, settings))


@app.command()
def ingest(
    batch_dir: Annotated[
        Path | None, typer.Argument(help="One batch folder; default: every new batch of the landing zone")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate and report what would change; write and move nothing")
    ] = False,
) -> None:
    """Validate batches against their data contracts and load them into the warehouse."""
    settings = get_settings()
    if dry_run:
        if batch_dir is None:
            console.print("[red]error:[/red] --dry-run needs a BATCH_DIR (one batch folder to check)")
            raise typer.Exit(code=2)
        result = _run(stages.ingest, settings, batch_dir, dry_run=True)
        rows = [{"table": t, **c} for t, c in result["changes"].items()]
        _show(f"dry run of {result['batch']}: what would change (nothing was written)", rows)
        if result["skipped"]:
            skipped = ", ".join(result["skipped"])
            console.print(f"already loaded (same checksum), skipped: {skipped}", markup=False)
        return
    if batch_dir is None:
        result = _run(stages.ingest_landed, settings)
        if result["skipped"]:
            console.print(result["reason"], markup=False)
            return
        _show("ingested", [{"batch": b["drop_id"], "rows": b["rows"]} for b in result["loaded"]])
        return
    _show("ingest", _run(stages.ingest, settings, batch_dir))


@app.command("import-log")
def import_log(
    file: Path,
    spec: Annotated[Path, typer.Option(help="YAML spec: id, treatment, outcome and feature columns")],
) -> None:
    """Validate a campaign log (CSV or Parquet) against its YAML spec and import it for training."""
    result = _run(stages.import_log, get_settings(), file, spec)
    _show(
        f"campaign log {result['name']}",
        {
            "status": result["status"],
            "rows": result["rows"],
            "arms": len(result["arms"]),
            "control rows": f"{result['control_rows']} (label {result['control_label']!r})",
            "propensity": result["propensity"],
            "numeric features": result["features"]["numeric"],
            "categorical features": result["features"]["categorical"],
        },
    )
    _show(
        "rows per arm",
        [
            {
                "arm": arm,
                "rows": n,
                "share": result["arm_share"][arm],
                "cost": result["arm_costs"].get(arm, 0.0),
            }
            for arm, n in result["arms"].items()
        ],
    )
    for warning in result["warnings"]:
        # Plain text: a warning quotes column lists, which rich would read as markup.
        console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False)


@app.command()
def train(log: Annotated[list[str] | None, typer.Option(help="Campaign log(s) to train on")] = None) -> None:
    """Train, track and register a model version, then run the promotion gate."""
    settings = get_settings()
    ctx = stages.RunContext(dag_id="cli", run_id=f"train-{stages.utcnow():%Y%m%dT%H%M%S}")
    result = _run(stages.train, settings, ctx, log_names=log)
    _show("training", {k: v for k, v in result.items() if k != "metrics"})
    _show("test metrics", result.get("metrics", {}))
    decision = _run(
        stages.gate,
        settings,
        model_name=result.get("model_name"),
        model_version=result["model_version"],
        test_frame=result["test_frame"],
        run_id=result["mlflow_run_id"],
    )
    _show("promotion gate", decision)


@app.command()
def promote(
    version: str,
    reason: Annotated[str, typer.Option(help="Why this version becomes champion")] = "promoted by hand",
) -> None:
    """Make VERSION the champion (recorded in `couponops history`)."""
    actor = os.environ.get("USER", "cli")
    _show("promotion", _run(stages.promote, get_settings(), version, actor=actor, reason=reason))


@app.command()
def allocate(
    campaign: Annotated[str | None, typer.Option(help="Campaign id (shop campaigns)")] = None,
    as_of: Annotated[
        str | None, typer.Option(help="Point in time for features (default: the product's clock)")
    ] = None,
    budget: Annotated[float | None, typer.Option(help="Expected-spend cap")] = None,
    objective: Annotated[str | None, typer.Option(help="conversions | revenue | profit")] = None,
    log: Annotated[str | None, typer.Option(help="Imported campaign log whose arms to allocate")] = None,
    customers: Annotated[
        Path | None, typer.Option(help="With --log: customers file (id + feature columns)")
    ] = None,
    out: Annotated[Path, typer.Option(help="With --log: output CSV (customer_id,arm)")] = Path(
        "allocations.csv"
    ),
) -> None:
    """Allocate a shop campaign with the champion, or an imported log's arms to a customers file."""
    settings = get_settings()
    if log:
        if customers is None or budget is None:
            console.print("[red]error:[/red] --log needs --customers FILE and --budget B")
            raise typer.Exit(code=2)
        _show(
            "allocation",
            _run(
                stages.allocate_log,
                settings,
                log_name=log,
                customers_file=customers,
                budget=budget,
                objective=objective or "conversions",
                out=out,
            ),
        )
        return
    if not campaign:
        console.print("[red]error:[/red] give --campaign ID (or --log NAME --customers FILE --budget B)")
        raise typer.Exit(code=2)
    when = as_of or _clock(settings)
    ctx = stages.RunContext(dag_id="cli", run_id=f"allocate-{campaign}")
    _show(
        "allocation",
        _run(
            stages.allocate,
            settings,
            ctx,
            campaign_id=campaign,
            as_of=when,
            budget=budget,
            objective=objective,
        ),
    )


@app.command()
def plan(
    campaign: Annotated[str, typer.Option(help="Campaign id (names the output folder)")],
    as_of: Annotated[
        str | None, typer.Option(help="Point in time for features (default: the product's clock)")
    ] = None,
    objective: Annotated[str | None, typer.Option(help="conversions | revenue | profit")] = None,
    budget: Annotated[
        list[float] | None, typer.Option(help="Budgets to evaluate (repeat); default: a grid")
    ] = None,
) -> None:
    """Print and plot expected incremental value versus budget (the what-if curve)."""
    settings = get_settings()
    when = as_of or _clock(settings)
    result = _run(
        stages.plan, settings, campaign_id=campaign, as_of=when, objective=objective, budgets=budget
    )
    _show("budget what-if curve", result["table"])
    console.print(f"table: {result['csv']}\nplot:  {result['plot']}")


@app.command()
def deliver(campaign: Annotated[str, typer.Option(help="Campaign id")]) -> None:
    """Send a campaign's messages through the outbox."""
    _show("delivery", _run(stages.deliver, get_settings(), campaign))


@app.command()
def feedback(
    campaign: Annotated[
        str | None, typer.Option(help="Measure this campaign now (default: every campaign that is due)")
    ] = None,
    feedback_dir: Annotated[
        Path | None, typer.Option(help="One folder with feedback.csv (default: the landing zone)")
    ] = None,
) -> None:
    """Load feedback (landed exports or one folder), then measure incrementality vs control."""
    settings = get_settings()
    loaded = _run(
        stages.ingest_feedback_source, settings, feedback_dir=str(feedback_dir) if feedback_dir else None
    )
    if loaded["skipped"]:
        console.print(loaded["reason"], markup=False)
    if campaign:
        _show("measured (model policy vs control)", _run(stages.measure, settings, campaign))
        return
    result = _run(stages.measure_due, settings)
    if result["skipped"]:
        console.print(result["reason"], markup=False)
        return
    _show("measured campaigns", result["measured"])


@app.command()
def report(
    campaign: Annotated[str | None, typer.Option(help="Campaign id (default: latest)")] = None,
) -> None:
    """Print the loop summary: data, model, allocation, delivery and measured outcomes."""
    from mlpkg.reports import loop_summary

    if campaign:
        _run(stages.require_campaign, get_settings(), campaign)
    summary = _run(loop_summary, get_settings(), campaign)
    _show("rows ingested and validated", summary.get("ingested_rows", {}))
    _show("model registry", {k: v for k, v in summary.get("model", {}).items() if k != "metrics"})
    _show("model metrics", summary.get("model", {}).get("metrics", {}))
    if "campaign" in summary:
        _show("campaign", summary["campaign"])
        _show("coupons allocated per coupon/channel", summary.get("allocated", []))
        _show("deliveries", summary.get("deliveries", {}))
    for group, metrics in summary.get("observed", {}).items():
        _show(f"observed after customers responded ({group} vs control)", metrics)
    console.print(f"Data Docs: {summary.get('data_docs') or 'not built yet'}")
    if summary.get("campaign", {}).get("status") == "measured":
        from mlpkg.reports import campaign_report

        path = _run(campaign_report, get_settings(), summary["campaign"]["campaign_id"], log_to_mlflow=False)
        console.print(f"Campaign report: {path}")


@app.command()
def history(
    limit: int = 20,
    campaign: Annotated[str | None, typer.Option(help="Show only this campaign")] = None,
) -> None:
    """Show alias moves (who/why/when), campaigns and retraining decisions."""
    from mlpkg.reports import history as _history

    if campaign:
        _run(stages.require_campaign, get_settings(), campaign)
    for title, rows in _run(_history, get_settings(), limit).items():
        if campaign and title == "campaigns":
            rows = [r for r in rows if r["campaign"] == campaign]
        _show(title.replace("_", " "), rows)


if __name__ == "__main__":
    app()
