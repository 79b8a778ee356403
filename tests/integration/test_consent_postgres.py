"""Migration 0004 (consent history) and consent writes on PostgreSQL."""

import pytest

from tests.unit.test_consent_history import assert_upgrade_keeps_rows_and_downgrade_keeps_the_latest

pytestmark = pytest.mark.integration


def test_migration_keeps_existing_consent_and_models_match_on_postgresql(pg_url):
    # Upgrade from 0003 with rows, opt-out-wins writes (ON CONFLICT), downgrade, upgrade, compare schemas.
    assert_upgrade_keeps_rows_and_downgrade_keeps_the_latest(pg_url)
