"""The data-contract gate: validate a frame or a whole batch folder, quarantine what fails.

:func:`validate_table` runs a table's Great Expectations suite plus the explicit checks and
returns a :class:`~mlpkg.validation.contract.ValidationReport`. :func:`gate_batch` reads and
validates every file of a batch folder with one GX context, builds Data Docs, and on any failure
moves the whole folder to quarantine (with ``validation_result.json``) and raises
:class:`~mlpkg.validation.contract.DataContractError`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import json
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
import pandas as pd
from great_expectations.core.run_identifier import RunIdentifier
from great_expectations.data_context.types.base import (
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)
from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier

from mlpkg import progress
from mlpkg.validation import summary_page
from mlpkg.validation.checks import (
    DEFAULT_DRIFT_COLUMNS,
    check_arm_consistency,
    check_column_types,
    check_drift,
    check_extra_columns,
    check_finite,
    check_referential,
    check_volume,
    rows_at,
)
from mlpkg.validation.contract import (
    DataContractError,
    Failure,
    ValidationContext,
    ValidationReport,
    plain_value,
    without_personal_data,
)
from mlpkg.validation.readers import RAW_SCHEMAS, read_raw_table, resolve_batch_folder, scan_batch
from mlpkg.validation.references import OPTIONAL_COLUMNS, check_batch_references
from mlpkg.validation.streaming import (
    FailureMerger,
    KeyTracker,
    StreamedFile,
    coerce_chunk,
    iter_raw_chunks,
    parquet_rows,
    shift_rows,
    streams,
)
from mlpkg.validation.suites import SUITE_TABLES, build_suite

#: Receives a streamed file's chunks as they pass: ``sink(first_row, typed_chunk)``.
ChunkSink = Callable[[int, pd.DataFrame], None]

DATA_DOCS_SITE = "couponops"
#: Validation runs the Data Docs index lists (newest first).
DATA_DOCS_RESULTS_LIMIT = 500
QUARANTINE_RESULT_FILE = "validation_result.json"
#: Tables read first in a batch: the others are checked against their ids.
_REFERENCE_TABLES = ("customers", "coupons", "products", "channels")
#: Tables whose ``customer_id`` / ``coupon_id`` must exist in the known ids.
_CUSTOMER_REF_TABLES = ("contacts", "consent", "events", "orders", "campaign_log", "feedback",
                        "allocations", "deliveries", "model_scores", "feature_snapshot")
_COUPON_REF_TABLES = ("orders", "campaign_log", "feedback", "allocations", "deliveries")
_PRODUCT_REF_TABLES = ("events", "orders")


def _no_frame_fingerprints() -> None:
    """Stop GX hashing every validated frame (about half its time on a large chunk).

    GX's pandas engine fingerprints frames under ``HASH_THRESHOLD`` bytes for its batch markers,
    which CouponOps never reads (batches are named by the run). The threshold is GX's own knob.
    """
    from great_expectations.execution_engine import pandas_execution_engine

    if hasattr(pandas_execution_engine, "HASH_THRESHOLD"):
        pandas_execution_engine.HASH_THRESHOLD = 0


class ExpectationRunner:
    """One Great Expectations context that validates pandas frames against suites.

    Create one per batch (or per :class:`ValidationContext`): context creation and the data
    source are reused for every table. Progress bars and analytics are off. Everything is in
    memory except, with a Data Docs folder, the validation results: they are kept as JSON under
    ``<data_docs_dir>/_validation_results`` so the site lists earlier batches too (an in-memory
    store would make GX delete every page but the latest run's).

    Args:
        data_docs_dir: Folder for a Data Docs site (``None``: no docs).
        run_name: Run name shown in Data Docs (the batch name).
    """

    def __init__(self, data_docs_dir: Path | None = None, run_name: str | None = None) -> None:
        """Create the ephemeral GX context and its pandas data source."""
        defaults = InMemoryStoreBackendDefaults(init_temp_docs_sites=False)
        stores = dict(defaults.stores)
        sites: dict[str, Any] = {}
        if data_docs_dir is not None:
            root = Path(data_docs_dir).resolve()
            sites[DATA_DOCS_SITE] = {
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(root)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder",
                                       "validation_results_limit": DATA_DOCS_RESULTS_LIMIT},
            }
            stores[defaults.validation_results_store_name] = {
                "class_name": "ValidationResultsStore",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                                  "base_directory": str(root / "_validation_results")},
            }
        config = DataContextConfig(
            store_backend_defaults=defaults,
            stores=stores,
            data_docs_sites=sites,
            # GX otherwise draws tqdm bars on stderr for every suite; TQDM_DISABLE does not
            # help because GX passes disable= explicitly.
            progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
            analytics_enabled=False,
        )
        self.data_docs_dir = Path(data_docs_dir) if data_docs_dir is not None else None
        _no_frame_fingerprints()
        self.context = gx.get_context(mode="ephemeral", project_config=config)
        self._source = self.context.data_sources.add_pandas("couponops")
        self.run_name = run_name
        self._batches: dict[str, Any] = {}
        self._suites: set[str] = set()
        # Pages of earlier runs exist already; only this runner's results need rendering.
        self._known_results = set(self.context.validation_results_store.list_keys()) if sites else set()

    def run(self, df: pd.DataFrame, suite: gx.ExpectationSuite, *, asset: str, max_rows: int) -> Any:
        """Validate ``df`` against ``suite`` and return the GX suite validation result.

        Args:
            df: Frame to validate.
            suite: Suite (added to the context or updated if one of that name exists).
            asset: Data asset name shown in Data Docs (the table name).
            max_rows: Failing index values GX keeps per expectation.
        """
        if asset not in self._batches:
            data_asset = self._source.add_dataframe_asset(asset)
            self._batches[asset] = data_asset.add_batch_definition_whole_dataframe("whole_frame")
        # add() is much cheaper than add_or_update(), which diffs every expectation.
        batch = self._batches[asset]
        if suite.name in self._suites:
            suite = self.context.suites.add_or_update(suite)
            definition = self.context.validation_definitions.add_or_update(
                gx.ValidationDefinition(name=f"{suite.name}.validation", data=batch, suite=suite))
        else:
            suite = self.context.suites.add(suite)
            definition = self.context.validation_definitions.add(
                gx.ValidationDefinition(name=f"{suite.name}.validation", data=batch, suite=suite))
            self._suites.add(suite.name)
        with warnings.catch_warnings():
            # GX reads tz-aware columns through Series.values, which pandas 3.1 deprecates; under
            # an "error" warning filter GX would report the expectation as not evaluable.
            warnings.simplefilter("ignore", pd.errors.Pandas4Warning)
            return definition.run(
                batch_parameters={"dataframe": df},
                run_id=RunIdentifier(run_name=self.run_name, run_time=dt.datetime.now(dt.UTC)),
                result_format={"result_format": "SUMMARY", "partial_unexpected_count": max_rows},
            )

    def build_data_docs(self) -> Path | None:
        """Build the Data Docs site and return its ``index.html`` (``None`` without a site)."""
        if self.data_docs_dir is None:
            return None
        new = [k for k in self.context.validation_results_store.list_keys() if k not in self._known_results]
        suites = [ExpectationSuiteIdentifier(name=n) for n in sorted(self._suites)]
        self.context.build_data_docs(site_names=[DATA_DOCS_SITE], resource_identifiers=[*suites, *new])
        self._known_results.update(new)
        return self.data_docs_dir.resolve() / "index.html"


def _exception_text(exception_info: Any) -> str | None:
    if not exception_info:
        return None
    infos = [exception_info] if "raised_exception" in exception_info else list(exception_info.values())
    for info in infos:
        if isinstance(info, Mapping) and info.get("raised_exception"):
            return str(info.get("exception_message"))
    return None


def _failures_from_gx(result: Any, df: pd.DataFrame, *, line_offset: int | None,
                      max_rows: int) -> list[Failure]:
    """Turn failed GX expectation results into Failures with the offending rows."""
    out = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        kw = cfg.kwargs
        if kw.get("column"):
            column = kw["column"]
        elif kw.get("column_list"):
            column = "+".join(kw["column_list"])
        elif kw.get("column_A"):
            column = f"{kw['column_A']}+{kw['column_B']}"
        else:
            column = None
        rule = cfg.description or cfg.type
        res = r.result or {}
        count = int(res.get("unexpected_count") or 0)
        positions: list[int] = []
        error = _exception_text(r.exception_info)
        if error:
            rule += f" (could not be evaluated: {error})"
            count = max(count, 1)
        elif cfg.type == "expect_table_columns_to_match_set":
            missing = res.get("details", {}).get("mismatched", {}).get("missing", [])
            rule += f"; missing {missing}"
            count = len(missing) or 1
            column = ", ".join(missing) or None
        elif cfg.type == "expect_table_row_count_to_be_between":
            rule += f"; has {res.get('observed_value')}"
            count = max(count, 1)
        else:
            # validate_table hands GX a frame with a RangeIndex, so index labels are positions.
            positions = [int(i) for i in (res.get("partial_unexpected_index_list") or [])][:max_rows]
            values: list = []
            for v in res.get("partial_unexpected_list") or []:
                v = plain_value(v)
                if v not in values:
                    values.append(v)
            if values:
                rule += f"; unexpected e.g. {values[:max_rows]}"
        out.append(Failure(cfg.type, column, rule, count,
                           rows_at(df, positions, line_offset=line_offset) if positions else []))
    return out


def _for_gx(df: pd.DataFrame) -> pd.DataFrame:
    """Return ``df`` with a RangeIndex and UTC timestamps (naive ones are taken as UTC)."""
    out = df
    if not isinstance(df.index, pd.RangeIndex) or df.index.start != 0 or df.index.step != 1:
        out = out.reset_index(drop=True)
    naive = [c for c in out.columns if pd.api.types.is_datetime64_dtype(out[c].dtype)
             and not isinstance(out[c].dtype, pd.DatetimeTZDtype)]
    if naive:
        out = out.assign(**{c: out[c].dt.tz_localize("UTC") for c in naive})
    return out


def _runner_for(context: ValidationContext) -> ExpectationRunner:
    if context._runner is None:
        context._runner = ExpectationRunner()
    return context._runner


def validate_table(
    df: pd.DataFrame,
    table: str,
    *,
    context: ValidationContext,
    source: str | Path | None = None,
    line_offset: int | None = None,
    runner: ExpectationRunner | None = None,
    chunk: bool = False,
) -> ValidationReport:
    """Validate one frame against its table's suite and the explicit contract checks.

    Args:
        df: The frame (raw tables: as returned by :func:`~mlpkg.validation.readers.read_table`).
        table: One of :data:`~mlpkg.validation.suites.SUITE_TABLES`.
        context: Run parameters and cross-table knowledge (known ids, previous counts, reference).
        source: File path or table name for messages (default: the table name).
        line_offset: File line of data row 0 (2 for CSV) so messages name file lines.
        runner: GX runner to reuse; default: one cached on ``context``.
        chunk: ``df`` is one chunk of a streamed file (its key is checked across the file).

    Returns:
        The report; ``report.success`` is False when any rule failed.
    """
    if table not in SUITE_TABLES:
        raise ValueError(f"no suite for table {table!r}; known: {SUITE_TABLES}")
    runner = runner or _runner_for(context)
    frame = _for_gx(df)
    numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c].dtype)]
    suite = build_suite(table, context=context, columns=[str(c) for c in frame.columns],
                        numeric_columns=numeric)
    if chunk:
        # One chunk of a streamed file: its key's uniqueness is checked across the whole file.
        suite.expectations = [e for e in suite.expectations if e.expectation_type not in _UNIQUE_RULES]
    result = runner.run(frame, suite, asset=table, max_rows=context.max_sample_rows)
    report = ValidationReport(table=table, source=str(source) if source is not None else table,
                              row_count=len(frame), gx_result=result)
    kw = {"line_offset": line_offset, "max_rows": context.max_sample_rows}
    report.failures += _failures_from_gx(result, frame, **kw)
    report.failures += check_column_types(frame, table)
    report.failures += check_finite(frame, **kw)
    extra_fail, extra_warn = check_extra_columns(frame, table, strict=context.strict)
    optional = set(OPTIONAL_COLUMNS.get(table, ()))
    extra_fail = [f for f in extra_fail if f.column not in optional]
    extra_warn = [f for f in extra_warn if f.column not in optional]
    report.failures += extra_fail
    report.warnings += extra_warn
    if context.known_customers is not None and table in _CUSTOMER_REF_TABLES:
        report.failures += check_referential(frame, "customer_id", context.known_customers,
                                             what="customers", **kw)
    if context.known_coupons is not None and table in _COUPON_REF_TABLES:
        report.failures += check_referential(frame, "coupon_id", context.known_coupons, what="coupons", **kw)
    if context.known_products is not None and table in _PRODUCT_REF_TABLES:
        report.failures += check_referential(frame, "product_id", context.known_products, what="products",
                                             **kw)
    if table in ("campaign_log", "allocations"):
        report.failures += check_arm_consistency(frame, **kw)
    if context.previous_row_counts:
        report.failures += check_volume(
            table, len(frame), context.previous_row_counts.get(table),
            min_ratio=context.volume_min_ratio, max_ratio=context.volume_max_ratio,
        )
    if context.reference is not None and table in context.reference:
        columns = (context.drift_columns or {}).get(table)
        if columns is None:
            columns = DEFAULT_DRIFT_COLUMNS.get(table) or [c for c in numeric if c != "customer_id"]
        report.warnings += check_drift(frame, context.reference[table], columns,
                                       threshold=context.psi_threshold)
    report.failures = [without_personal_data(f, table) for f in report.failures]
    report.warnings = [without_personal_data(w, table) for w in report.warnings]
    return report



def validate_streamed(
    path: Path, table: str, *, context: ValidationContext, runner: ExpectationRunner | None = None,
    sink: ChunkSink | None = None,
) -> ValidationReport:
    """Validate a large Parquet file chunk by chunk with the rules of :func:`validate_table`.

    Every chunk passes the reader rules and the table's suite; findings of one rule in several
    chunks become one failure with the total count; a key that repeats across chunks is found by
    :class:`~mlpkg.validation.streaming.KeyTracker`. Memory stays bounded by the chunk size.

    ``sink(first_row, typed_chunk)`` receives each chunk as soon as it passed, in file order, while
    no chunk before it failed, so a loader can write it in the same pass (inside a transaction it
    rolls back unless the whole report passes: a rule over the whole file, such as a key repeated
    in a later chunk, is only known at the end).

    Returns:
        The file's report (``row_count`` = the file's rows; ``gx_result`` = the first failing
        chunk's result, else the last chunk's).
    """
    runner = runner or _runner_for(context)
    key = RAW_SCHEMAS[table].key
    merged, warned = FailureMerger(context.max_sample_rows), FailureMerger(context.max_sample_rows)
    tracker = KeyTracker(key)
    report = ValidationReport(table=table, source=str(path))
    first_failure = False
    total = parquet_rows(path)
    task = f"validating {'and loading ' if sink is not None else ''}{Path(path).name}"
    try:
        for start, raw in iter_raw_chunks(path, table, chunk_rows=context.chunk_rows, strict=context.strict):
            report.row_count += len(raw)
            progress.report(task, report.row_count, total)
            tracker.add(raw)  # every chunk, in file order: positions are file rows
            try:
                frame, read_warnings = coerce_chunk(path, table, raw)
            except DataContractError as err:
                merged.add(err.failures)  # rows are file rows already (the chunk keeps its index)
                continue
            if context.pseudonymise is not None:
                frame = context.pseudonymise(table, frame)
            warned.add(read_warnings)
            part = validate_table(frame, table, context=context, source=path, runner=runner, chunk=True)
            merged.add([shift_rows(f, start) for f in part.failures])
            if sink is not None and not merged.failures:
                sink(start, frame)
            warned.add([shift_rows(w, start) for w in part.warnings])
            if not first_failure:
                report.gx_result = part.gx_result
                first_failure = bool(part.failures)
    except DataContractError as err:  # the file as a whole (unreadable, its columns)
        report.failures = err.failures
        return report
    found = tracker.duplicates(lambda rows: _key_rows(path, key, rows), max_rows=context.max_sample_rows,
                               what=Path(path).name)
    report.failures = merged.failures + ([found] if found else [])
    report.warnings = warned.failures
    return report

_UNIQUE_RULES = frozenset({"expect_column_values_to_be_unique", "expect_compound_columns_to_be_unique"})


def _key_rows(path: Path, key: Sequence[str], rows: Any) -> pd.DataFrame:
    """Return the key columns of some rows of a Parquet file (to confirm repeated keys)."""
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=list(key)).take(rows).to_pandas()


@dataclass
class BatchValidation:
    """Outcome of a batch that passed the gate.

    Attributes:
        batch_dir: The batch folder.
        reports: One report per table, keyed by table name.
        frames: The typed frames that were validated, so ingest need not read files twice.
        data_docs_index: Data Docs ``index.html``.
        warnings: Batch-level warnings (unrecognised files).
        streamed: Large files validated chunk by chunk (not in ``frames``); the loader reads
            them again in chunks. Their rules against stored rows run where they load.
        summary_page: The batch's offline validation summary (:mod:`mlpkg.validation.summary_page`).
    """

    batch_dir: Path
    reports: dict[str, ValidationReport]
    frames: dict[str, pd.DataFrame] = field(repr=False)
    data_docs_index: Path | None
    warnings: list[str] = field(default_factory=list)
    streamed: dict[str, StreamedFile] = field(default_factory=dict)
    summary_page: Path | None = None

    @property
    def success(self) -> bool:
        """Return whether every table passed."""
        return all(r.success for r in self.reports.values())


def _quarantine(batch_dir: Path, quarantine_dir: Path, payload: dict[str, Any]) -> Path:
    """Move a (resolved) batch folder to quarantine and write its ``validation_result.json``.

    The result file is written whatever happens to the move: when the folder cannot be moved, the
    quarantine folder holds the result alone, with the reason in ``quarantine_error``. Symbolic
    links inside the batch move as links; their targets are never copied.
    """
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    base = batch_dir.name or "batch"
    dest = quarantine_dir / f"{base}-{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = quarantine_dir / f"{base}-{stamp}-{n}"
    try:
        # Across file systems shutil.move copies a folder with symlinks=True: links stay links.
        shutil.move(str(batch_dir), str(dest))
    except OSError as err:
        dest.mkdir(parents=True, exist_ok=True)
        payload = {**payload, "quarantine_error": f"the batch folder could not be moved: {err}"}
    (dest / QUARANTINE_RESULT_FILE).write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    return dest


def gate_batch(
    batch_dir: Path,
    tables: dict[str, pd.DataFrame] | None = None,
    *,
    context: ValidationContext,
    quarantine_dir: Path,
    data_docs_dir: Path,
    protected: Sequence[Path] = (),
    stream_sink: Callable[[str, int, pd.DataFrame], None] | None = None,
) -> BatchValidation:
    """Validate every raw file of a batch folder; quarantine the folder if anything fails.

    Reference tables (customers, coupons) are read first; their ids extend
    ``context.known_customers`` / ``known_coupons`` for the referential checks of the others.

    Args:
        batch_dir: Batch folder holding ``<table>.csv`` / ``<table>.parquet`` files.
        tables: Frames already in memory, by table name; used instead of reading the file.
        context: Run parameters.
        quarantine_dir: Where a rejected batch goes (``<batch>-<UTC timestamp>/``).
        data_docs_dir: Root of the GX Data Docs site (built on success and failure).
        protected: Folders the batch folder may neither be nor contain (e.g. the state folder);
            the working directory, ``/``, the home folder and the two folders above always are.
        stream_sink: ``stream_sink(table, first_row, typed_chunk)`` gets the chunks of every
            streamed file as they pass (see :func:`validate_streamed`): the loader writes them
            while the gate reads on. Its writes must roll back unless the gate returns.

    Returns:
        The reports, the typed frames and the Data Docs index.

    Raises:
        DataContractError: Any table failed; the folder has been moved (``err.quarantine_path``)
            and ``validation_result.json`` written there; the message names every failing file,
            expectation, column and up to five rows. A batch holding a symbolic link, two files of
            one table or an unsupported data file is quarantined without reading any file. A batch
            folder that is a link, the working directory, ``/``, home or a protected folder (or
            contains one) is refused before anything is read or moved (no quarantine).
        FileNotFoundError: ``batch_dir`` does not exist.
    """
    batch_dir = resolve_batch_folder(batch_dir, protected=(quarantine_dir, data_docs_dir, *protected))
    tables = dict(tables or {})
    runner = ExpectationRunner(data_docs_dir, run_name=batch_dir.name)
    reports: dict[str, ValidationReport] = {}
    frames: dict[str, pd.DataFrame] = {}
    warnings: list[str] = []
    scan = scan_batch(batch_dir)
    files = scan.tables
    warnings += scan.warnings
    if scan.failures:
        # Refused before reading: no file of a batch with a link or an ambiguous table is opened.
        files = {}
        reports["batch"] = ValidationReport("batch", str(batch_dir), failures=scan.failures)
    names = [t for t in RAW_SCHEMAS if t in files or t in tables]
    names += [t for t in tables if t not in names]
    order = [t for t in _REFERENCE_TABLES if t in names] + [t for t in names if t not in _REFERENCE_TABLES]
    if not names and "batch" not in reports:
        reports["batch"] = ValidationReport("batch", str(batch_dir), failures=[Failure(
            "batch_not_empty", None, f"no raw table files found (expected any of {list(RAW_SCHEMAS)})", 0)])
    ctx = context
    offsets: dict[str, int | None] = {}
    streamed: dict[str, StreamedFile] = {}
    for done, table in enumerate(order):
        progress.report(f"validating batch {batch_dir.name}", done, len(order))
        path = files.get(table)
        source = str(path) if path is not None else f"{table} (in memory)"
        read_warnings: list[Failure] = []
        if table not in tables and streams(path, table, ctx.chunk_rows):
            sink = functools.partial(stream_sink, table) if stream_sink is not None else None
            reports[table] = validate_streamed(path, table, context=ctx, runner=runner, sink=sink)
            streamed[table] = StreamedFile(path, table, reports[table].row_count, ctx.chunk_rows,
                                           ctx.pseudonymise)
            continue
        if table in tables:
            frame, line_offset = tables[table], None
        else:
            try:
                read = read_raw_table(path, table)
            except DataContractError as err:
                reports[table] = ValidationReport(table, source, failures=err.failures)
                continue
            # line_offset is 2 for a CSV, or a LineMap when quoted fields span lines.
            frame, line_offset, read_warnings = read.frame, read.line_offset, read.warnings
            if ctx.pseudonymise is not None:
                # Rules, their failure samples and the load see pseudonyms, never the shop's ids.
                frame = ctx.pseudonymise(table, frame)
        frames[table] = frame
        offsets[table] = line_offset
        reports[table] = validate_table(frame, table, context=ctx, source=source, line_offset=line_offset,
                                        runner=runner)
        reports[table].warnings += read_warnings
        if table in ("customers", "coupons", "products"):
            id_col = f"{table[:-1]}_id"
            known_attr = f"known_{table}"
            ids = set(frame[id_col].dropna().astype("str"))
            previous = getattr(ctx, known_attr)
            ctx = dataclasses.replace(ctx, **{known_attr: ids | set(previous or ())})
    # Rules across the batch's tables and the stored batches run once every frame is read.
    names_of = {t: files[t].name for t in frames if t in files}
    for table, found in check_batch_references(frames, ctx, offsets, names_of).items():
        reports[table].failures += found
    docs = runner.build_data_docs()
    failed = [r for r in reports.values() if not r.success]
    if not failed:
        summary = summary_page.write(data_docs_dir, batch_dir.name, reports, warnings=warnings, docs=docs)
        return BatchValidation(batch_dir, reports, frames, docs, warnings, streamed, summary)
    raise refuse_batch(batch_dir, reports, quarantine_dir, docs=docs, warnings=warnings)


def refuse_batch(batch_dir: Path, reports: Mapping[str, ValidationReport], quarantine_dir: Path, *,
                 docs: Path | None = None, warnings: Sequence[str] = ()) -> DataContractError:
    """Quarantine a batch whose reports hold failures and return the error that names them.

    The gate calls it for rules it checks before loading; the loader for the rules of streamed
    files that run inside the load's transaction (after rolling it back).
    """
    failed = [r for r in reports.values() if not r.success]
    payload = {
        "batch": batch_dir.name,
        "original_path": str(batch_dir.resolve()),
        "success": False,
        "validated_at": dt.datetime.now(dt.UTC).isoformat(),
        "data_docs_index": str(docs) if docs else None,
        "warnings": list(warnings),
        "reports": {name: r.to_dict() for name, r in reports.items()},
    }
    dest = _quarantine(batch_dir, Path(quarantine_dir), payload)
    # The summary opens offline (GX's Data Docs need their CDN); a copy stays with the batch.
    summary_page.write(Path(docs).parent if docs else None, batch_dir.name, reports, warnings=warnings,
                       quarantine=dest, docs=docs)
    head = (f"Batch '{batch_dir.name}' rejected by the data contract: {len(failed)} of {len(reports)} "
            f"table(s) failed. Moved to {dest} (see {QUARANTINE_RESULT_FILE} and "
            f"{summary_page.QUARANTINE_SUMMARY_FILE}); Data Docs: {docs}")
    message = "\n".join([head, *[r.message() for r in failed]])
    return DataContractError(message, failures=[f for r in failed for f in r.failures],
                             reports=list(reports.values()), quarantine_path=dest)
