"""The ``couponops`` command line: each command calls the same stage function as a DAG task."""

from __future__ import annotations

import json
import math
import os
import textwrap
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mlpkg import progress, report_page, stages
from mlpkg.config import Settings, get_settings

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
    if value is None:
        return "—"
    if isinstance(value, list | tuple) and value and all(isinstance(v, int | float) for v in value):
        return "[" + ", ".join(f"{v:.4g}" for v in value) + "]"
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


def _fail(message: str) -> None:
    """Print one ``error:`` line (escaped, never wrapped) and exit with code 2."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=2)


def _settings() -> Settings:
    """Return the settings, or exit with one line naming each bad ``COUPONOPS_*`` value."""
    try:
        return get_settings()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = "COUPONOPS_" + "__".join(str(part) for part in err["loc"]).upper()
            # A value that may hold a credential (a URL, a password, a token) is never echoed.
            secret = any(w in name for w in ("PASSWORD", "TOKEN", "SECRET", "URL", "URI", "KEY", "USER"))
            shown = name if secret or "input" not in err else f"{name}={err['input']!r}"
            problems.append(f"{shown}: {err['msg']}")
        _fail("invalid settings: " + "; ".join(problems))
    except SettingsError as exc:
        _fail(f"invalid settings: {exc} (a nested setting must be valid JSON, e.g. '[\"network\"]')")
    raise AssertionError("unreachable")  # _fail always exits


def _call(fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    """Call a stage and turn known errors into one ``error:`` line and exit code 2."""
    from mlpkg.db.queries import CampaignBusyError
    from mlpkg.validation import DataContractError

    known = (LookupError, FileNotFoundError, ValueError, CampaignBusyError, DataContractError)
    try:
        return fn(*args, **kwargs)
    except known as exc:
        # One unwrapped line per message line; the text is escaped so ids in brackets stay text.
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(code=2) from exc


def _run(fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
    """Call a stage under a progress display and turn known errors into a clean exit.

    A spinner names the stage; every task the stage reports (:mod:`mlpkg.progress`: rows validated
    and loaded, epochs, rows scored) gets a bar with its count and elapsed time. The display is
    transient and drawn only on a terminal, so piped output holds the results alone.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bars:
        bars.add_task(f"{fn.__name__} running…", total=None)
        tasks: dict[str, int] = {}

        def show(task: str, done: int, total: int | None) -> None:
            if task not in tasks:
                tasks[task] = bars.add_task(task, total=total)
            bars.update(tasks[task], completed=done, total=total)

        with progress.listening(show):
            return _call(fn, *args, **kwargs)


def _as_of(value: str | None) -> str | None:
    """Return ``--as-of`` unchanged if it is an ISO-8601 time, else exit with one line and a hint."""
    if value is None:
        return None
    try:
        datetime.fromisoformat(value)
    except ValueError:
        _fail(f"--as-of {value!r} is not an ISO-8601 time, e.g. 2025-07-07T06:00:00Z")
    return value


