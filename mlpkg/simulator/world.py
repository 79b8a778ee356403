"""The simulated shop: a seeded world with known ground-truth uplift.

A :class:`Shop` is fully determined by its :class:`ShopConfig` plus the list of ``advance``
steps taken, so ``world.json`` is enough to rebuild it. It exports raw batches in the shared
contract's format, answers campaigns with random customer behaviour (:meth:`Shop.respond`), and
exposes the exact truth behind that behaviour for evaluation code (``true_*``, ``oracle_value``).
The product must never read the truth; only ``mlpkg.evaluation`` may.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mlpkg.simulator.behaviour import (
    Activity,
    Response,
    campaign_assignment,
    draw_response,
    hidden_type_names,
    response_activity,
    simulate_activity,
)
from mlpkg.simulator.catalogue import (
    Catalogue,
    draw_catalogue,
    draw_tastes,
    event_products,
    order_products,
    relevance,
)
from mlpkg.simulator.export import (
    CAMPAIGN_LOG_COLUMNS,
    FEEDBACK_COLUMNS,
    ContactBook,
    channels_frame,
    consent_frame,
    contacts_frame,
    coupons_frame,
    customers_frame,
    draw_contacts,
    events_table,
    iso,
    orders_frame,
    products_frame,
    to_seconds,
    to_timestamp,
    write_csv,
    write_events,
)
from mlpkg.simulator.population import DAY, Population, generate_population
from mlpkg.simulator.spec import Arm, ShopConfig
from mlpkg.simulator.truth import ArmTable, matrix_truth, pair_truth

WORLD_FORMAT = "couponops-shop/1"
_SIGNUP_GAP_DAYS = 20  # initial customers sign up at least this long before `now`
_NEW_SEGMENT_DAYS = 60
_COUPON_VALIDITY_DAYS = 30

# Independent random streams, so drawing more of one thing never shifts another.
_STREAM_POPULATION, _STREAM_HISTORY, _STREAM_CAMPAIGN, _STREAM_CAMPAIGN_ROWS = 1, 2, 3, 4
_STREAM_RESPOND, _STREAM_SIGNUPS, _STREAM_ADVANCE = 5, 100, 200
# Contact details of population part k (0 = the initial customers) come from (300, k).
_STREAM_CONTACTS = 300
# The catalogue, the tastes of population part k (500, k) and the products of period k's
# events and orders (600, k): drawn apart, so a shop with products behaves as one without.
_STREAM_CATALOGUE, _STREAM_TASTES, _STREAM_PRODUCTS = 400, 500, 600


class Shop:
    """A seeded e-commerce shop whose customers react to coupons with known uplift.

    Args:
        config: The world's knobs; the same config always gives the same shop.
    """

    def __init__(self, config: ShopConfig | None = None) -> None:
        """Draw the customers; history is drawn lazily when a batch is exported."""
        self.config = config or ShopConfig()
        cfg = self.config
        self._table = ArmTable.from_config(cfg)
        self._coupon_index = {c.coupon_id: i for i, c in enumerate(cfg.coupons)}
        start = to_seconds(cfg.opened_at)
        now = start + cfg.history_days * DAY
        self._sent_at = now - cfg.campaign_offset_days * DAY
        pop = generate_population(
            cfg,
            cfg.n_customers,
            0,
            start,
            now - _SIGNUP_GAP_DAYS * DAY,
            self._rng(_STREAM_POPULATION),
            early_skew=True,
            new_before=now - _NEW_SEGMENT_DAYS * DAY,
        )
        self._parts: list[Population] = [pop]
        self._pop = pop
        self._index = pd.Index(pop.customer_id)
        self._bounds: list[tuple[int, int]] = [(start, now)]
        self._advances: list[int] = []
        self._exports: dict[str, tuple[int, int]] = {}
        self.catalogue: Catalogue = draw_catalogue(self._rng(_STREAM_CATALOGUE))

    # --- identity and time -------------------------------------------------------------------

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, *keys])

    @property
    def arms(self) -> list[Arm]:
        """Treatment arms (coupon x channel); ``control`` is not among them."""
        return list(self._table.arms)

    @property
    def arm_names(self) -> list[str]:
        """``["control", *arm names]``; the column order of the ``true_*`` matrices."""
        return self._table.names

    @property
    def now(self) -> pd.Timestamp:
        """End of the simulated history so far (``opened_at + history_days`` until advanced)."""
        return to_timestamp(self._bounds[-1][1])

    @property
    def campaign_sent_at(self) -> pd.Timestamp:
        """When the past randomized campaign was sent (its features' as-of time)."""
        return to_timestamp(self._sent_at)

    @property
    def campaign_id(self) -> str:
        """Id of the past randomized campaign in ``campaign_log.csv``."""
        return f"hist-{self.campaign_sent_at:%Y%m%d}"

    @property
    def customer_ids(self) -> list[str]:
        """Ids of every customer who has signed up by ``now``."""
        return self._pop.customer_id.tolist()

    def addresses(self, channel: str) -> dict[str, str]:
        """Return each signed-up customer's address on ``channel`` (customers without one left out)."""
        book = self._contacts_upto(len(self._parts) - 1)
        column = {"email": book.email, "sms": book.phone, "push": book.push_token}[channel]
        ids = self._population_upto(len(self._parts) - 1).customer_id
        return {str(c): str(a) for c, a in zip(ids, column, strict=True) if a}

    def customers_of_recipients(self, channels: Sequence[str], digests: Sequence[str]) -> list[str | None]:
        """Return the customer id behind each message's address digest (None: not one of ours).

        The product hands the channel an address, never the shop's customer id (its messages carry
        pseudonyms), so the simulated provider finds the customer as a real one would: by address.
        The file channel writes the SHA-256 of the address, compared here with the shop's book.
        """
        import hashlib

        lookup: dict[tuple[str, str], str] = {}
        for channel in set(channels) & {"email", "sms", "push"}:
            for cid, address in self.addresses(channel).items():
                lookup[(channel, hashlib.sha256(address.strip().encode()).hexdigest())] = cid
        return [lookup.get((str(c), str(d))) for c, d in zip(channels, digests, strict=True)]

    def signed_up_before(self, ts: pd.Timestamp) -> list[str]:
        """Return the ids of the customers who had signed up before ``ts``."""
        return self._pop.customer_id[self._pop.signup < to_seconds(ts)].tolist()

    def know_ids(self, alias_of: Callable[[str], str]) -> None:
        """Also accept ``alias_of(customer id)`` wherever a customer id is asked for.

        The product stores keyed pseudonyms, not the shop's ids; the lab, which compares the
        product's ledger with the truth, hands the shop the product's pseudonym function.
        """
        self._alias_of, self._aliases = alias_of, {}

    def _indices(self, customer_ids: Sequence[str]) -> np.ndarray:
        ids = pd.Index(np.asarray(customer_ids, dtype=object))
        alias_of = getattr(self, "_alias_of", None)
        if alias_of is not None:
            if len(self._aliases) != len(self._pop):
                self._aliases = {alias_of(str(c)): str(c) for c in self._pop.customer_id}
            ids = pd.Index([self._aliases.get(c, c) for c in ids], dtype=object)
        idx = self._index.get_indexer(ids)
        if (idx < 0).any():
            missing = ids[idx < 0][:5].tolist()
            raise KeyError(f"unknown customer ids (first few): {missing}")
        return idx.astype(np.int64)

    def _arm_indices(self, arms: Sequence[str]) -> np.ndarray:
        lookup = {name: i for i, name in enumerate(self.arm_names)}
        try:
            return np.array([lookup[str(a)] for a in arms], dtype=np.int64)
        except KeyError as err:
            raise ValueError(f"unknown arm {err.args[0]!r}; known arms: {self.arm_names}") from None

    def _allocation(self, allocation: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        missing = {"customer_id", "arm"} - set(allocation.columns)
        if missing:
            raise ValueError(f"allocation lacks columns {sorted(missing)}")
        if allocation["customer_id"].duplicated().any():
            raise ValueError("allocation assigns some customer more than once")
        return self._indices(allocation["customer_id"].tolist()), self._arm_indices(
            allocation["arm"].tolist()
        )

    # --- ground truth (evaluation code only) -------------------------------------------------------

    def true_conversion(self, customer_ids: Sequence[str]) -> np.ndarray:
        """Return P(order within the window | arm), ``[n, len(arm_names)]``, column 0 = control."""
        return matrix_truth(self._pop, self._indices(customer_ids), self._table, "conversion")

    def true_revenue(self, customer_ids: Sequence[str]) -> np.ndarray:
        """Return E[order value | converted, arm], ``[n, len(arm_names)]``."""
        return matrix_truth(self._pop, self._indices(customer_ids), self._table, "revenue")

    def true_coupon_cost(self, customer_ids: Sequence[str]) -> np.ndarray:
        """Return E[coupon cost | converted and redeemed, arm] (0 for control and undeliverable arms)."""
        return matrix_truth(self._pop, self._indices(customer_ids), self._table, "coupon_cost")

    def true_redemption(self, customer_ids: Sequence[str]) -> np.ndarray:
        """Return P(coupon redeemed | converted, arm), ``[n, len(arm_names)]``."""
        return matrix_truth(self._pop, self._indices(customer_ids), self._table, "redeem")

    def true_redeemed_basket(self, customer_ids: Sequence[str]) -> np.ndarray:
        """Return E[order value | redeemed, arm], ``[n, len(arm_names)]`` (the basket for control)."""
        return matrix_truth(self._pop, self._indices(customer_ids), self._table, "redeemed_basket")

    def true_uplift(self, customer_ids: Sequence[str]) -> np.ndarray:
        """Return true conversion uplift vs control, ``[n, len(arms)]`` (arms in ``self.arms`` order)."""
        conv = self.true_conversion(customer_ids)
        return conv[:, 1:] - conv[:, :1]

    def segment_truth(self, customer_ids: Sequence[str]) -> np.ndarray:
        """Return the hidden type of each customer: persuadable|sure_thing|lost_cause|sleeping_dog."""
        return hidden_type_names(self._pop, self._indices(customer_ids))

    def deliverable(self, customer_ids: Sequence[str]) -> np.ndarray:
        """Return whether each arm's message reaches each customer (consent), ``[n, len(arms)]``."""
        idx = self._indices(customer_ids)
        return self._pop.consent[idx][:, self._table.channel[1:]]

    def oracle_value(self, allocation: pd.DataFrame, margin: float = 0.35) -> dict[str, float]:
        """Return the exact expected value of an allocation against sending nothing to anyone.

        Args:
            allocation: Columns ``customer_id`` and ``arm`` (``control`` = nothing sent), and
                optionally ``products``: the product ids each message shows (a list per row).
            margin: Gross margin applied to incremental revenue.

        Returns:
            ``incremental_conversions``, ``incremental_revenue``, ``expected_coupon_cost``,
            ``send_cost``, ``incremental_profit`` (= margin x revenue - coupon cost - send cost)
            and ``n_treated``.
        """
        idx, arm = self._allocation(allocation)
        treated = pair_truth(self._pop, idx, arm, self._table, self._shown_relevance(idx, allocation))
        control = pair_truth(self._pop, idx, np.zeros_like(arm), self._table)
        conv = float(np.sum(treated["conversion"] - control["conversion"]))
        revenue = float(
            np.sum(treated["conversion"] * treated["revenue"] - control["conversion"] * control["revenue"])
        )
        coupon = float(np.sum(treated["conversion"] * treated["redeem"] * treated["coupon_cost"]))
        send = float(np.sum(treated["send_cost"]))
        return {
            "incremental_conversions": conv,
            "incremental_revenue": revenue,
            "expected_coupon_cost": coupon,
            "send_cost": send,
            "incremental_profit": margin * revenue - coupon - send,
            "n_treated": int(np.sum(arm > 0)),
        }

    def _shown_relevance(self, idx: np.ndarray, allocation: pd.DataFrame) -> np.ndarray | None:
        """Return the relevance of each allocation row's shown products (None: no ``products`` column)."""
        if "products" not in allocation.columns:
            return None
        shown = [list(p) if isinstance(p, list | tuple | np.ndarray) else [] for p in allocation["products"]]
        return self._relevance(idx, shown)

    # --- customer behaviour ----------------------------------------------------------------------

    def respond(
        self,
        population: Sequence[str],
        allocation: pd.DataFrame,
        campaign_id: str,
        sent_at: pd.Timestamp,
        seed: int,
    ) -> pd.DataFrame:
        """Simulate what customers do in the window after a campaign send (random draws).

        Everyone in ``population`` (and in ``allocation``) may order at their baseline rate;
        treated customers react to their arm. Messages through channels a customer has not
        opted in to are not delivered. Coupon inventory is not enforced here.

        Args:
            population: Customers whose orders count (treated, held-out control and untargeted).
            allocation: Columns ``customer_id`` and ``arm``; ``control`` rows are not contacted.
                An optional ``products`` column lists the product ids each message shows: the more
                of them the customer likes, the likelier a click (see :mod:`mlpkg.simulator.truth`).
            campaign_id: Id stamped on every feedback event.
            sent_at: Send time; orders fall in ``[sent_at, sent_at + window_days)``.
            seed: Seed of the draws (different seeds give different outcomes).

        Returns:
            Feedback events (``feedback.csv`` columns) sorted by time: ``delivered``, ``open``,
            ``click``, ``redeem`` and ``order`` (with revenue; coupon_id set when redeemed).
            ``ts`` is a UTC datetime column.
        """
        a_idx, a_arm = self._allocation(allocation)
        pop_idx = self._indices(list(population)) if len(population) else np.zeros(0, dtype=np.int64)
        idx = np.union1d(pop_idx, a_idx).astype(np.int64)
        arm = np.zeros(len(idx), dtype=np.int64)
        arm[np.searchsorted(idx, a_idx)] = a_arm
        rng = np.random.default_rng([self.config.seed, _STREAM_RESPOND, int(seed)])
        shown = self._shown_relevance(a_idx, allocation)
        rel = None
        if shown is not None:
            rel = np.zeros(len(idx))
            rel[np.searchsorted(idx, a_idx)] = shown
        resp = draw_response(
            self._pop, idx, arm, self._table, to_seconds(sent_at), self.config.window_days, rng, rel
        )
        return self._feedback_frame(resp, campaign_id)

    def _feedback_frame(self, resp: Response, campaign_id: str) -> pd.DataFrame:
        coupon_of_arm = np.array(["", *(a.coupon_id for a in self._table.arms)], dtype=object)
        channel_of_arm = np.array(["", *(a.channel for a in self._table.arms)], dtype=object)
        converted = resp.converted
        order_id = np.full(len(converted), "", dtype=object)
        order_id[converted] = [f"{campaign_id}-O{i}" for i in range(int(converted.sum()))]
        kinds = [
            ("delivered", resp.delivered, resp.ts_delivered, False),
            ("open", resp.opened, resp.ts_open, False),
            ("click", resp.clicked, resp.ts_click, False),
            ("redeem", resp.redeemed, resp.ts_order, True),
            ("order", converted, resp.ts_order, True),
        ]
        frames = []
        for rank, (name, mask, ts, with_order) in enumerate(kinds):
            coupon = coupon_of_arm[resp.arm[mask]]
            if name == "order":
                coupon = np.where(resp.redeemed[mask], coupon, "")
            frames.append(
                pd.DataFrame(
                    {
                        "campaign_id": campaign_id,
                        "customer_id": self._pop.customer_id[resp.idx[mask]],
                        "event_type": name,
                        "ts_s": ts[mask],
                        "coupon_id": coupon,
                        "channel": channel_of_arm[resp.arm[mask]],
                        "order_id": order_id[mask] if with_order else "",
                        "revenue": np.round(resp.revenue[mask], 2) if name == "order" else 0.0,
                        "_rank": rank,
                    }
                )
            )
        out = pd.concat(frames, ignore_index=True).sort_values(
            ["ts_s", "customer_id", "_rank"], kind="stable"
        )
        out.insert(0, "event_id", [f"{campaign_id}-E{i}" for i in range(len(out))])
        out["ts"] = pd.to_datetime(out["ts_s"], unit="s", utc=True)
        return out[FEEDBACK_COLUMNS].reset_index(drop=True)

    @staticmethod
    def write_feedback(df: pd.DataFrame, out_dir: Path) -> Path:
        """Write feedback events to ``out_dir/feedback.csv`` with ISO-8601 UTC times."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        ts = pd.to_datetime(df["ts"], utc=True)
        return write_csv(
            df.assign(ts=ts.dt.strftime("%Y-%m-%dT%H:%M:%SZ"))[FEEDBACK_COLUMNS], out_dir / "feedback.csv"
        )

    # --- history ---------------------------------------------------------------------------------

    def _past_campaign(self) -> tuple[Response, np.ndarray]:
        """Draw the past randomized campaign: customers, arms, propensities and responses."""
        n = len(self._parts[0])
        rng = self._rng(_STREAM_CAMPAIGN)
        size = max(1, round(self.config.campaign_share * n))
        idx = np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)
        arm, propensity = campaign_assignment(self._pop, idx, self._table, self._sent_at, rng)
        resp = draw_response(self._pop, idx, arm, self._table, self._sent_at, self.config.window_days, rng)
        return resp, propensity

    def past_campaign(self) -> pd.DataFrame:
        """Return the past randomized campaign as ``campaign_log.csv`` rows."""
        resp, propensity = self._past_campaign()
        arms = np.asarray(self.arm_names, dtype=object)
        coupon_of_arm = np.array(["", *(a.coupon_id for a in self._table.arms)], dtype=object)
        channel_of_arm = np.array(["", *(a.channel for a in self._table.arms)], dtype=object)
        return pd.DataFrame(
            {
                "campaign_id": self.campaign_id,
                "customer_id": self._pop.customer_id[resp.idx],
                "arm": arms[resp.arm],
                "coupon_id": coupon_of_arm[resp.arm],
                "channel": channel_of_arm[resp.arm],
                "propensity": propensity,
                "policy": "random",
                "sent_at": iso(self._sent_at)[0],
                "opened": resp.opened.astype(np.int64),
                "clicked": resp.clicked.astype(np.int64),
                "converted": resp.converted.astype(np.int64),
                "redeemed": resp.redeemed.astype(np.int64),
                "revenue": np.round(resp.revenue, 2),
                "coupon_cost": np.round(resp.coupon_cost, 2),
            }
        )[CAMPAIGN_LOG_COLUMNS]

    def _population_upto(self, period: int) -> Population:
        return self._parts[0] if period == 0 else Population.concat(self._parts[: period + 1])

    def _tastes_upto(self, period: int) -> np.ndarray:
        """Return the hidden product tastes of the customers of ``_population_upto(period)``."""
        parts = self._parts[: period + 1]
        tastes = [draw_tastes(len(p), self._rng(_STREAM_TASTES, k)) for k, p in enumerate(parts)]
        return np.concatenate(tastes, axis=0)

    def _relevance(self, idx: np.ndarray, shown: Sequence[Sequence[str]]) -> np.ndarray:
        """Return the relevance of the products shown to customers ``idx`` (see catalogue.relevance)."""
        tastes = self._tastes_upto(len(self._parts) - 1)[idx]
        return relevance(self.catalogue, tastes, shown)

    def _period_products(self, period: int, act: Activity, pop: Population) -> tuple[np.ndarray, np.ndarray]:
        """Return the product row of each event and each order of period ``period``'s activity."""
        tastes = self._tastes_upto(len(self._parts) - 1)[: len(pop)]
        rng = self._rng(_STREAM_PRODUCTS, period)
        category = act.ev_category.astype(np.int64)
        events = event_products(self.catalogue, tastes, act.ev_customer, category, rng)
        return events, order_products(self.catalogue, tastes, act.or_customer, rng)

    def _contacts_upto(self, period: int) -> ContactBook:
        """Return the contact details of the customers of ``_population_upto(period)``."""
        parts = self._parts[: period + 1]
        books = [draw_contacts(part, self._rng(_STREAM_CONTACTS, k)) for k, part in enumerate(parts)]
        return books[0] if len(books) == 1 else ContactBook.concat(books)

    def _activity(self, period: int) -> Activity:
        """Draw the everyday activity of one period (period 0 = the initial history)."""
        start, end = self._bounds[period]
        pop = self._population_upto(period)
        if period > 0:
            return simulate_activity(pop, self.config, start, end, self._rng(_STREAM_ADVANCE, period))
        act = simulate_activity(pop, self.config, start, end, self._rng(_STREAM_HISTORY))
        # Campaign customers' orders in the campaign window are their campaign outcomes, so the
        # log and the order history tell the same story.
        resp, _ = self._past_campaign()
        in_campaign = np.zeros(len(pop), dtype=bool)
        in_campaign[resp.idx] = True
        window_end = self._sent_at + self.config.window_days * DAY
        clash = in_campaign[act.or_customer] & (act.or_ts >= self._sent_at) & (act.or_ts < window_end)
        extra = response_activity(
            resp, pop, self._table, self._coupon_index, self._rng(_STREAM_CAMPAIGN_ROWS)
        )
        return Activity.concat([act.keep_orders(~clash), extra])

    def advance(self, days: int) -> None:
        """Move ``now`` forward by ``days``, drawing new signups and everyday activity.

        Campaign responses drawn by :meth:`respond` are not added to the history; they live in
        ``feedback.csv``.
        """
        if int(days) < 1:
            raise ValueError("days must be a positive integer")
        days = int(days)
        k = len(self._advances) + 1
        start = self._bounds[-1][1]
        end = start + days * DAY
        rng = self._rng(_STREAM_SIGNUPS, k)
        n_new = int(rng.poisson(self.config.new_customers_per_day * self.config.n_customers * days))
        part = generate_population(
            self.config, n_new, len(self._pop), start, end, rng, early_skew=False, new_before=start
        )
        part.consent_updated = np.minimum(part.consent_updated, end - 1)
        self._parts.append(part)
        self._pop = Population.concat(self._parts)
        self._index = pd.Index(self._pop.customer_id)
        self._bounds.append((start, end))
        self._advances.append(days)

    # --- export ----------------------------------------------------------------------------------

    def export_batch(self, out_dir: Path, batch: str = "initial") -> dict[str, Path]:
        """Write a raw batch folder in the shared contract's format.

        The first export holds the whole history up to ``now`` and the past campaign
        (``campaign_log.csv``); each later batch holds only the events and orders drawn since the
        previous export, plus full customers, contacts, consent, channels and coupons. Exporting
        the same batch name again rewrites the same content.

        Args:
            out_dir: The batch folder to write into (created if missing).
            batch: The batch's name.

        Returns:
            File paths keyed by table name (``customers``, ``contacts``, ``consent``,
            ``channels``, ``coupons``, ``events``, ``orders``, and ``campaign_log`` when present).
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if batch not in self._exports:
            claimed = [p for first, last in self._exports.values() for p in range(first, last + 1)]
            first = max(claimed, default=-1) + 1
            self._exports[batch] = (first, len(self._bounds) - 1)
        first, last = self._exports[batch]
        batch_end = self._bounds[last][1]
        pop = self._population_upto(last)
        rows = np.flatnonzero(pop.signup < batch_end)
        cfg = self.config
        paths = {
            "customers": write_csv(customers_frame(pop, rows), out_dir / "customers.csv"),
            "contacts": write_csv(
                contacts_frame(pop, self._contacts_upto(last), rows), out_dir / "contacts.csv"
            ),
            "consent": write_csv(consent_frame(pop, rows, cfg), out_dir / "consent.csv"),
            "channels": write_csv(channels_frame(cfg), out_dir / "channels.csv"),
            "coupons": write_csv(
                coupons_frame(
                    cfg,
                    self._sent_at - self._sent_at % DAY,
                    batch_end + _COUPON_VALIDITY_DAYS * DAY,
                    restocks=last,
                ),
                out_dir / "coupons.csv",
            ),
        }
        paths["products"] = write_csv(products_frame(self.catalogue), out_dir / "products.csv")
        tables, orders = [], []
        for period in range(first, last + 1):
            act = self._activity(period)
            ev_products, or_products = self._period_products(period, act, pop)
            tables.append(events_table(pop, act, period, (self.catalogue, ev_products)))
            orders.append(orders_frame(pop, act, cfg, period, (self.catalogue, or_products)))
        paths["events"] = write_events(tables, out_dir / "events.parquet")
        if not orders:
            orders.append(orders_frame(pop, _no_activity(), cfg, 0, (self.catalogue, np.zeros(0, np.int64))))
        paths["orders"] = write_csv(pd.concat(orders, ignore_index=True), out_dir / "orders.csv")
        if first == 0:
            paths["campaign_log"] = write_csv(self.past_campaign(), out_dir / "campaign_log.csv")
        return paths

    # --- persistence -----------------------------------------------------------------------------

    def save(self, path: Path) -> Path:
        """Write ``world.json`` (config, advance steps, export cursor); ``path`` may be a folder."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "world.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "format": WORLD_FORMAT,
            "config": self.config.to_dict(),
            "advances": self._advances,
            "exports": {k: list(v) for k, v in self._exports.items()},
            "now": self.now.isoformat(),
        }
        path.write_text(json.dumps(state, indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: Path) -> Shop:
        """Rebuild a shop saved with :meth:`save` (identical customers, history and truth)."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "world.json"
        state = json.loads(path.read_text())
        if state.get("format") != WORLD_FORMAT:
            raise ValueError(f"{path} is not a CouponOps simulator world ({WORLD_FORMAT})")
        shop = cls(ShopConfig.from_dict(state["config"]))
        for days in state.get("advances", []):
            shop.advance(days)
        shop._exports = {k: (int(v[0]), int(v[1])) for k, v in state.get("exports", {}).items()}
        return shop

    def __repr__(self) -> str:
        """Return a short description (seed, customers, now)."""
        return f"Shop(seed={self.config.seed}, customers={len(self._pop)}, now={self.now.isoformat()})"


def _no_activity() -> Activity:
    empty = np.zeros(0, dtype=np.int64)
    return Activity(
        empty, empty, empty.astype(np.int8), empty.astype(np.int8), empty, empty, np.zeros(0), empty, empty
    )
