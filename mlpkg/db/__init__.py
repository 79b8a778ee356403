"""Warehouse layer: typed SQLAlchemy models, the engine factory, migrations and queries."""