def _jsonable(value):  # noqa: ANN001, ANN202 - any report value
    """Return ``value`` as strict JSON data: non-finite floats become null, numpy scalars Python ones."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if getattr(value, "ndim", 0) > 0 and hasattr(value, "tolist"):
        return _jsonable(value.tolist())  # numpy array
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()  # numpy scalar
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _print_json(payload) -> None:  # noqa: ANN001 - dict or list
    """Print one JSON document on stdout, without rich markup or highlighting."""
    typer.echo(json.dumps(_jsonable(payload), indent=2, allow_nan=False))


def _when(value: str | None) -> str:
    """Return an ISO time as ``YYYY-MM-DD HH:MM`` (UTC as stored), or an empty cell."""
    if not value:
        return ""
    return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M")


def _ver(version: str | None) -> str:
    return f"v{version}" if version not in (None, "") else "—"


def _clip(text: str | None, width: int) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def _money(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}"


def _short_run(run_key: str | None) -> str:
    """Shorten a run key for a table cell.

    ``couponops_allocate/scheduled__2025-07-07T06:00:00+00:00`` reads ``allocate 07-07 06:00``, a
    manual run ``allocate manual 07-07 06:00``; other run ids are kept after the DAG's short name.
    """
    if not run_key:
        return ""
    dag_id, _, run_id = run_key.partition("/")
    dag = dag_id.removeprefix("couponops_")
    kind, sep, stamp = run_id.partition("__")
    when = _minute(stamp) if sep else None
    if when is not None:
        return " ".join([dag, *([kind] if kind != "scheduled" else []), when])
    return f"{dag}/{run_id}" if run_id else dag


def _minute(stamp: str) -> str | None:
    """Return an ISO time as ``MM-DD HH:MM``, or None when it is not one."""
    try:
        return f"{datetime.fromisoformat(stamp):%m-%d %H:%M}"
    except ValueError:
        return None


def _table(title: str, header: list[str], cells: list[list[str]]) -> None:
    """Print rows as a table of at most two terminal lines per row.

    Every column but the last is as wide as its widest cell; the last one takes the width left
    and its text is wrapped onto two lines at most, the rest cut with an ellipsis (the full text
    is in ``--json``).
    """
    if not cells:
        console.print(f"[dim]{escape(title)}: none[/dim]")
        return
    widths = [max(len(name), *(len(row[i]) for row in cells)) for i, name in enumerate(header[:-1])]
    # Box edges (2) plus, between columns, one separator and one right padding each.
    free = max(console.width - 2 - sum(widths) - 2 * len(widths), len(header[-1]), 8)
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, expand=True, padding=(0, 1, 0, 0))
    for name, width in zip(header[:-1], widths, strict=True):
        table.add_column(name, no_wrap=True, width=width)
    table.add_column(header[-1], no_wrap=True, overflow="ellipsis", ratio=1)
    for row in cells:
        last = "\n".join(textwrap.wrap(row[-1], width=free, max_lines=2, placeholder=" …")) if row[-1] else ""
        table.add_row(*[escape(cell) for cell in row[:-1]], escape(last))
    console.print(table)


@app.command()
def init() -> None:
    """Create the state folder, migrate the warehouse and create the MLflow experiment."""
    # Settings are read inside _run: a bad value is a one-line error (never echoing a secret).
    settings = _settings()
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
    settings = _settings()
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
        _show("ingested", [{"batch": b["drop_id"], "rows": b["rows"],
                            "forgotten rows dropped": sum(b["forgotten_rows_dropped"].values())}
                           for b in result["loaded"]])
        return
    _show("ingest", _run(stages.ingest, settings, batch_dir))


@app.command("import-log")
def import_log(
    file: Path,
    spec: Annotated[Path, typer.Option(help="YAML spec: id, treatment, outcome and feature columns")],
) -> None:
    """Validate a campaign log (CSV or Parquet) against its YAML spec and import it for training."""
    result = _run(stages.import_log, _settings(), file, spec)
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
    from mlpkg.reports import model_drivers

    settings = _settings()
    ctx = stages.RunContext(dag_id="cli", run_id=f"train-{stages.utcnow():%Y%m%dT%H%M%S}")
    result = _run(stages.train, settings, ctx, log_names=log)
    _show("training", {k: v for k, v in result.items() if k != "metrics"})
    _show("test metrics", result.get("metrics", {}))
    _drivers_table(_call(model_drivers, settings, result["model_version"], result.get("model_name")))
    decision = _run(
        stages.gate,
        settings,
        model_name=result.get("model_name"),
        model_version=result["model_version"],
        test_frame=result["test_frame"],
        run_id=result["mlflow_run_id"],
    )
    _show("promotion gate", decision)
    if decision.get("next_step"):
        console.print(f"[yellow]{decision['next_step']}[/yellow]")


@app.command()
def promote(
    version: str,
    reason: Annotated[str, typer.Option(help="Why this version becomes champion")] = "promoted by hand",
    log: Annotated[str | None, typer.Option(help="An imported log's own model (train --log NAME)")] = None,
) -> None:
    """Make VERSION the champion (recorded in `couponops history`)."""
    actor = os.environ.get("USER", "cli")
    _show(
        "promotion", _run(stages.promote, _settings(), version, actor=actor, reason=reason, log_name=log)
    )


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
    settings = _settings()
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
    when = _as_of(as_of) or _clock(settings)
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
    settings = _settings()
    when = _as_of(as_of) or _clock(settings)
    result = _run(
        stages.plan, settings, campaign_id=campaign, as_of=when, objective=objective, budgets=budget
    )
    _show("budget what-if curve", result["table"])
    console.print(f"table: {result['csv']}\nplot:  {result['plot']}")


@app.command()
def deliver(campaign: Annotated[str, typer.Option(help="Campaign id")]) -> None:
    """Send a campaign's messages through the outbox."""
    _show("delivery", _run(stages.deliver, _settings(), campaign))


