"""Data contract: typed readers, GX expectation suites as code, and the batch gate.

``read_table`` turns a raw file into a typed frame (or raises ``DataContractError``),
``validate_table`` checks a frame against its suite and the explicit rules, and ``gate_batch``
validates a whole batch folder, builds Data Docs and quarantines rejected batches.
"""

from mlpkg.validation.checks import population_stability_index, validate_campaign_log
from mlpkg.validation.contract import DataContractError, Failure, ValidationContext, ValidationReport
from mlpkg.validation.gate import BatchValidation, ExpectationRunner, gate_batch, validate_table
from mlpkg.validation.readers import RAW_SCHEMAS, read_table
from mlpkg.validation.suites import SUITE_TABLES, build_suite

__all__ = [
    "RAW_SCHEMAS",
    "SUITE_TABLES",
    "BatchValidation",
    "DataContractError",
    "ExpectationRunner",
    "Failure",
    "ValidationContext",
    "ValidationReport",
    "build_suite",
    "gate_batch",
    "population_stability_index",
    "read_table",
    "validate_campaign_log",
    "validate_table",
]
