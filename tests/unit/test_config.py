import subprocess
import sys

import pytest
from pydantic import ValidationError

from mlpkg.config import Settings

pytestmark = pytest.mark.unit


def test_defaults_point_every_store_into_the_state_folder(tmp_path):
    s = Settings(state_dir=tmp_path / "st")
    assert s.resolved_warehouse_url == f"sqlite:///{tmp_path / 'st' / 'warehouse.db'}"
    assert s.resolved_tracking_uri.endswith("st/mlflow.db")
    assert not (tmp_path / "st").exists(), "settings must not create folders by themselves"


def test_environment_overrides_nested_values(monkeypatch, tmp_path):
    monkeypatch.setenv("COUPONOPS_CAMPAIGN__BUDGET", "123.5")
    monkeypatch.setenv("COUPONOPS_TRAINER__STRATEGY", "ddp")
    monkeypatch.setenv("COUPONOPS_WAREHOUSE_URL", "postgresql://u@h/db")
    s = Settings(state_dir=tmp_path)
    assert s.campaign.budget == 123.5
    assert s.trainer.strategy == "ddp"
    assert s.resolved_warehouse_url == "postgresql://u@h/db"


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"state_dir": "/"}, "state_dir"),
        ({"warehouse_url": "ftp://x"}, "warehouse_url"),
        ({"campaign": {"control_share": 0.4, "exploration_share": 0.2}}, "control_share"),
        ({"campaign": {"budget": -1}}, "budget"),
        ({"trainer": {"precision": "fp8"}}, "precision"),
    ],
)
def test_unsafe_values_are_rejected_with_the_field_named(kwargs, needle):
    with pytest.raises(ValidationError) as err:
        Settings(**kwargs)
    assert needle in str(err.value)


def test_importing_the_package_has_no_side_effects(tmp_path):
    code = (
        "import os, sys; os.chdir(sys.argv[1]); import mlpkg.config, mlpkg.stages, mlpkg.cli;"
        "import mlflow; print(mlflow.get_tracking_uri() if 'mlflow' in sys.modules else '');"
        "print(sorted(os.listdir('.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().endswith("[]"), out.stdout