@app.command()
def recommend(campaign: Annotated[str, typer.Option(help="Campaign id")]) -> None:
    """Rank in-stock products for a campaign's treated customers (trains a recommender without a champion)."""
    result = _run(stages.recommend, _settings(), campaign)
    if result.get("skipped"):
        console.print(f"skipped: {result['reason']}", markup=False)
        return
    result.pop("trained", None)
    _show("recommendations", result)


@app.command("train-recommender")
def train_recommender() -> None:
    """Evaluate the recommender on a time split against the baselines, fit it and register it in MLflow."""
    result = _run(stages.train_recommender, _settings())
    rows = {f"{method} {name}": f"{value:.3f}" for method, d in result["metrics"].items()
            for name, value in d.items() if name != "users"}
    _show("recommender", {"version": result["version"], "alias": result["alias"], **rows})


@app.command()
def preview(
    campaign: Annotated[str, typer.Option(help="Campaign id")],
    customer: Annotated[str, typer.Option(help="The shop's customer id (or the warehouse's pseudonym)")],
) -> None:
    """Write the campaign's rendered message to one customer (HTML + text) under the state folder."""
    result = _run(stages.preview, _settings(), campaign, customer)
    console.print(f"{result['channel']} message, coupon {result['coupon_id']}, products: "
                  f"{', '.join(result['products']) or 'none'}", markup=False, soft_wrap=True)
    console.print(f"text: {result['text']}", markup=False, soft_wrap=True)
    if result["html"]:
        console.print(f"html: {result['html']}", markup=False, soft_wrap=True)


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
    settings = _settings()
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


def _measured_table(measured: dict[str, dict]) -> None:
    """Print the measured outcome per group against the random control group (one line per group)."""

    def pct(value: float | None) -> str:
        return "—" if value is None else f"{value:.2%}"

    def ci(bounds: list | None) -> str:
        return "—" if not bounds or None in bounds else f"[{bounds[0]:.2f}, {bounds[1]:.2f}]"

    _table(
        "observed after customers responded (vs control)",
        ["group", "customers", "cvr", "ctrl cvr", "incr. conv.", "roi", "95% CI"],
        [
            [
                group,
                _fmt(row.get("customers")),
                pct(row.get("cvr")),
                pct(row.get("control_cvr")),
                "—"
                if row.get("incremental_conversions") is None
                else f"{row['incremental_conversions']:+.2f}",
                "—" if row.get("roi") is None else f"{row['roi']:.2f}",
                ci(row.get("incremental_conversions_ci")),
            ]
            for group, row in measured.items()
        ],
    )


def _fairness_tables(summary: dict, currency: str) -> None:
    """Print exposure and effect by sensitive group, the disparity ratios and any allocation bounds."""
    from mlpkg.reports import FAIRNESS_DISPARITY_COLUMNS, FAIRNESS_GROUP_COLUMNS, fairness_rows

    fairness = summary.get("fairness")
    if fairness and fairness.get("by_attribute"):
        groups, disparity = fairness_rows(fairness, currency)
        _table("fairness by group (treated: share of non-control customers)", FAIRNESS_GROUP_COLUMNS, groups)
        _table("disparity: lowest group / highest group (1 = parity)", FAIRNESS_DISPARITY_COLUMNS, disparity)
    bounds = summary.get("fairness_constraints")
    if bounds:
        _table("fairness bounds of the allocation (model policy)", ["constraint", "reached", "price"],
               [[b["constraint"], _fmt(b.get("achieved")), _fmt(b.get("price"))] for b in bounds])


