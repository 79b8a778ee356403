"""A real ``airflow api-server`` loads the CouponOps plugin, lists it and serves the Campaigns view.

Only the API server runs (LocalExecutor, SQLite metadata DB): Airflow mounts the plugin's FastAPI
app under ``/couponops``, and the app refuses requests without the Airflow login.
"""

from __future__ import annotations

import httpx
import pytest

from tests.integration.airflow_stack import AirflowStack, StackSpec

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("plugin-stack")
    spec = StackSpec(
        home=home,
        airflow_db_url=f"sqlite:///{home / 'airflow.db'}",
        warehouse_url=f"sqlite:///{home / 'warehouse.db'}",
        executor="LocalExecutor",
        mlflow_tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
        processes=("api-server",),
    )
    with AirflowStack(spec) as running:
        yield running


def test_api_lists_the_plugin_with_its_app_view_and_links(stack):
    api = stack.api()
    plugins = {p["name"]: p for p in api.call("GET", "/plugins")["plugins"]}
    plugin = plugins["couponops"]
    assert [a["url_prefix"] for a in plugin["fastapi_apps"]] == ["/couponops"]
    assert [v["name"] for v in plugin["external_views"]] == ["Campaigns"]
    assert len(plugin["global_operator_extra_links"]) == 3
    errors = api.call("GET", "/plugins/importErrors")["import_errors"]
    assert not [e for e in errors if "couponops" in e["source"]], errors


def test_campaigns_page_is_served_under_the_prefix_to_logged_in_users_only(stack):
    api = stack.api()
    token = api.login()
    page = httpx.get(f"{stack.api_url}/couponops/campaigns", headers={"Authorization": f"Bearer {token}"})
    assert page.status_code == 200, page.text[:2000]
    assert "<h1>Campaigns</h1>" in page.text and "No campaign yet" in page.text
    # The UI's session cookie is the same token.
    by_cookie = httpx.get(f"{stack.api_url}/couponops/api/campaigns", cookies={"_token": token})
    assert by_cookie.status_code == 200 and by_cookie.json() == {"campaigns": [], "total_entries": 0}
    for path in ("/couponops/campaigns", "/couponops/api/campaigns", "/couponops/files/reports/x.html"):
        assert httpx.get(f"{stack.api_url}{path}").status_code == 401
        forged = httpx.get(f"{stack.api_url}{path}", headers={"Authorization": "Bearer forged"})
        assert forged.status_code in (401, 403)
