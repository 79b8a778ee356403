"""CouponOps: uplift-driven, budget-constrained coupon allocation with a measured feedback loop.

The package is the product; each stage of the loop is a module:
``data`` (ingest) → ``validation`` → ``features`` → ``train``/``models`` → ``registry`` →
``allocation`` → ``delivery`` → ``feedback``/``evaluation``. ``simulator`` is the world used
for demos and evaluation; ``cli`` and the Airflow DAGs are thin callers of the same functions.
"""

__version__ = "0.1.0"