def _drivers_table(drivers: dict | None) -> None:
    """Print what drives the model's uplift, as its training run logged it (nothing when not logged)."""
    if not drivers or not drivers.get("features"):
        return
    table = Table(title=f"what drives the uplift (v{drivers['version']}: mean over arms, "
                        f"{drivers['rows']:,} test rows, {str(drivers['method']).replace('_', ' ')})",
                  box=box.SIMPLE)  # fmt: skip
    for col, justify in (("feature", "left"), ("|contribution|", "right"), ("direction", "left")):
        table.add_column(col, justify=justify)
    for f in drivers["features"]:
        table.add_row(f["feature"], report_page.points(f["mean_abs"]), f.get("direction") or "—")
    console.print(table)


def _print_report_path(path: str | None) -> None:
    """Print where the campaign's HTML report is, or that none was written yet (writes nothing)."""
    text = path or "none yet (`couponops feedback` writes it when it measures the campaign)"
    console.print(f"Campaign report: {text}", markup=False, soft_wrap=True)


@app.command()
def report(
    campaign: Annotated[str | None, typer.Option(help="Campaign id (default: latest)")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document instead of tables")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Also print model metrics, allocations and every measurement")
    ] = False,
) -> None:
    """Print the campaign, its measured outcome, the model in production and the data (reads only)."""
    from mlpkg.reports import loop_summary

    settings = _settings()
    if campaign:
        _call(stages.require_campaign, settings, campaign)
    summary = _call(loop_summary, settings, campaign) if as_json else _run(loop_summary, settings, campaign)
    if as_json:
        _print_json(summary)
        return
    block = summary.get("campaign")
    if block:
        _show(
            f"campaign {block['campaign_id']}",
            {
                "status": block.get("status"),
                "as of": _when(block.get("as_of")),
                "model": _ver(block.get("model_version")),
                "budget": _money(block.get("budget")),
                "spent": _money(block.get("committed")),
                "customers": block.get("population"),
                "treated": block.get("treated"),
                "control group": block.get("control_group"),
                "expected incr.": block.get("expected_incremental_conversions"),
            },
        )
        _measured_table(summary.get("observed", {}))
        _fairness_tables(summary, settings.currency)
        _show("deliveries", summary.get("deliveries", {}))
        _print_report_path(summary.get("report"))
    else:
        console.print("no campaign yet: run `couponops allocate --campaign ID`", markup=False)
    model = summary.get("model", {})
    _show("model registry", {k: v for k, v in model.items() if k not in ("metrics", "drivers")})
    _drivers_table(model.get("drivers"))
    ingested = summary.get("ingested_rows", {})
    console.print(
        f"data: {sum(ingested.values()):,} rows ingested into {len(ingested)} tables; "
        f"Data Docs: {summary.get('data_docs') or 'not built yet'}",
        markup=False,
        soft_wrap=True,
    )
    if verbose:
        _show("rows ingested and validated", ingested)
        _show("model metrics", model.get("metrics", {}))
        _show("coupons allocated per coupon/channel", summary.get("allocated", []))
        for group, metrics in summary.get("observed", {}).items():
            _show(f"observed after customers responded ({group} vs control)", metrics)


def _estimate_rows(estimates: dict, confidence: float) -> list[list[str]]:
    pct = f"{confidence:.0%}"
    rows = []
    for name in ("dr", "snips", "ips"):
        e = estimates[name]
        rows.append([name.upper(), f"{e['value']:.4g}", f"[{e['ci_low']:.4g}, {e['ci_high']:.4g}]",
                     f"{e['effective_sample_size']:,.0f}", f"{e['max_weight']:.3g}"])
    return [["estimator", "value", f"{pct} CI", "ESS", "max w"], *rows]


