import shutil

import pandas as pd
import pytest

from mlpkg import stages
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from mlpkg.simulator.lab import harness
from mlpkg.validation import DataContractError

pytestmark = pytest.mark.unit


@pytest.fixture
def landed(settings, engine):
    return settings, engine, harness.land_simulated_batch(settings, "initial")["batch_dir"]


def _snapshot(engine):
    with session_scope(engine) as s:
        return q.table_counts(s), q.table_checksums(s)


def test_ingesting_the_same_batch_twice_leaves_identical_tables(landed):
    settings, engine, batch = landed
    first = stages.ingest(settings, batch)
    assert first["loaded"]["customers"] == 600 and first["loaded"]["events"] > 1000
    counts, sums = _snapshot(engine)
    second = stages.ingest(settings, batch)
    assert second["loaded"] == {} and set(second["skipped"]) == set(first["loaded"])
    assert _snapshot(engine) == (counts, sums)


def test_a_bad_file_loads_nothing_and_the_batch_goes_to_quarantine(landed, tmp_path):
    settings, engine, batch = landed
    before = _snapshot(engine)
    orders = pd.read_csv(f"{batch}/orders.csv", dtype=str, keep_default_na=False)
    orders.loc[3, "revenue"] = "-12.5"
    orders.to_csv(f"{batch}/orders.csv", index=False)
    with pytest.raises(DataContractError) as err:
        stages.ingest(settings, batch)
    msg = str(err.value)
    assert "orders.csv" in msg and "revenue" in msg
    assert _snapshot(engine) == before
    quarantined = list(settings.quarantine_dir.iterdir())
    assert len(quarantined) == 1 and (quarantined[0] / "validation_result.json").exists()
    assert not (settings.raw_dir / "initial").exists()


def test_later_incremental_batches_pass_the_volume_rule(landed):
    settings, engine, batch = landed
    stages.ingest(settings, batch)
    shop = harness.load_world(settings)
    shop.advance(7)
    shop.save(settings.state_dir / "world.json")
    out = harness.land_simulated_batch(settings, "round-2")
    report = stages.ingest(settings, out["batch_dir"])
    assert report["loaded"]["events"] > 0


def test_unknown_folder_is_a_clear_error(settings, engine, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        stages.ingest(settings, tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="none of the raw files"):
        stages.ingest(settings, empty)
    shutil.rmtree(empty)
