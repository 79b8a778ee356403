"""One typed settings object for CouponOps.

Every value can be set from the environment with the ``COUPONOPS_`` prefix (nested values use
``__``, e.g. ``COUPONOPS_TRAINER__ACCELERATOR=gpu``) or from a ``.env`` file. Importing this
module has no side effects: no folders are created and no global MLflow URI is set; call
:meth:`Settings.ensure_dirs` where a stage needs its folders.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class TrainerSettings(BaseModel):
    """Lightning Trainer and optimisation settings."""

    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    precision: str = "32-true"
    max_epochs: int = Field(8, ge=1)
    batch_size: int = Field(1024, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    hidden_dim: int = Field(64, ge=4)
    head_dim: int = Field(32, ge=2)
    embedding_dim: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    arm_heads: Literal["per_arm", "factorised"] = Field(
        "per_arm", description="per_arm: one head per arm; factorised: baseline + coupon/channel arm effects."
    )
    num_workers: int = Field(0, ge=0)
    num_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads while training; None leaves torch's default."
    )
    seed: int = 7

    @field_validator("precision")
    @classmethod
    def _known_precision(cls, v: str) -> str:
        allowed = {"32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "64-true"}
        if v not in allowed:
            raise ValueError(f"precision must be one of {sorted(allowed)}, got {v!r}")
        return v


class CampaignSettings(BaseModel):
    """Defaults for a campaign when the caller does not give them."""

    budget: float = Field(300.0, gt=0, description="Expected spend cap (coupon cost + send cost).")
    objective: Literal["conversions", "revenue", "profit"] = "conversions"
    margin: float = Field(0.35, gt=0, le=1, description="Gross margin on incremental revenue.")
    control_share: float = Field(0.10, ge=0, lt=1)
    exploration_share: float = Field(0.05, ge=0, lt=1)
    cooldown_days: int = Field(14, ge=0)
    attribution_window_days: int = Field(7, ge=1)
    score_chunk_size: int = Field(65_536, ge=1024)
    score_shards: int = Field(
        2,
        ge=1,
        le=1024,
        description="Customer shards scored in parallel (one Airflow mapped task each) before one solve.",
    )

    @model_validator(mode="after")
    def _shares_leave_room(self) -> CampaignSettings:
        if self.control_share + self.exploration_share >= 0.5:
            raise ValueError(
                "control_share + exploration_share must stay below 0.5 "
                "(otherwise most customers are not targeted by the model)"
            )
        return self


class GateSettings(BaseModel):
    """Promotion gate: when may a challenger replace the champion automatically."""

    min_policy_value_gain: float = Field(0.0, ge=0, description="Relative margin, 0.02 = +2%.")
    max_calibration_error: float = Field(0.05, gt=0)
    min_test_rows: int = Field(200, ge=1)
    treat_fraction: float = Field(0.3, gt=0, le=1, description="Share of customers a policy may treat.")


class RetrainSettings(BaseModel):
    """Conditions under which feedback triggers retraining."""

    min_new_labelled_rows: int = Field(500, ge=1)
    psi_threshold: float = Field(0.2, gt=0)
    cvr_shortfall: float = Field(0.3, gt=0, description="Relative shortfall of measured vs predicted.")


class Settings(BaseSettings):
    """All CouponOps settings; read once with :func:`get_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="COUPONOPS_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    state_dir: Path = Path(".couponops")
    warehouse_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite file in the state folder."
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: SQLite file in the state folder."
    )
    mlflow_artifact_root: str | None = None
    mlflow_experiment: str = "couponops"
    registered_model_name: str = "couponops-uplift"
    simulator_seed: int = 7
    simulator_customers: int = Field(4000, ge=50)
    strict_columns: bool = Field(False, description="Fail (not warn) on unexpected extra columns.")
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 8025
    smtp_sender: str = "offers@couponops.local"
    sms_webhook_url: str | None = None
    push_webhook_url: str | None = None
    delivery_mode: Literal["file", "live"] = "file"
    delivery_max_attempts: int = Field(5, ge=1)
    delivery_backoff_seconds: float = Field(0.5, ge=0)
    trainer: TrainerSettings = TrainerSettings()
    campaign: CampaignSettings = CampaignSettings()
    gate: GateSettings = GateSettings()
    retrain: RetrainSettings = RetrainSettings()

    @field_validator("state_dir")
    @classmethod
    def _safe_state_dir(cls, v: Path) -> Path:
        resolved = v.expanduser().resolve()
        if resolved == Path("/") or resolved == Path.home():
            raise ValueError(f"state_dir {v} would put CouponOps state at / or $HOME; pick a folder")
        return resolved

    @field_validator("warehouse_url")
    @classmethod
    def _known_dialect(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("sqlite", "postgresql", "mysql")):
            raise ValueError(f"warehouse_url must be a SQLAlchemy URL (sqlite/postgresql/mysql), got {v!r}")
        return v

    @property
    def raw_dir(self) -> Path:
        """Folder where incoming batches land (one sub-folder per batch)."""
        return self.state_dir / "raw"

    @property
    def quarantine_dir(self) -> Path:
        """Folder where rejected batches are moved with their validation result."""
        return self.state_dir / "quarantine"

    @property
    def data_docs_dir(self) -> Path:
        """Folder holding Great Expectations Data Docs."""
        return self.state_dir / "data_docs"

    @property
    def reports_dir(self) -> Path:
        """Folder holding HTML reports and plots."""
        return self.state_dir / "reports"

    @property
    def outbox_dir(self) -> Path:
        """Folder the file sender writes dry-run messages to."""
        return self.state_dir / "outbox"

    @property
    def resolved_warehouse_url(self) -> str:
        """The warehouse URL, defaulting to SQLite in the state folder."""
        return self.warehouse_url or f"sqlite:///{self.state_dir / 'warehouse.db'}"

    @property
    def resolved_tracking_uri(self) -> str:
        """The MLflow tracking URI, defaulting to SQLite in the state folder."""
        return self.mlflow_tracking_uri or f"sqlite:///{self.state_dir / 'mlflow.db'}"

    @property
    def resolved_artifact_root(self) -> str:
        """Where MLflow stores artifacts for new experiments."""
        return self.mlflow_artifact_root or (self.state_dir / "mlartifacts").as_uri()

    def ensure_dirs(self) -> None:
        """Create the state folders (explicitly, never at import)."""
        for d in (
            self.state_dir,
            self.raw_dir,
            self.quarantine_dir,
            self.data_docs_dir,
            self.reports_dir,
            self.outbox_dir,
        ):
            d.mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings (cached; call ``get_settings.cache_clear()`` in tests)."""
    return Settings()
