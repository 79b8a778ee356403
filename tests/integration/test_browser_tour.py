"""The users' tour in a real browser: after `make demo`, Airflow's UI (with the plugin) and the MLflow UI.

What `make airflow` and `make mlflow-ui` serve on the demo's state, started on loopback: an
``airflow api-server`` on the demo's metadata DB and an MLflow tracking server on the demo's store.
Debian's headless Chromium, driven by Playwright, logs in to Airflow through its login page and
follows what each user would click:

* scheduler: the "Campaigns" entry of Airflow's navigation lists the demo's campaign (checked
  against the warehouse) and its links answer; the campaign's Airflow run opens on its DAG run
  page with the ``allocate`` task;
* ML engineer: the registered model's page shows the ``champion`` alias, and the champion's
  version page shows the gate's sentence with its numbers (the description MLflow stores);
* product owner: the campaign report's headline shows the messages sent (the warehouse's count)
  and the incremental conversions with their interval.

Each step saves a screenshot under the test's folder (and, with ``COUPONOPS_SCREENSHOTS_DIR``, in
that folder: ``make screenshots`` refreshes the README's pictures in ``tests/screenshots``).
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path

import pytest

from tests.integration.browser import VIEWPORT, browser_problem, chromium, screenshot

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_problem = browser_problem()
if _problem:
    pytestmark.append(pytest.mark.skip(reason=_problem))

TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def tour(demo_state, tmp_path_factory):
    """The demo's Airflow API server and MLflow UI on loopback, and a logged-in browser page."""
    from tests.integration.airflow_stack import AirflowStack, StackSpec

    state, _ = demo_state
    home = tmp_path_factory.mktemp("browser-tour")
    spec = StackSpec(
        home=home,
        airflow_db_url=f"sqlite:///{state / 'airflow' / 'airflow.db'}",
        warehouse_url=f"sqlite:///{state / 'warehouse.db'}",
        executor="LocalExecutor",
        mlflow_backend_uri=f"sqlite:///{state / 'mlflow.db'}",
        processes=("api-server",),
    )
    spec.couponops_env = {
        "COUPONOPS_STATE_DIR": str(state),
        "COUPONOPS_MLFLOW_UI_URL": f"http://127.0.0.1:{spec.mlflow_port}",
    }
    folders = [home / "screenshots"]
    if os.environ.get("COUPONOPS_SCREENSHOTS_DIR"):
        folders.append(Path(os.environ["COUPONOPS_SCREENSHOTS_DIR"]))
    with AirflowStack(spec) as stack, chromium() as browser:
        context = browser.new_context(viewport=VIEWPORT)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        _log_in(page, stack)
        yield {"stack": stack, "state": state, "page": page, "context": context, "folders": folders}
        context.close()


def _log_in(page, stack) -> None:  # noqa: ANN001
    """Log in through Airflow's own login page, as a user does."""
    page.goto(f"{stack.api_url}/")
    page.wait_for_url(re.compile(r".*/auth/login.*"))
    page.locator("input[name=username]").fill(stack.spec.username)
    page.locator("input[name=password]").fill(stack.spec.password)
    page.locator("button[type=submit]").click()
    page.wait_for_url(re.compile(rf"^{re.escape(stack.api_url)}/(?!auth).*"))


