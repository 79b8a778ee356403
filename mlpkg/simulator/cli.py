"""``couponops-sim``: run the simulated shop (the world) beside the product.

The world is not the product: it drops exports into the landing zone like a real shop, and
answers the messages the product sent like a real channel provider. The product reads both
through the landing zone and never imports this package.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mlpkg import stages
from mlpkg.config import get_settings
from mlpkg.simulator.lab import harness
from mlpkg.simulator.landing import ChannelProvider, export_to_landing

app = typer.Typer(
    help="The simulated shop: lands exports in the landing zone and answers sent messages.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
console = Console()


def provider_path(settings) -> str:  # noqa: ANN001 - mlpkg.config.Settings
    """Return the file where the simulated channel provider keeps its memory."""
    return str(settings.state_dir / "world-provider.json")


def step(settings, shop, *, days: int = 0, export: bool = True) -> dict:  # noqa: ANN001
    """Move the shop's clock, export its new activity and report responses to sent messages.

    The channel provider looks at its inbox before the clock moves, so messages sent since the
    last step are received now, and reports what customers did after the clock moved.
    """
    provider = ChannelProvider(provider_path(settings))
    provider.answer(shop, settings.resolved_landing_url, settings.outbox_dir)
    if days:
        shop.advance(days)
    batch = export_to_landing(shop, settings.resolved_landing_url) if export else None
    # Like the shop, the provider reports in batches: on export days only.
    feedback = provider.answer(shop, settings.resolved_landing_url, settings.outbox_dir) if export else None
    shop.save(harness.world_path(settings))
    return {
        "now": shop.now.isoformat(),
        "batch": str(batch) if batch else None,
        "feedback": str(feedback) if feedback else None,
    }


@app.command()
def clock() -> None:
    """Print the simulated shop's current time."""
    print(harness.load_world(get_settings()).now.isoformat())


@app.command()
def export(
    days: Annotated[int, typer.Option(help="Advance the shop's clock by this many days first", min=0)] = 0,
) -> None:
    """Land the shop's activity since its last export (the first holds the whole history)."""
    settings = get_settings()
    settings.ensure_dirs()
    console.print(step(settings, harness.load_world(settings), days=days))


@app.command()
def answer() -> None:
    """Report customers' responses to the messages the product sent, up to the shop's now."""
    settings = get_settings()
    console.print(step(settings, harness.load_world(settings), export=False))


@app.command()
def serve(
    day_seconds: Annotated[float, typer.Option(help="Wall-clock seconds per shop day", min=0.5)] = 5.0,
    export_every: Annotated[int, typer.Option(help="Land a batch every N shop days", min=1)] = 2,
    minutes: Annotated[float, typer.Option(help="Stop after this many minutes (0: never)", min=0)] = 0,
) -> None:
    """Run the shop on an accelerated clock: a day every DAY_SECONDS, a batch every EXPORT_EVERY days."""
    settings = get_settings()
    settings.ensure_dirs()
    shop = harness.load_world(settings)
    landed = Path(settings.resolved_landing_url) / "batches"
    first = not landed.is_dir() or not any(p for p in landed.iterdir() if not p.name.startswith("."))
    console.print(f"shop open at {shop.now.isoformat()} ({len(shop.customer_ids)} customers)")
    if first:
        console.print(step(settings, shop))
    started, day = time.monotonic(), 0
    while not minutes or time.monotonic() - started < minutes * 60:
        time.sleep(day_seconds)
        day += 1
        result = step(settings, shop, days=1, export=day % export_every == 0)
        if result["batch"] or result["feedback"]:
            console.print(result)


@app.command()
def loop(
    rounds: Annotated[int, typer.Option(help="Weekly rounds to run")] = 5,
    objective: Annotated[str, typer.Option(help="conversions | revenue | profit")] = "conversions",
    budget: Annotated[float | None, typer.Option(help="Budget per round (default: settings)")] = None,
    customers: Annotated[
        int | None, typer.Option(help="Customers of the simulated shop (default: settings)", min=50)
    ] = None,
) -> None:
    """Run the closed loop on the simulated shop from a cold start and print each round's numbers."""
    from rich.table import Table

    from mlpkg.simulator.lab.closed_loop import run_closed_loop

    settings = get_settings()
    if customers is not None:
        settings = settings.model_copy(update={"simulator_customers": customers})
    rows: list[dict] = []

    def show(row: dict) -> None:
        rows.append(row)
        console.print(
            f"round {row['round']} (model {row['model_version']}): true {row['true_incremental']} vs "
            f"oracle {row['oracle_incremental']} ({row['share_of_oracle']:.0%}); model group "
            f"{row['model_group_true']} vs oracle on its customers and budget {row['model_group_oracle']} "
            f"({row['model_group_share_of_oracle']:.0%}); measured {row['model_group_measured']} "
            f"{row['measured_ci']}; gate: {row.get('gate', 'not retrained')}{_verdict(row)}"
        )

    run_closed_loop(settings, rounds, objective=objective, budget=budget, on_round=show)
    table = Table(title="closed loop (incremental conversions; truth from the simulator's oracle)")
    columns = [
        "round",
        "model",
        "true",
        "oracle",
        "share",
        "model grp",
        "its oracle",
        "grp share",
        "measured",
        "gate",
    ]
    for col in columns:
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r["round"]),
            "explore" if str(r["model_version"]).startswith("none") else str(r["model_version"]),
            f"{r['true_incremental']:.1f}",
            f"{r['oracle_incremental']:.1f}",
            f"{r['share_of_oracle']:.0%}",
            f"{r['model_group_true']:.1f}",
            f"{r['model_group_oracle']:.1f}",
            f"{r['model_group_share_of_oracle']:.0%}",
            f"{r['model_group_measured']:.1f}",
            {"promoted": "promoted", "kept champion": "kept"}.get(r.get("gate"), "-")
            + _verdict(r, short=True),
        )
    console.print(table)
    path = stages.write_json(settings.reports_dir / "closed_loop.json", {"rounds": rows})
    console.print(f"all columns: {path}")


def _verdict(row: dict, *, short: bool = False) -> str:
    """Say whether the gate's decision was right by the truth (when there was a champion to judge)."""
    if "gate_right" not in row:
        return ""
    if short:
        return " ✓" if row["gate_right"] else " ✗"
    return (
        f" ({'right' if row['gate_right'] else 'wrong'} by truth: challenger {row['gate_challenger_true']} "
        f"vs champion {row['gate_champion_true']})"
    )


if __name__ == "__main__":
    app()
