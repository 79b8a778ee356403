"""Customers of the simulated shop: observable attributes and the hidden latents behind them.

The hidden type and the continuous latents drive both what a customer does every day (the
history the product sees) and how a coupon changes their conversion (the ground truth the
product never sees). Times are int64 seconds since the Unix epoch throughout the simulator.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from mlpkg.simulator.spec import CHANNELS, HIDDEN_TYPES, ShopConfig

DAY = 86_400
REGIONS = np.array(["north", "south", "east", "west", "central"])
REGION_SHARES = np.array([0.22, 0.24, 0.2, 0.18, 0.16])
DEVICES = np.array(["ios", "android", "desktop"])
DEVICE_SHARES = np.array([0.35, 0.40, 0.25])
SEGMENTS = np.array(["new", "regular", "vip", "lapsed"])
CATEGORIES = np.array(["electronics", "fashion", "home", "beauty", "sports", "grocery", "toys", "books"])

# Per hidden type, in HIDDEN_TYPES order: persuadable, sure_thing, lost_cause, sleeping_dog.
_ENGAGEMENT = np.array([1.2, 1.8, 0.15, 0.9])
_BASE_CONVERSION = np.array([0.02, 0.15, 0.003, 0.035])  # 7-day baseline, before noise
_PRICE_SENS_BETA = np.array([[6.0, 2.0], [2.0, 5.0], [2.0, 3.0], [2.0, 4.0]])
_RESPONSIVENESS = np.array([1.15, 1.1, 0.4, 0.25])  # dogs rarely open marketing
_CLICK_THROUGH = np.array([0.45, 0.25, 0.10, 0.10])
_PERSUASION = np.array([0.85, 0.03, 0.02, 0.0])  # max P(extra order | clicked an offer)
_BASKET = np.array([1.0, 1.15, 0.9, 1.05])
_CHANNEL_BETA = {"email": (3.0, 5.0), "sms": (2.0, 6.0), "push": (2.0, 6.0)}
# Mobile users opt in to push far more often than desktop users (overall rate kept at the config's).
_PUSH_DESKTOP_FACTOR = 0.55


@dataclass
class Population:
    """Column arrays describing customers; row i is one customer."""

    customer_id: np.ndarray  # str
    hidden_type: np.ndarray  # int8 index into HIDDEN_TYPES
    signup: np.ndarray  # int64 seconds
    region: np.ndarray
    device: np.ndarray
    segment: np.ndarray
    fav_category: np.ndarray  # int index into CATEGORIES
    engagement: np.ndarray
    price_sensitivity: np.ndarray
    responsiveness: np.ndarray  # [n, len(CHANNELS)] P(open a message) per channel
    click_through: np.ndarray  # P(click | opened)
    base_conversion: np.ndarray  # P(order within the window) without any contact
    persuasion: np.ndarray
    annoyance: np.ndarray  # [n, len(CHANNELS)] relative drop of base conversion when contacted
    basket: np.ndarray  # mean order value
    consent: np.ndarray  # [n, len(CHANNELS)] bool
    consent_updated: np.ndarray  # [n, len(CHANNELS)] int64 seconds

    def __len__(self) -> int:
        """Return the number of customers."""
        return len(self.customer_id)

    @classmethod
    def concat(cls, parts: list[Population]) -> Population:
        """Stack populations (e.g. the initial one and later signups)."""
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})


def customer_ids(start: int, n: int) -> np.ndarray:
    """Return ids ``C0000001``-style for customers ``start .. start + n - 1``."""
    return np.array([f"C{i:07d}" for i in range(start + 1, start + n + 1)], dtype=object)


def generate_population(
    cfg: ShopConfig,
    n: int,
    id_start: int,
    signup_from: int,
    signup_to: int,
    rng: np.random.Generator,
    *,
    early_skew: bool,
    new_before: int,
) -> Population:
    """Draw ``n`` customers with signups between ``signup_from`` and ``signup_to`` (seconds).

    Args:
        cfg: The shop config (type shares, channels, basket size).
        n: Number of customers.
        id_start: Number of customers already drawn (ids continue from it).
        signup_from: Earliest signup time.
        signup_to: Latest signup time.
        rng: Random stream; the same stream state gives the same customers.
        early_skew: Whether signups cluster early (a launch cohort) rather than uniformly.
        new_before: Customers who signed up after this time get the observable segment ``new``.

    Returns:
        The customers.
    """
    shares = np.array([cfg.type_shares[t] for t in HIDDEN_TYPES])
    t = rng.choice(len(HIDDEN_TYPES), size=n, p=shares).astype(np.int8)
    frac = rng.beta(1.0, 2.5, n) if early_skew else rng.random(n)
    signup = (signup_from + frac * (signup_to - signup_from)).astype(np.int64)

    z = rng.standard_normal(n)
    engagement = _ENGAGEMENT[t] * np.exp(0.45 * z - 0.1)
    base_conversion = np.clip(
        _BASE_CONVERSION[t] * np.exp(0.3 * z + 0.2 * rng.standard_normal(n) - 0.065), 5e-4, 0.4
    )
    a, b = _PRICE_SENS_BETA[t, 0], _PRICE_SENS_BETA[t, 1]
    price_sensitivity = rng.beta(a, b)

    device = DEVICES[rng.choice(len(DEVICES), size=n, p=DEVICE_SHARES)]
    desktop = device == "desktop"
    ch_index = {c: i for i, c in enumerate(CHANNELS)}
    responsiveness = np.zeros((n, len(CHANNELS)))
    annoyance = np.zeros((n, len(CHANNELS)))
    consent = np.zeros((n, len(CHANNELS)), dtype=bool)
    dog = t == HIDDEN_TYPES.index("sleeping_dog")
    for spec in cfg.channels:
        j = ch_index[spec.channel]
        r = rng.beta(*_CHANNEL_BETA[spec.channel], n) * _RESPONSIVENESS[t]
        if spec.channel == "push":
            r = np.where(desktop, 0.3 * r, r)
            desktop_share = float(DEVICE_SHARES[DEVICES == "desktop"][0])
            mobile_rate = spec.consent_rate / (1 - desktop_share + desktop_share * _PUSH_DESKTOP_FACTOR)
            rate = np.where(desktop, _PUSH_DESKTOP_FACTOR * mobile_rate, mobile_rate)
        else:
            rate = np.full(n, spec.consent_rate)
        responsiveness[:, j] = np.clip(r, 0.005, 0.8)
        consent[:, j] = rng.random(n) < np.clip(rate, 0, 1)
        annoyance[:, j] = np.where(dog, spec.annoyance * rng.uniform(0.6, 1.4, n), spec.nuisance)
    annoyance = np.clip(annoyance, 0.0, 0.95)
    consent_updated = signup[:, None] + rng.integers(0, 2 * DAY, size=(n, len(CHANNELS)))

    click_through = np.clip(_CLICK_THROUGH[t] * rng.uniform(0.7, 1.3, n), 0.01, 0.7)
    persuasion = _PERSUASION[t] * rng.uniform(0.6, 1.0, n)
    sigma = 0.35
    basket = cfg.mean_basket * _BASKET[t] * np.exp(sigma * rng.standard_normal(n) - sigma**2 / 2)

    # The CRM's segment is a noisy summary of the customer, assigned without looking at outcomes.
    u = rng.random(n)
    vip_p = np.where(t == HIDDEN_TYPES.index("sure_thing"), 0.5, 0.05) * np.where(
        basket > cfg.mean_basket, 1.3, 0.7
    )
    lapsed_p = np.where(t == HIDDEN_TYPES.index("lost_cause"), 0.6, 0.08)
    segment = np.where(u < vip_p, "vip", np.where(u < vip_p + lapsed_p, "lapsed", "regular")).astype(object)
    segment[signup >= new_before] = "new"

    return Population(
        customer_id=customer_ids(id_start, n),
        hidden_type=t,
        signup=signup,
        region=REGIONS[rng.choice(len(REGIONS), size=n, p=REGION_SHARES)].astype(object),
        device=device.astype(object),
        segment=segment,
        fav_category=rng.integers(0, len(CATEGORIES), n),
        engagement=engagement,
        price_sensitivity=price_sensitivity,
        responsiveness=responsiveness,
        click_through=click_through,
        base_conversion=base_conversion,
        persuasion=persuasion,
        annoyance=annoyance,
        basket=basket,
        consent=consent,
        consent_updated=consent_updated.astype(np.int64),
    )
