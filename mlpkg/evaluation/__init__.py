"""Evaluation stage: uplift ranking metrics, off-policy policy value and measured incrementality.

Pure numpy/pandas/scipy functions; plotting imports matplotlib only when a plot is requested.
"""

from mlpkg.evaluation.incrementality import incremental_lift, incremental_mean, psi, psi_by_column
from mlpkg.evaluation.ope import (
    OPEResult,
    OPEWeightWarning,
    doubly_robust,
    evaluate_policy,
    ips,
    one_hot_policy,
    snips,
)
from mlpkg.evaluation.uplift_metrics import (
    auuc,
    calibration_table,
    expected_calibration_error,
    ipw_policy_value,
    multi_arm_qini,
    plot_calibration,
    plot_qini,
    plot_uplift_by_decile,
    qini_coefficient,
    qini_curve,
    uplift_at_k,
    uplift_by_decile,
    uplift_curve,
)

__all__ = [
    "OPEResult",
    "OPEWeightWarning",
    "auuc",
    "calibration_table",
    "doubly_robust",
    "evaluate_policy",
    "expected_calibration_error",
    "incremental_lift",
    "incremental_mean",
    "ips",
    "ipw_policy_value",
    "multi_arm_qini",
    "one_hot_policy",
    "plot_calibration",
    "plot_qini",
    "plot_uplift_by_decile",
    "psi",
    "psi_by_column",
    "qini_coefficient",
    "qini_curve",
    "snips",
    "uplift_at_k",
    "uplift_by_decile",
    "uplift_curve",
]
