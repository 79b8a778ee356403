"""One typed settings object for CouponOps.

Every value can be set from the environment with the ``COUPONOPS_`` prefix (nested values use
``__``, e.g. ``COUPONOPS_TRAINER__ACCELERATOR=gpu``) or from a ``.env`` file. Importing this
module has no side effects: no folders are created and no global MLflow URI is set; call
:meth:`Settings.ensure_dirs` where a stage needs its folders.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_validator
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
        "factorised",
        description="factorised: baseline + coupon/channel arm effects; per_arm: one head per arm.",
    )
    ensemble_members: int = Field(
        4,
        ge=1,
        le=32,
        description="Networks trained side by side with their predictions averaged (1: a single network); "
        "four remove most of one fit's luck (the closed loop's round 5, measured before the oracle faced the "
        "coupon stock and true costs: 65% of the oracle against 53% with one).",
    )
    families: list[Literal["network", "gbm", "logistic"]] = Field(
        ["network", "gbm", "logistic"],
        min_length=1,
        description="Model families each training compares on the log's validation part; the best is logged.",
    )
    weighting: Literal["stabilised", "none"] = Field(
        "none",
        description="Loss weights: none = 1 (each arm's outcome model conditions on the features the "
        "logging policy used, so it needs no reweighting); stabilised = min(share(arm) / propensity, "
        "max_weight).",
    )
    max_weight: float = Field(10.0, ge=1, description="Cap on a row's stabilised inverse-propensity weight.")
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
    control_share: float = Field(
        0.10, ge=0, lt=1, description="Random control share: the most a campaign holds out."
    )
    min_control_share: float = Field(0.02, ge=0, lt=1, description="The least control share sizing chooses.")
    control_ci_target: float | None = Field(
        0.7,
        gt=0,
        description="Size control so the targeted increment's 95% CI half-width is at most this share of the "
        "increment the model expects (0.7: the expected effect is detected with 80% power; None: always "
        "control_share).",
    )
    exploration_share: float = Field(
        0.05, ge=0, lt=1, description="Share given a random eligible arm: the most sizing chooses."
    )
    exploration_rows_per_arm: int | None = Field(
        30, ge=1, description="Random rows per option on offer per campaign (None: always exploration_share)."
    )
    challenger_share: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="Share of the model group a live challenger allocates: the latest version the gate kept "
        "out on too little evidence (guards passed, not shown worse). Its choices are logged with "
        "propensities near this share, so the next gate can tell the versions apart (0: champion only).",
    )
    cooldown_days: int = Field(14, ge=0)
    attribution_window_days: int = Field(7, ge=1)
    score_chunk_size: int = Field(65_536, ge=1024)
    coupon_pricing: Literal["conversion", "redemption"] = Field(
        "conversion",
        description="What an option's coupon costs: conversion = the coupon on every treated conversion "
        "(never more than it costs in truth; the 20,000-customer closed loop spent 60-75% of its budget); "
        "redemption = at the version's redemption model's P(redeemed) when it has one (closer on average, "
        "but the loop over-spent its budget by 14-49% in truth: the model under-predicts the redemptions "
        "of the customers it targets).",
    )
    cost_calibration_campaigns: int = Field(
        0,
        ge=0,
        description="Recent measured campaigns whose realised coupon costs calibrate the expected ones: each "
        "coupon's expected cost is multiplied by realised / expected (0, the default: no calibration). "
        "Measured in the 20,000-customer closed loop, it does not hold the budget in truth: the ratio moves "
        "with the customers targeted (those left by the cooldown redeem about half as often at the same "
        "predicted probability), so a round calibrated on the previous one spent 45-65% or 120-145% of "
        "its budget.",
    )
    cost_calibration_credibility: float = Field(
        30.0,
        gt=0,
        description="Redemptions at which a coupon's own realised / expected cost ratio weighs as much as "
        "its prior (all coupons' ratio; for that one, no calibration).",
    )
    attribution_rows: Literal["all", "decisive"] = Field(
        "all",
        description="Ledger rows whose reason carries feature attributions: all, or the decisive ones "
        "(treated, or within the treated rows' median margin of being treated); every row keeps its "
        "binding constraint, runner-up and margin either way.",
    )
    score_shards: int = Field(
        2,
        ge=1,
        le=1024,
        description="Customer shards scored in parallel (one Airflow mapped task each) before one solve.",
    )

    @model_validator(mode="after")
    def _shares_leave_room(self) -> CampaignSettings:
        if self.min_control_share > self.control_share:
            raise ValueError("min_control_share must not exceed control_share")
        if self.control_share + self.exploration_share >= 0.5:
            raise ValueError(
                "control_share + exploration_share must stay below 0.5 "
                "(otherwise most customers are not targeted by the model)"
            )
        return self


#: Customer columns a shop may declare as sensitive attributes (the warehouse's ``customers``
#: table; it holds no age or birth date, so there is no age band).
FAIRNESS_ATTRIBUTES = ("region", "device", "segment")


class GroupConstraintSettings(BaseModel):
    """Bound one group's share of a campaign's treated customers or of its spend.

    Shares are of the model policy's allocation (the optimiser's customers, budget and spend):
    ``min_treated_share: 0.2`` asks that at least 20% of the customers it treats belong to the
    group; ``max_budget_share: 0.3`` that at most 30% of what it spends goes to the group.
    """

    model_config = ConfigDict(extra="forbid")

    attribute: str = Field(description="A declared attribute (FAIRNESS__ATTRIBUTES), e.g. region.")
    group: str = Field(min_length=1, description="A value of that attribute, e.g. north.")
    min_treated_share: float | None = Field(None, ge=0, le=1)
    max_treated_share: float | None = Field(None, ge=0, le=1)
    min_budget_share: float | None = Field(None, ge=0, le=1)
    max_budget_share: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _bounds_make_sense(self) -> GroupConstraintSettings:
        name = f"{self.attribute}={self.group}"
        bounds = [getattr(self, f"{b}_{w}_share") for b in ("min", "max") for w in ("treated", "budget")]
        if all(b is None for b in bounds):
            raise ValueError(
                f"constraint {name} sets no bound: give min_treated_share, max_treated_share, "
                "min_budget_share or max_budget_share"
            )
        for what in ("treated", "budget"):
            low, high = getattr(self, f"min_{what}_share"), getattr(self, f"max_{what}_share")
            if low is not None and high is not None and low > high:
                raise ValueError(f"constraint {name}: min_{what}_share {low} exceeds max_{what}_share {high}")
        return self

    def bounds(self) -> list[tuple[str, str, float]]:
        """Return ``(bound, measure, share)`` for every bound set: ``("min", "treated", 0.2)``."""
        out = []
        for bound in ("min", "max"):
            for what, measure in (("treated", "treated"), ("budget", "spend")):
                share = getattr(self, f"{bound}_{what}_share")
                if share is not None:
                    out.append((bound, measure, float(share)))
        return out


class FairnessSettings(BaseModel):
    """Sensitive attributes the reports break down by, and optional allocation bounds per group."""

    attributes: list[str] = Field(
        default_factory=lambda: list(FAIRNESS_ATTRIBUTES),
        description=f"Customer columns shown by group in reports and MLflow, of {list(FAIRNESS_ATTRIBUTES)}.",
    )
    constraints: list[GroupConstraintSettings] = Field(
        default_factory=list, description="Bounds on groups' shares of treated customers or spend."
    )

    @field_validator("attributes")
    @classmethod
    def _known_attributes(cls, v: list[str]) -> list[str]:
        unknown = [a for a in v if a not in FAIRNESS_ATTRIBUTES]
        if unknown:
            raise ValueError(
                f"unknown attribute {unknown[0]!r}: attributes must be customer columns of "
                f"{list(FAIRNESS_ATTRIBUTES)}"
            )
        if len(set(v)) != len(v):
            raise ValueError(f"attributes must not repeat, got {v}")
        return v

    @model_validator(mode="after")
    def _constraints_on_declared(self) -> FairnessSettings:
        seen: dict[tuple[str, str], int] = {}
        min_total: dict[tuple[str, str], float] = {}
        for c in self.constraints:
            if c.attribute not in self.attributes:
                raise ValueError(
                    f"constraint {c.attribute}={c.group}: unknown attribute {c.attribute!r}; "
                    f"constraints must use a declared attribute of {self.attributes}"
                )
            key = (c.attribute, c.group)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > 1:
                raise ValueError(f"constraint {c.attribute}={c.group} is given twice; merge its bounds")
            for bound, measure, share in c.bounds():
                if bound == "min":
                    total = min_total.get((c.attribute, measure), 0.0) + share
                    min_total[(c.attribute, measure)] = total
                    if total > 1 + 1e-12:
                        raise ValueError(
                            f"minimum {measure} shares of {c.attribute} groups add up to {total:g} > 1: "
                            "only treating nobody would meet them"
                        )
        return self


class GateSettings(BaseModel):
    """Promotion gate: when may a challenger replace the champion automatically."""

    holdout_share: float = Field(
        0.2, gt=0, lt=1, description="Share of customers in the frozen evaluation holdout (never trained on)."
    )
    margin: float = Field(
        0.0, ge=0, description="Gain in conversions per customer the lower bound must exceed to promote."
    )
    confidence: float = Field(
        0.9, ge=0.5, lt=1, description="One-sided confidence of the gain's lower bound."
    )
    max_calibration_error: float = Field(
        0.05, gt=0, description="Calibration error allowed beyond what sampling noise explains."
    )
    min_test_rows: int = Field(50, ge=2, description="Fewest held-out rows that give a standard error.")
    treat_fraction: float = Field(
        0.3, gt=0, le=1, description="Share of an imported log's rows the gate's budget may treat."
    )


class RetrainSettings(BaseModel):
    """Conditions under which feedback triggers retraining."""

    min_new_labelled_rows: int = Field(500, ge=1)
    psi_threshold: float = Field(0.2, gt=0)
    cvr_shortfall: float = Field(0.3, gt=0, description="Relative shortfall of measured vs predicted.")


class ScheduleSettings(BaseModel):
    """When each scheduled DAG runs (cron expressions or Airflow presets).

    Production runs on the real clock; ``make up`` shortens them so a simulated shop whose days
    pass in seconds is ingested, allocated and measured while a person watches.
    """

    ingest: str = "@hourly"
    allocate: str = "0 6 * * 1"
    feedback: str = "@hourly"
    retrain: str = Field("0 3 * * 0", description="Weekly fallback beside the feedback asset.")


class RecommenderSettings(BaseModel):
    """The product recommender (``mlpkg.recommend``) and the products a message shows."""

    registered_model_name: str = "couponops-recommender"
    experiment: str = "couponops-recommender"
    algorithm: Literal["als", "bpr"] = Field("als", description="implicit's ALS or BPR.")
    factors: int = Field(16, ge=2)
    iterations: int = Field(20, ge=1)
    regularization: float = Field(0.05, ge=0)
    alpha: float = Field(2.0, gt=0, description="ALS confidence per unit of interaction weight.")
    learning_rate: float = Field(0.05, gt=0, description="BPR learning rate.")
    seed: int = 0
    test_days: int = Field(14, ge=1, description="The evaluation's test window: the last days before as-of.")
    k: int = Field(10, ge=1, description="Cut-off of recall@k and NDCG@k.")
    ranked_per_customer: int = Field(30, ge=1, description="Products stored per customer for a campaign.")
    products_per_message: int = Field(4, ge=0, le=12, description="Products a message shows (0: none).")
    template_dir: Path | None = Field(
        None, description="Folder of Jinja2 templates overriding the packaged ones (same file names)."
    )


class PrivacySettings(BaseModel):
    """Pseudonyms of customer ids and retention of behaviour data (see :mod:`mlpkg.privacy`)."""

    pseudonym_key: SecretStr | None = Field(
        None,
        description="HMAC key of customer pseudonyms (from the secret backend); None: the state folder's "
        "generated key (secrets/pseudonym.key).",
    )
    generate_key: bool = Field(
        True,
        description="Generate the key file when no key is set; false (production): a missing key fails.",
    )
    retention_days: int | None = Field(
        None,
        ge=1,
        description="Behaviour events older than this many days are purged; None keeps them forever.",
    )

    @field_validator("pseudonym_key")
    @classmethod
    def _long_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value().strip()) < 16:
            raise ValueError("privacy.pseudonym_key must have at least 16 characters")
        return v


class Settings(BaseSettings):
    """All CouponOps settings; read once with :func:`get_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="COUPONOPS_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        # A rejected value may be a URL with a password: errors name the field, never echo the input.
        hide_input_in_errors=True,
    )

    state_dir: Path = Path(".couponops")
    warehouse_url: str | None = Field(
        None, description="SQLAlchemy URL; default: SQLite file in the state folder."
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default: SQLite file in the state folder."
    )
    mlflow_artifact_root: str | None = None
    mlflow_ui_url: str | None = Field(
        "http://127.0.0.1:5000",
        description="Where people open the MLflow UI (links from Airflow); None: no MLflow links.",
    )
    mlflow_experiment: str = "couponops"
    registered_model_name: str = "couponops-uplift"
    currency: str = Field("EUR", pattern=r"^[A-Z]{3}$", description="ISO 4217 code of the shop's money.")
    source: Literal["landing", "simulator"] = Field(
        "landing",
        description=(
            "Where batches and feedback come from. landing: a shop drops complete batches into the "
            "landing zone; simulator: the simulated shop writes its exports into that same zone."
        ),
    )
    landing_url: str | None = Field(
        None, description="Landing zone: a folder or any fsspec URL; default: <state>/landing."
    )
    clock: Literal["wall", "data"] = Field(
        "wall",
        description=(
            "The product's 'now': wall = the real clock; data = the export time of the newest loaded "
            "batch (for a simulated shop whose clock runs faster than the wall's)."
        ),
    )
    simulator_seed: int = 7
    simulator_customers: int = Field(4000, ge=50)
    strict_columns: bool = Field(False, description="Fail (not warn) on unexpected extra columns.")
    # A Parquet events file with more rows is validated and loaded in chunks of this many rows.
    ingest_chunk_rows: int = Field(500_000, ge=1_000)
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 8025
    smtp_sender: str = "offers@couponops.local"
    smtp_username: str | None = Field(None, description="SMTP AUTH login; None sends without logging in.")
    smtp_password: SecretStr | None = Field(None, description="SMTP AUTH password (never printed).")
    smtp_security: Literal["none", "starttls", "ssl"] = Field(
        "none",
        description="none: plain SMTP; starttls: upgrade with STARTTLS (no fallback); ssl: implicit TLS.",
    )
    smtp_ca_file: Path | None = Field(
        None, description="PEM bundle trusted for the SMTP server's certificate; default: the system CAs."
    )
    sms_webhook_url: str | None = Field(
        None, description="SMS gateway endpoint; user:password in the URL is sent as basic auth."
    )
    sms_webhook_token: SecretStr | None = Field(None, description="Bearer token for the SMS gateway.")
    push_webhook_url: str | None = Field(
        None, description="Push gateway endpoint; user:password in the URL is sent as basic auth."
    )
    push_webhook_token: SecretStr | None = Field(None, description="Bearer token for the push gateway.")
    delivery_mode: Literal["file", "live"] = "file"
    delivery_max_attempts: int = Field(5, ge=1)
    delivery_backoff_seconds: float = Field(0.5, ge=0)
    trainer: TrainerSettings = TrainerSettings()
    campaign: CampaignSettings = CampaignSettings()
    gate: GateSettings = GateSettings()
    retrain: RetrainSettings = RetrainSettings()
    schedules: ScheduleSettings = ScheduleSettings()
    privacy: PrivacySettings = PrivacySettings()
    fairness: FairnessSettings = FairnessSettings()
    recommender: RecommenderSettings = RecommenderSettings()

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
            raise ValueError(
                f"warehouse_url must be a SQLAlchemy URL (sqlite/postgresql/mysql), got {mask_url(v)!r}"
            )
        return v

    @field_validator("smtp_password")
    @classmethod
    def _password_needs_login(cls, v: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if v is not None and not info.data.get("smtp_username"):
            raise ValueError("smtp_password is set but smtp_username is not: SMTP AUTH needs both")
        return v

    @field_validator("smtp_security")
    @classmethod
    def _no_cleartext_password(cls, v: str, info: ValidationInfo) -> str:
        host = info.data.get("smtp_host", "")
        if v == "none" and info.data.get("smtp_password") is not None and not _is_loopback(host):
            raise ValueError(
                f"smtp_security='none' would send the SMTP password in clear text to {host!r}; "
                "use 'starttls' or 'ssl'"
            )
        return v

    @field_validator("mlflow_tracking_uri")
    @classmethod
    def _no_password_in_tracking_uri(cls, v: str | None) -> str | None:
        if v is not None and v.lower().startswith(("http://", "https://")) and mask_url(v) != v:
            # MLflow prints a server's tracking URI in every run link it logs.
            raise ValueError(
                f"mlflow_tracking_uri {mask_url(v)!r} carries a password; give the URL without it and set "
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
            )
        return v

    @field_validator("sms_webhook_url", "push_webhook_url", "mlflow_ui_url")
    @classmethod
    def _http_webhook(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and not v.lower().startswith(("http://", "https://")):
            raise ValueError(f"{info.field_name} must be an http(s) URL, got {mask_url(v)!r}")
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
    def event_store_dir(self) -> Path:
        """Folder of the columnar event store (Parquet parts; shared by every worker in production)."""
        return self.state_dir / "event-store"

    @property
    def reports_dir(self) -> Path:
        """Folder holding HTML reports and plots."""
        return self.state_dir / "reports"

    @property
    def previews_dir(self) -> Path:
        """Folder of rendered message previews (``couponops preview``)."""
        return self.state_dir / "previews"

    @property
    def outbox_dir(self) -> Path:
        """Folder the file sender writes dry-run messages to."""
        return self.state_dir / "outbox"

    @property
    def resolved_landing_url(self) -> str:
        """The landing zone, defaulting to ``<state>/landing``."""
        return self.landing_url or str(self.state_dir / "landing")

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
            self.event_store_dir,
            self.reports_dir,
            self.outbox_dir,
        ):
            d.mkdir(parents=True, exist_ok=True)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings (cached; call ``get_settings.cache_clear()`` in tests)."""
    return Settings()


# --- secrets: what may be shown -------------------------------------------------------------------------

MASK = "***"
# Query parameters whose values are credentials (libpq's password, signed-URL tokens...).
_SECRET_QUERY_KEYS = frozenset(
    {"password", "passwd", "pwd", "sslpassword", "secret", "client_secret", "token", "access_token"}
    | {"api_key", "apikey"}
)


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def mask_url(url: str) -> str:
    """Return ``url`` with its password and secret query values replaced by ``***``.

    Works on any ``scheme://user:password@host/...`` form (SQLAlchemy URLs such as
    ``postgresql+psycopg://``, MLflow and webhook URLs with basic auth, fsspec URLs). A password
    that contains a raw ``/`` is masked too: the user info runs to the last ``@`` before the query,
    as in SQLAlchemy's URL grammar, so the mask errs on the side of hiding. Strings that are not
    URLs (plain paths) come back unchanged.

    Args:
        url: Any URL or path.

    Returns:
        The same URL, safe to print or log.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme or not (scheme[0].isalpha() and all(c.isalnum() or c in "+.-" for c in scheme)):
        return url
    query_at = min((i for i in (rest.find("?"), rest.find("#")) if i != -1), default=len(rest))
    at = rest.rfind("@", 0, query_at)
    if at != -1:
        userinfo = rest[:at]
        colon, slash = userinfo.find(":"), userinfo.find("/")
        if colon != -1 and (slash == -1 or colon < slash):
            rest = f"{userinfo[:colon]}:{MASK}{rest[at:]}"
    head, q, query = rest.partition("?")
    if q:
        query, hash_sign, fragment = query.partition("#")
        items = []
        for item in query.split("&"):
            key, eq, value = item.partition("=")
            if eq and value and key.lower() in _SECRET_QUERY_KEYS:
                item = f"{key}={MASK}"
            items.append(item)
        rest = f"{head}?{'&'.join(items)}{hash_sign}{fragment}"
    return f"{scheme}://{rest}"


def _public(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, BaseModel):
        return {name: _public(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, dict):
        return {str(k): _public(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_public(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str) and "://" in value:
        return mask_url(value)
    return value


def public_dict(settings: Settings) -> dict[str, Any]:
    """Return the settings as plain values that are safe to print, log or store in MLflow.

    Secrets (``SecretStr`` fields) become ``***`` and every URL has its password masked, the
    resolved warehouse and tracking URLs included.

    Args:
        settings: The settings to show.

    Returns:
        A nested dict of JSON-ready values without any password.
    """
    data = _public(settings)
    data["resolved_warehouse_url"] = mask_url(settings.resolved_warehouse_url)
    data["resolved_tracking_uri"] = mask_url(settings.resolved_tracking_uri)
    return data
