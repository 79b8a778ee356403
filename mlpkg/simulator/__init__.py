"""The simulated shop: a seeded world with known ground-truth uplift, for demos and evaluation.

It never imports the product (models, allocation, registry); the product never reads its hidden
truth except in ``mlpkg.evaluation``.

Example:
    >>> from mlpkg.simulator import Shop, ShopConfig
    >>> shop = Shop(ShopConfig(seed=7, n_customers=500))
    >>> shop.arm_names[:2]
    ['control', 'PCT10@email']
"""

from mlpkg.simulator.spec import CHANNELS, CONTROL, HIDDEN_TYPES, Arm, ChannelSpec, CouponSpec, ShopConfig
from mlpkg.simulator.world import Shop

__all__ = ["CHANNELS", "CONTROL", "HIDDEN_TYPES", "Arm", "ChannelSpec", "CouponSpec", "Shop", "ShopConfig"]