@app.command()
def evaluate(
    policy: Annotated[Path, typer.Option(help="CSV: customer_id,arm[,probability]")],
    log: Annotated[str | None, typer.Option(help="A campaign log of the warehouse")] = None,
    campaign: Annotated[str | None, typer.Option(help="One of our campaigns (its ledger)")] = None,
    compare: Annotated[Path | None, typer.Option(help="Another policy file: paired difference")] = None,
    outcome: Annotated[str, typer.Option(help="converted or revenue")] = "converted",
    strict: Annotated[
        bool, typer.Option("--strict", help="Exit 1 when the weights make an estimate untrustworthy")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document instead of tables")
    ] = False,
) -> None:
    """Estimate a policy's value offline (IPS, SNIPS, DR with intervals) on logged rows."""
    settings = _settings()
    kwargs = dict(log=log, campaign=campaign, compare=compare, outcome=outcome)
    result = (_call if as_json else _run)(stages.evaluate_policy, settings, policy, **kwargs)
    if as_json:
        _print_json(result)
    else:
        src, pol = result["source"], result["policy"]
        console.print(
            f"{pol['kind']} policy {Path(pol['file']).name} on {src['kind']} {src['name']}: "
            f"{src['rows']:,} rows, outcome {src['outcome']} "
            f"(logged policy: {result['logged_value']:.4g} per customer)",
            markup=False, soft_wrap=True,
        )
        if pol["ignored_customers"]:
            console.print(f"{pol['ignored_customers']:,} customers of the policy are not in the log: ignored",
                          markup=False)
        header, *cells = _estimate_rows(result["estimates"], result["confidence"])
        _table("value per customer", header, cells)
        if "compare" in result:
            other = result["compare"]
            header, *cells = _estimate_rows(other["estimates"], result["confidence"])
            _table(f"{Path(other['policy']['file']).name}", header, cells)
            diff = other["difference"]
            _table(
                "difference (this - other), paired",
                ["estimator", "value", f"{result['confidence']:.0%} CI"],
                [
                    [k.upper(), f"{d['value']:+.4g}", f"[{d['ci_low']:+.4g}, {d['ci_high']:+.4g}]"]
                    for k, d in ((k, diff[k]) for k in ("dr", "snips", "ips"))
                ],
            )
        for text in result["warnings"]:
            console.print(f"[yellow]warning:[/yellow] {escape(text)}", soft_wrap=True)
    if strict and result["warnings"]:
        raise typer.Exit(code=1)


def _history_tables(rows: dict[str, list[dict]]) -> None:
    """Print the history: campaigns, gate decisions, alias moves, retraining decisions."""
    _table(
        "campaigns",
        ["campaign", "created", "status", "model", "sent", "spent/budget", "run"],
        [
            [
                _clip(r["campaign"], 16),
                _when(r["created"]),
                r["status"],
                _ver(r["model_version"]),
                f"{r['sent']:,}",
                f"{_money(r['spent'])}/{_money(r['budget'])}",
                _short_run(r["run_key"]),
            ]
            for r in rows["campaigns"]
        ],
    )
    _table(
        "gate decisions",
        ["version", "trained", "outcome", "champion", "reason"],
        [
            [
                _ver(r["version"]),
                _when(r["trained"]),
                r["outcome"],
                _ver(r["champion"]),
                r["reason"].removeprefix("guard failed: "),
            ]
            for r in rows["gate_decisions"]
        ],
    )
    _table(
        "alias moves",
        ["when", "alias", "version", "actor", "reason"],
        [
            [
                _when(r["when"]),
                r["alias"],
                f"{_ver(r['previous'])} → {_ver(r['version'])}" if r["previous"] else _ver(r["version"]),
                _clip(r["actor"], 12),
                r["reason"],
            ]
            for r in rows["promotions"]
        ],
    )
    _table(
        "retraining decisions",
        ["when", "retrain", "run", "triggers"],
        [
            [
                _when(r["when"]),
                "yes" if r["retrain"] else "no",
                _short_run(r["run_key"]),
                "; ".join(r["triggers"]),
            ]
            for r in rows["retrain_decisions"]
        ],
    )


@app.command()
def history(
    limit: Annotated[int, typer.Option(help="Most rows per table", min=1)] = 20,
    campaign: Annotated[str | None, typer.Option(help="Show this campaign in detail")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document instead of tables")
    ] = False,
) -> None:
    """Show campaign runs, gate decisions (promoted, kept, refused), alias moves and retraining decisions."""
    from mlpkg.reports import campaign_detail
    from mlpkg.reports import history as _history

    settings = _settings()
    if campaign:
        _call(stages.require_campaign, settings, campaign)
        detail = _call(campaign_detail, settings, campaign)
        if as_json:
            _print_json(detail)
            return
        _show(
            f"campaign {detail['campaign']}",
            {
                "status": detail["status"],
                "objective": detail["objective"],
                "created": _when(detail["created"]),
                "as of": _when(detail["as_of"]),
                "budget": _money(detail["budget"]),
                "spent": _money(detail["spent"]),
                "model": _ver(detail["model_version"]),
                "run": detail["run_key"],
                "customers": detail["population"],
                "treated": detail["treated"],
                "control group": detail["control_group"],
                "expected incr.": detail["expected_incremental_conversions"],
                "sent": detail["sent"],
            },
        )
        _measured_table(detail["measured"])
        _print_report_path(detail["report"])
        return
    rows = _call(_history, settings, limit)
    if as_json:
        _print_json(rows)
        return
    _history_tables(rows)


