"""Links into the MLflow UI that open where an ML engineer expects: the model-training views.

MLflow 3's UI shows GenAI views (traces, an overview of token usage) unless the link asks for the
model-training workflow (``workflowType=machine_learning``) or the browser remembers that choice;
an experiment's kind tag alone does not switch it. Every link CouponOps writes (the Campaigns
view, task links, reports) is built here, so each opens on runs, models and versions.

Example:
    >>> run_url("http://127.0.0.1:5000/", "abc")
    'http://127.0.0.1:5000/#/runs/abc?workflowType=machine_learning'
"""

from __future__ import annotations

from urllib.parse import quote

WORKFLOW = "workflowType=machine_learning"


def ui_url(base: str | None, route: str) -> str | None:
    """Return ``base`` + ``#/route`` in the model-training workflow (``None`` without a base URL)."""
    if not base:
        return None
    return f"{base.rstrip('/')}/#/{route.lstrip('/')}?{WORKFLOW}"


def run_url(base: str | None, run_id: str | None) -> str | None:
    """Return the MLflow UI page of a run."""
    return ui_url(base, f"runs/{quote(str(run_id), safe='')}") if run_id else None


def model_version_url(base: str | None, model_name: str | None, version: str | int | None) -> str | None:
    """Return the MLflow UI page of a registered model version."""
    if not model_name or version is None or version == "":
        return None
    return ui_url(base, f"models/{quote(str(model_name), safe='')}/versions/{quote(str(version), safe='')}")


def model_url(base: str | None, model_name: str | None) -> str | None:
    """Return the MLflow UI page of a registered model (its versions and aliases)."""
    return ui_url(base, f"models/{quote(str(model_name), safe='')}") if model_name else None


def experiment_url(base: str | None, experiment_id: str | None) -> str | None:
    """Return the MLflow UI page of an experiment (it opens on its runs)."""
    return ui_url(base, f"experiments/{quote(str(experiment_id), safe='')}") if experiment_id else None
