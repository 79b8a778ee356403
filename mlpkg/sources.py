"""The landing zone: where a shop drops complete batches and channel feedback exports.

Layout (a local folder or any fsspec URL, e.g. ``s3://shop-exports/couponops``)::

    <zone>/batches/<batch_id>/customers.csv, consent.csv, ..., _SUCCESS
    <zone>/feedback/<export_id>/feedback.csv, _SUCCESS

A drop is *complete* once its ``_SUCCESS`` marker exists; the shop writes it last, so a drop
still being copied is never read. The marker may hold JSON ``{"exported_at": "<ISO-8601>"}``:
the time the export was cut (its data's "as of"); without it the marker's modification time
stands in. Drops are processed oldest first by that time, then by id, and each exactly once:
the warehouse table ``landed_batches`` records every drop that was loaded or quarantined, and
a drop already recorded is never read again.

Nothing here invents data: with no new complete drop, callers get an empty list and say so.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from sqlalchemy.orm import Session

from mlpkg.db import queries as q

MARKER = "_SUCCESS"
Kind = Literal["batches", "feedback"]
KINDS: tuple[Kind, ...] = ("batches", "feedback")


@dataclass(frozen=True)
class Drop:
    """One complete drop in the landing zone.

    Attributes:
        kind: ``batches`` (shop exports) or ``feedback`` (channel/shop response exports).
        drop_id: The drop's folder name.
        url: The drop's folder (path or fsspec URL).
        exported_at: When the export was cut (UTC).
    """

    kind: Kind
    drop_id: str
    url: str
    exported_at: datetime

    def as_dict(self) -> dict:
        """Return a JSON-friendly dict (for XCom and logs)."""
        return {
            "kind": self.kind,
            "drop_id": self.drop_id,
            "url": self.url,
            "exported_at": self.exported_at.isoformat(),
        }


def _fs(zone: str):  # noqa: ANN202 - an fsspec filesystem and the zone's path on it
    import fsspec

    fs, _, paths = fsspec.get_fs_token_paths(zone)
    return fs, paths[0].rstrip("/")


def is_local(zone: str) -> bool:
    """Return True when the zone is a plain local folder (no copy needed to read it)."""
    return "://" not in zone or zone.startswith("file://")


def _parse_time(text: str, where: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"{where}: exported_at {text!r} is not an ISO-8601 timestamp") from exc
    if value.tzinfo is None:
        raise ValueError(f"{where}: exported_at {text!r} has no time zone (write it in UTC, e.g. ...Z)")
    return value.astimezone(UTC)


def _exported_at(fs, marker: str) -> datetime:  # noqa: ANN001 - an fsspec filesystem
    raw = fs.cat_file(marker).decode("utf-8", errors="replace").strip()
    if raw:
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{marker}: the completion marker holds text that is not JSON: {raw[:80]!r}"
            ) from exc
        if not isinstance(data, dict) or "exported_at" not in data:
            raise ValueError(f"{marker}: the completion marker's JSON needs an 'exported_at' field")
        return _parse_time(str(data["exported_at"]), marker)
    modified = fs.modified(marker)
    return (modified if modified.tzinfo else modified.replace(tzinfo=UTC)).astimezone(UTC)


def complete_drops(zone: str, kind: Kind) -> list[Drop]:
    """List the complete drops of one kind in the zone, oldest first.

    Args:
        zone: The landing zone (folder or fsspec URL).
        kind: ``batches`` or ``feedback``.

    Returns:
        Every drop whose ``_SUCCESS`` marker exists (an absent kind folder gives an empty list).

    Raises:
        ValueError: A marker's content cannot be read as an export time.
    """
    fs, root = _fs(zone)
    base = f"{root}/{kind}"
    if not fs.isdir(base):
        return []
    drops = []
    for entry in fs.ls(base, detail=True):
        if entry.get("type") != "directory":
            continue
        path = entry["name"].rstrip("/")
        name = path.rsplit("/", 1)[-1]
        if name.startswith((".", "_")):
            continue  # temporary folders of an export in progress
        marker = f"{path}/{MARKER}"
        if not fs.exists(marker):
            continue
        url = path if is_local(zone) else f"{zone.split('://', 1)[0]}://{path}"
        drops.append(Drop(kind=kind, drop_id=name, url=url, exported_at=_exported_at(fs, marker)))
    return sorted(drops, key=lambda d: (d.exported_at, d.drop_id))


def pending_drops(session: Session, zone: str, kind: Kind) -> list[Drop]:
    """Return the complete drops not yet loaded or quarantined, oldest first."""
    seen = q.handled_drop_ids(session, kind)
    return [d for d in complete_drops(zone, kind) if d.drop_id not in seen]


def stage_drop(drop: Drop, staging_dir: Path) -> Path:
    """Return a local folder holding the drop's files (the drop itself when the zone is local).

    Remote drops are copied to ``staging_dir/<kind>/<drop_id>`` first, so validation and
    quarantine work on local files. Sub-folders and symbolic links are not copied.
    """
    if is_local(drop.url):
        return Path(drop.url.removeprefix("file://"))
    fs, path = _fs(drop.url)
    target = staging_dir / drop.kind / drop.drop_id
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for entry in fs.ls(path, detail=True):
        if entry.get("type") == "file":
            fs.get_file(entry["name"], str(target / entry["name"].rsplit("/", 1)[-1]))
    return target


def record_drop(session: Session, drop: Drop, *, status: str, detail: dict, now: datetime) -> None:
    """Record that a drop was handled (``loaded`` or ``quarantined``), so it is never read again."""
    q.record_landed_drop(
        session,
        kind=drop.kind,
        drop_id=drop.drop_id,
        url=drop.url,
        exported_at=drop.exported_at,
        status=status,
        detail=detail,
        now=now,
    )


def data_clock(session: Session) -> datetime | None:
    """Return the export time of the newest loaded drop (the data's "now"), or None before any."""
    return q.newest_export(session)
