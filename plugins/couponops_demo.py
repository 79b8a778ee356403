"""``make demo``: one weekly round of the loop through Airflow, in one process, against the simulated shop.

The simulated shop is the world: it lands its exports in the landing zone and answers the
messages the product sent, like a real shop and channel provider. Airflow runs the product's
DAGs (``dag.test()``: real DAG runs and task instances in the metadata DB, at the wall clock):

1. the shop lands its export; ``couponops_ingest`` loads it, ``couponops_train`` bootstraps a
   model while there is no champion;
2. ``couponops_allocate`` scores, allocates and sends the campaign (file channel);
3. a week passes in the shop: customers respond, the shop lands its next export and the channel
   provider its feedback; ``couponops_ingest`` and ``couponops_feedback`` load and measure them;
4. ``couponops_retrain`` decides from the product's counters and retrains.

Running everything in one process starts Airflow once instead of once per DAG. A real
scheduler (``make up``) runs the same DAGs on their schedules and fires the retrain from the
feedback asset by itself.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

DAG_ORDER_BEFORE_WEEK = ("couponops_ingest", "couponops_train", "couponops_allocate")
DAG_ORDER_AFTER_WEEK = ("couponops_ingest", "couponops_feedback", "couponops_retrain")


def _register_dags():  # noqa: ANN202 - the DagBag
    """Parse the DAG folder, store the serialized DAGs and unpause them (as the dag-processor would)."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session
    from sqlalchemy import update

    manager = DagBundlesManager()
    with create_session() as session:
        manager.sync_bundles_to_db(session=session)
    bundle = manager.get_bundle("dags-folder")
    bundle.initialize()
    bag = BundleDagBag(bundle.path, bundle_path=bundle.path, bundle_name=bundle.name)
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    with create_session() as session:
        sync_bag_to_db(bag, bundle.name, None, session=session)
    with create_session() as session:
        # Asset-scheduled DAGs only queue runs when unpaused; nothing runs on a clock here.
        session.execute(update(DagModel).where(DagModel.dag_id.in_(bag.dag_ids)).values(is_paused=False))
    return bag


def _run(bag, dag_id: str) -> str:  # noqa: ANN001 - the DagBag
    from airflow.sdk import timezone

    started = time.monotonic()
    run = bag.get_dag(dag_id).test(logical_date=timezone.utcnow())
    states = {}
    for ti in run.get_task_instances():
        states[ti.task_id] = str(ti.state)
    print(f"== {dag_id}: {run.state} in {time.monotonic() - started:.1f}s  tasks={states}", flush=True)
    if str(run.state) != "success":
        raise SystemExit(f"DAG {dag_id} ended {run.state}")
    return str(run.state)


def main() -> int:
    """Run one round of the demo loop; return the process exit code."""
    from mlpkg.config import get_settings
    from mlpkg.simulator.cli import step
    from mlpkg.simulator.lab import harness

    settings = get_settings()
    settings.ensure_dirs()
    bag = _register_dags()
    shop = harness.load_world(settings)
    first_round = not (settings.state_dir / "world-provider.json").exists() and not any(
        (Path(settings.resolved_landing_url) / "batches").glob("shop-*")
    )
    print(f"== simulated shop clock: {shop.now.isoformat()}", flush=True)
    if first_round:
        step(settings, shop)  # the shop's first export: its whole history and a past campaign
    for dag_id in DAG_ORDER_BEFORE_WEEK:
        _run(bag, dag_id)
    # A week passes in the shop: customers respond, the shop and its channels report back.
    step(settings, shop, days=settings.campaign.attribution_window_days)
    print(f"== simulated shop clock: {shop.now.isoformat()} (a week later)", flush=True)
    for dag_id in DAG_ORDER_AFTER_WEEK:
        _run(bag, dag_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