def _warehouse(state: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(state / "warehouse.db")
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _latest_campaign(state: Path) -> tuple[str, int]:
    """The demo's newest campaign and the messages the warehouse says it sent."""
    ((campaign_id,),) = _warehouse(state, "SELECT campaign_id FROM campaigns ORDER BY created_at DESC LIMIT 1")
    ((sent,),) = _warehouse(
        state, f"SELECT count(*) FROM outbox WHERE campaign_id = '{campaign_id}' AND status = 'sent'"
    )
    return campaign_id, int(sent)


def _champion(state: Path):  # noqa: ANN202 - an MLflow ModelVersion
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    (model,) = client.search_registered_models()
    return model, client.get_model_version_by_alias(model.name, "champion")


def _campaigns_page(tour):  # noqa: ANN202 - a Playwright Page
    """Open the Campaigns entry of Airflow's navigation; return the page it opened."""
    page, context = tour["page"], tour["context"]
    page.goto(f"{tour['stack'].api_url}/")
    entry = page.get_by_role("link", name="Campaigns")
    before = len(context.pages)
    entry.first.click()
    # The entry opens the view in a tab of its own; follow it wherever it opened.
    page.wait_for_timeout(500)
    opened = context.pages[-1] if len(context.pages) > before else page
    opened.wait_for_url(re.compile(r".*/couponops/campaigns.*"))
    opened.wait_for_load_state()
    return opened


def test_campaigns_entry_lists_the_demo_campaign_and_its_links_answer(tour):
    campaign_id, sent = _latest_campaign(tour["state"])
    model, champion = _champion(tour["state"])
    view = _campaigns_page(tour)
    row = view.locator(f"tr[id='{campaign_id}']")
    row.wait_for()
    text = " ".join(row.inner_text().split())
    assert campaign_id in text
    assert f"{model.name} v{champion.version}" in text and "@champion" in text, text
    assert str(sent) in text, text
    screenshot(view, "airflow-campaigns", tour["folders"])

    links = {a.inner_text().strip(): a.get_attribute("href") for a in row.locator("a").all()}
    assert "report" in links and "MLflow run" in links, links
    for name, href in links.items():
        url = href if href.startswith("http") else f"{tour['stack'].api_url}{href}"
        answer = view.request.get(url)
        assert answer.status == 200, f"{name} -> {url}: {answer.status}"
    docs = row.locator("details a")
    assert docs.count() >= 1, "the campaign's batch has Data Docs links"
    if view is not tour["page"]:
        view.close()


def test_the_campaigns_airflow_run_opens_on_its_dag_run_page(tour):
    campaign_id, _ = _latest_campaign(tour["state"])
    view = _campaigns_page(tour)
    run_link = view.locator(f"tr[id='{campaign_id}'] a[href*='/dags/couponops_allocate/runs/']")
    href = run_link.get_attribute("href")
    page = tour["page"]
    page.goto(f"{tour['stack'].api_url}{href}")
    page.get_by_text("allocate", exact=True).first.wait_for()
    page.get_by_text(re.compile("success", re.IGNORECASE)).first.wait_for()
    screenshot(page, "airflow-dag-run", tour["folders"])
    if view is not page:
        view.close()


def test_the_mlflow_model_page_shows_the_champion_and_the_gates_sentence(tour):
    model, champion = _champion(tour["state"])
    assert champion.description and "policy value" in champion.description, champion.description
    page = tour["page"]
    mlflow = tour["stack"].mlflow_url
    page.goto(f"{mlflow}/#/models/{model.name}")
    page.get_by_text("champion").first.wait_for()
    assert model.description and page.get_by_text(model.description[:40]).count() >= 1
    screenshot(page, "mlflow-model", tour["folders"])

    page.goto(f"{mlflow}/#/models/{model.name}/versions/{champion.version}")
    sentence = champion.description.split(":")[0]  # e.g. "v1 promoted as the first champion"
    page.get_by_text(sentence).first.wait_for()
    page.get_by_text("champion").first.wait_for()
    screenshot(page, "mlflow-model-version", tour["folders"])


def test_the_campaign_report_leads_with_its_headline(tour):
    campaign_id, sent = _latest_campaign(tour["state"])
    view = _campaigns_page(tour)
    href = view.locator(f"tr[id='{campaign_id}'] a", has_text="report").get_attribute("href")
    page = tour["page"]
    page.goto(f"{tour['stack'].api_url}{href}")
    page.get_by_role("heading", name=f"Campaign {campaign_id}").wait_for()
    headline = page.locator("section.headline")
    text = " ".join(headline.inner_text().split())
    assert "Incremental conversions" in text and "95% interval" in text, text
    assert f"Messages sent {sent:,}" in text, text
    assert "nan" not in text.lower() and "None" not in text, text
    screenshot(page, "report-headline", tour["folders"])
    if view is not page:
        view.close()