_NO_COUPON = "control"


@app.command()
def explain(
    campaign: Annotated[str, typer.Option(help="Campaign id")],
    customer: Annotated[str, typer.Option(help="The shop's customer id (or its stored pseudonym)")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document instead of text")
    ] = False,
) -> None:
    """Say why a customer got their coupon (or none): binding constraint, runner-up, margin, features."""
    settings = _settings()
    found = _call(stages.explain, settings, campaign, customer)
    if as_json:
        _print_json(found)
        return
    reason = found["reason"]
    got = "no coupon" if found["arm"] == _NO_COUPON else found["arm"]
    print_ = lambda text: console.print(text, markup=False, soft_wrap=True)  # noqa: E731
    print_(f"customer {found['customer']} in campaign {found['campaign_id']}: {got} "
           f"({found['policy']} policy)")
    if reason is None:
        print_("no reason recorded: the campaign was allocated before reasons were kept (migration 0008)")
        return
    for k, fact in enumerate(reason["constraints"]):
        print_(f"{'why' if k == 0 else 'also'}: {fact['constraint']} - {fact['detail']}")
    unit = found["objective"]
    if reason["runner_up"] is not None:
        runner = "no coupon" if reason["runner_up"] == _NO_COUPON else reason["runner_up"]
        margin = "n/a (not eligible)" if reason["margin"] is None else f"{reason['margin']:+.4g} {unit}"
        print_(f"runner-up: {runner}; margin {margin} at the solver's prices")
    if not reason["attributions"]:
        print_("features: none recorded (no model attributions for this row)")
        return
    print_(f"predicted uplift of {reason['explained_arm']}: {reason['uplift']:+.4f} conversion probability "
           f"({reason['method'].replace('_', ' ')}, vs the campaign's average customer)")  # fmt: skip
    table = Table(title=f"features pushing {reason['explained_arm']}'s uplift", box=box.SIMPLE)
    for col, justify in (("feature", "left"), ("value", "right"), ("contribution", "right")):
        table.add_column(col, justify=justify)
    for item in reason["attributions"]:
        table.add_row(item["feature"], _fmt(item.get("value")), f"{item['contribution']:+.4f}")
    console.print(table)


@app.command()
def forget(
    customer_id: Annotated[str, typer.Argument(help="The shop's customer id (as in its customers export)")],
    reason: Annotated[str, typer.Option(help="Why (the request's reference); kept in the privacy audit")],
) -> None:
    """Erase a customer's personal data in one transaction; the ledger's totals stay as they were."""
    import getpass

    settings = _settings()
    result = _run(stages.forget, settings, customer_id, reason=reason, actor=f"cli:{getpass.getuser()}")
    if result["status"] == "already forgotten":
        console.print(f"already forgotten (pseudonym {result['pseudonym']}): nothing to do", markup=False)
        return
    deleted = ", ".join(f"{t} {n}" for t, n in result["deleted"].items())
    kept = ", ".join(f"{t} {n}" for t, n in result["pseudonymised"].items())
    console.print(f"forgotten (pseudonym {result['pseudonym']}); deleted: {deleted}; "
                  f"unlinked ledger rows: {kept}", markup=False, soft_wrap=True)


@app.command()
def purge() -> None:
    """Delete behaviour events older than COUPONOPS_PRIVACY__RETENTION_DAYS (warehouse and event store)."""
    result = _run(stages.purge, _settings())
    if result["skipped"]:
        console.print(f"nothing purged: {result['reason']}", markup=False)
        return
    console.print(f"purged {result['events']} events before {result['cutoff']} "
                  f"({result['event_store_rows']} from the event store)", markup=False)


if __name__ == "__main__":
    app()
