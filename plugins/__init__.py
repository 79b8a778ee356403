"""Airflow adapters for CouponOps (importable as ``plugins`` and from Airflow's plugins folder)."""
