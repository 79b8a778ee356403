"""Render a message's subject, text and HTML bodies from Jinja2 templates, at send time.

The templates ship in the package (``mlpkg/delivery/templates/<channel>/``: ``subject.txt.j2``,
``body.txt.j2`` and, for email, ``body.html.j2``); a folder named by the setting
``RECOMMENDER__TEMPLATE_DIR`` with the same layout overrides any of them. A template sees the
outbox row's payload: ``campaign_id``, ``coupon_id``, ``offer`` (the coupon in words), ``channel``,
``products`` (each with ``product_id``, ``category``, ``price``; empty when the message shows none)
and ``currency``. The payload holds no address and no name, so a rendered message carries no
contact detail either; the sender adds the recipient.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

#: The templates each channel renders (an empty HTML body for channels without HTML).
TEMPLATE_NAMES = ("subject.txt.j2", "body.txt.j2", "body.html.j2")


@dataclass(frozen=True)
class RenderedMessage:
    """The texts of one message."""

    subject: str
    text: str
    html: str = ""


class MessageRenderer:
    """Render payloads with the packaged templates, overridden by ``template_dir`` when given."""

    def __init__(self, template_dir: Path | None = None, currency: str = "EUR") -> None:
        """Build the Jinja2 environment (HTML templates are autoescaped; undefined names fail)."""
        loaders: list[jinja2.BaseLoader] = []
        if template_dir is not None:
            if not Path(template_dir).is_dir():
                raise FileNotFoundError(f"template folder {template_dir} does not exist")
            loaders.append(jinja2.FileSystemLoader(str(template_dir)))
        loaders.append(jinja2.PackageLoader("mlpkg.delivery", "templates"))
        self.env = jinja2.Environment(
            loader=jinja2.ChoiceLoader(loaders),
            autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default=False),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.currency = currency

    def _render(self, channel: str, name: str, context: Mapping[str, Any]) -> str | None:
        try:
            template = self.env.get_template(f"{channel}/{name}")
        except jinja2.TemplateNotFound:
            return None
        return template.render(**context)

    def render(self, payload: Mapping[str, Any]) -> RenderedMessage:
        """Return the subject, text and HTML of the message an outbox payload describes."""
        channel = str(payload.get("channel"))
        context = {
            "campaign_id": payload.get("campaign_id"),
            "coupon_id": payload.get("coupon_id"),
            "offer": payload.get("offer") or f"coupon {payload.get('coupon_id')}",
            "channel": channel,
            "products": list(payload.get("products") or []),
            "currency": self.currency,
        }
        subject = (self._render(channel, "subject.txt.j2", context) or "").strip()
        context["subject"] = subject
        text = self._render(channel, "body.txt.j2", context)
        if text is None:
            raise LookupError(f"no body.txt.j2 template for channel {channel!r}")
        html = (self._render(channel, "body.html.j2", context) or "").strip()
        html = html + "\n" if html else ""
        # An email body ends with a newline like any text file; SMS and push texts are one line.
        text = text.strip() + ("\n" if channel == "email" else "")
        return RenderedMessage(subject=subject, text=text, html=html)


@functools.lru_cache(maxsize=8)
def _renderer(template_dir: Path | None, currency: str) -> MessageRenderer:
    return MessageRenderer(template_dir, currency)


def renderer_for(settings: Any) -> MessageRenderer:  # noqa: ANN401 - mlpkg.config.Settings
    """Return the renderer of the settings' template folder and currency (one per pair, reused)."""
    return _renderer(settings.recommender.template_dir, settings.currency)


def products_for_message(
    recommended: list[str], catalogue: Mapping[str, Mapping[str, Any]], min_basket: float, n: int
) -> list[dict[str, Any]]:
    """Return the first ``n`` recommended products a message may show with its coupon.

    A product qualifies when it is in stock and its price alone reaches the coupon's minimum basket
    (so the shown product can be bought with the coupon); the recommender's order is kept.
    """
    out = []
    for product_id in recommended:
        p = catalogue.get(product_id)
        if p is None or not p["in_stock"] or p["price"] < min_basket:
            continue
        out.append({"product_id": product_id, "category": p["category"],
                    "price": round(float(p["price"]), 2)})
        if len(out) == n:
            break
    return out
