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

from mlpkg import mlflow_links
from mlpkg.config import Settings
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
    """The demo's newest measured campaign and the messages the warehouse says it sent.

    Measured: it has a report (the end-to-end tests that share the demo may allocate more).
    """
    newest = "SELECT campaign_id FROM campaigns WHERE status = 'measured' ORDER BY created_at DESC LIMIT 1"
    ((campaign_id,),) = _warehouse(state, newest)
    ((sent,),) = _warehouse(
        state, f"SELECT count(*) FROM deliveries WHERE campaign_id = '{campaign_id}' AND status = 'sent'"
    )
    return campaign_id, int(sent)


def _champion(state: Path):  # noqa: ANN202 - an MLflow ModelVersion
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    # The uplift model's name (the recommender is registered beside it).
    model = client.get_registered_model(Settings.model_fields["registered_model_name"].default)
    return model, client.get_model_version_by_alias(model.name, "champion")


def _campaigns_view(tour):  # noqa: ANN202 - a Playwright FrameLocator
    """Click the Campaigns entry of Airflow's navigation; return the view Airflow embeds for it."""
    page = tour["page"]
    page.goto(f"{tour['stack'].api_url}/")
    page.locator("[aria-label='Campaigns']").first.click()
    page.wait_for_url(re.compile(r".*/plugin/campaigns.*"))
    view = page.frame_locator("iframe[title='Campaigns']")
    view.get_by_role("heading", name="Campaigns").wait_for()
    return view


def _absolute(tour, href: str) -> str:  # noqa: ANN001
    return href if href.startswith("http") else f"{tour['stack'].api_url}{href}"


def _href(tour, row, selector: str) -> str:  # noqa: ANN001
    return _absolute(tour, row.locator(selector).first.get_attribute("href"))


def test_campaigns_entry_lists_the_demo_campaign_and_its_links_answer(tour):
    campaign_id, sent = _latest_campaign(tour["state"])
    model, champion = _champion(tour["state"])
    scored = f"SELECT model_version FROM campaigns WHERE campaign_id = '{campaign_id}'"
    ((scored_by,),) = _warehouse(tour["state"], scored)
    view = _campaigns_view(tour)
    row = view.locator(f"tr[id='{campaign_id}']")
    text = " ".join(row.inner_text().split())
    assert campaign_id in text
    # The version that scored it, with the aliases it holds now (a later retrain may have moved them).
    assert f"{model.name} v{scored_by}" in text, text
    assert ("@champion" in text) == (str(scored_by) == str(champion.version)), text
    assert f" {sent} " in f" {text} ", text
    screenshot(tour["page"], "airflow-campaigns", tour["folders"])

    links = {a.inner_text().strip() or a.get_attribute("href"): a.get_attribute("href")
             for a in row.locator("a").all()}
    assert {"report", "MLflow run"} <= set(links), links
    assert len(row.locator("details a").all()) >= 1, "the campaign's batch links its Data Docs"
    for name, href in links.items():
        url = _absolute(tour, href)
        answer = tour["page"].request.get(url)
        assert answer.status == 200, f"{name} -> {url}: {answer.status}"


def test_the_embedded_views_mlflow_link_opens_a_tab_of_its_own(tour):
    """Airflow's frame sandbox forbids pop-ups; the view's links still open MLflow in a new tab."""
    campaign_id, _ = _latest_campaign(tour["state"])
    row = _campaigns_view(tour).locator(f"tr[id='{campaign_id}']")
    url = _href(tour, row, "a:has-text('MLflow run')")
    with tour["page"].context.expect_page(timeout=15_000) as opened:
        row.get_by_text("MLflow run").click()
    tab = opened.value
    tab.wait_for_load_state()
    run_id = re.search(r"/runs/([0-9a-f]+)", url).group(1)
    # MLflow's UI may rewrite the route (to the run under its experiment); the run stays.
    assert tab.url.split("#")[0] == url.split("#")[0] and run_id in tab.url, (tab.url, url)
    tab.close()


def test_the_campaigns_airflow_run_opens_on_its_dag_run_page(tour):
    campaign_id, _ = _latest_campaign(tour["state"])
    row = _campaigns_view(tour).locator(f"tr[id='{campaign_id}']")
    url = _href(tour, row, "a[href*='/dags/couponops_allocate/runs/']")
    page = tour["page"]
    # A click in the embedded view opens the run in Airflow's own window, not inside the frame.
    row.locator("a[href*='/dags/couponops_allocate/runs/']").first.click()
    page.wait_for_url(url, timeout=15_000)
    page.get_by_text("allocate", exact=True).first.wait_for()
    page.get_by_text(re.compile("success", re.IGNORECASE)).first.wait_for()
    screenshot(page, "airflow-dag-run", tour["folders"])


def _dismiss_mlflow_popups(page) -> None:  # noqa: ANN001
    """Answer what MLflow's UI shows a first-time visitor: take the new registry UI, close the assistant."""
    page.wait_for_timeout(1500)
    try_it = page.get_by_role("button", name="Try it now")
    if try_it.count():
        try_it.first.click()
    close = page.locator("[aria-label*='lose' i]")
    for i in range(close.count()):
        if close.nth(i).is_visible():
            close.nth(i).click(timeout=2000)
            break


def test_the_mlflow_model_page_shows_the_champion_and_the_gates_sentence(tour):
    model, champion = _champion(tour["state"])
    assert champion.description and "policy value" in champion.description, champion.description
    page = tour["page"]
    mlflow = tour["stack"].mlflow_url
    page.goto(mlflow_links.model_url(mlflow, model.name))
    _dismiss_mlflow_popups(page)
    page.get_by_text("champion").first.wait_for()
    screenshot(page, "mlflow-model", tour["folders"])

    page.goto(mlflow_links.model_version_url(mlflow, model.name, champion.version))
    sentence = champion.description.split(":")[0]  # e.g. "v1 promoted as the first champion"
    page.get_by_text(sentence).first.wait_for()
    page.get_by_text("champion").first.wait_for()
    screenshot(page, "mlflow-model-version", tour["folders"])

    # The experiment is typed for model training: it opens on its runs, named for people.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tour['state'] / 'mlflow.db'}")
    run = client.get_run(champion.run_id)
    page.goto(mlflow_links.experiment_url(mlflow, run.info.experiment_id))
    _dismiss_mlflow_popups(page)
    page.get_by_role("link", name=run.info.run_name).first.wait_for()
    screenshot(page, "mlflow-experiment", tour["folders"])
    # "train · v1 · <date>" or, after a retrain the end-to-end tests run, "retrain · v2 · <date>".
    named = rf"(re)?train · v{champion.version} · \d{{4}}-\d\d-\d\d"
    assert re.fullmatch(named, run.info.run_name), run.info.run_name


def test_the_campaign_report_leads_with_its_headline(tour):
    campaign_id, sent = _latest_campaign(tour["state"])
    row = _campaigns_view(tour).locator(f"tr[id='{campaign_id}']")
    page = tour["page"]
    page.goto(_href(tour, row, "a:text-is('report')"))
    page.get_by_role("heading", name=f"Campaign {campaign_id}").wait_for()
    # What is on screen (the cards' labels are styled in capitals).
    text = " ".join(page.locator("section.headline").inner_text().split()).lower()
    assert "incremental conversions" in text and "95% interval" in text, text
    assert f"messages sent {sent:,}" in text, text
    assert "nan" not in text and "none" not in text, text
    screenshot(page, "report-headline", tour["folders"])
