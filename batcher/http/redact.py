"""URLs without their credentials, wherever batcher writes or passes one.

A base URL may carry a secret: ``https://user:password@host/...``, or a key in the query string
(``?api-key=...``, ``?sig=...``, ``?code=...``: gateways, Azure Functions, signed URLs). Every URL
that leaves the process in text (records' ``error_message``, logs, the summary, provenance
metadata, cache keys) goes through ``redact_url``; text from a library
that may quote the URL (an HTTP client's error message) goes through ``scrub``.

The rule for the query is an allow-list, not a deny-list: every value is redacted except those
of names known to be harmless (``api-version``), since a secret's name cannot be guessed
(``sig``, ``code``, ``x-goog-signature``...).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote, quote_plus, unquote, unquote_plus, urlsplit, urlunsplit

#: What stands in for a redacted value.
REDACTED = "***"
#: Query parameters whose values are kept (lower-case): versions, never credentials.
HARMLESS_QUERY_NAMES = frozenset({"api-version", "api_version", "apiversion", "version"})
#: Request headers whose values are no credentials (lower-case): the rest are searched for in
#: error messages as secrets.
HARMLESS_HEADERS = frozenset(
    {"accept", "accept-encoding", "accept-language", "content-type", "user-agent",
     "openai-beta", "openai-organization", "openai-project", "x-stainless-lang"}
)  # fmt: skip
#: Secrets shorter than this are not searched for in free text (a value like ``1`` would
#: blank out every digit of a message; so short a value is no credential).
_MIN_SECRET = 4
#: An API key or header value shorter than this is taken for a placeholder, not a credential.
_MIN_CREDENTIAL = 8
#: How clients encode a Basic authorization's user and password (aiohttp: latin-1; others UTF-8).
_BASIC = ("utf-8", "latin-1")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,31}")


def redact_url(url: str | None) -> str:
    """``url`` with its user info, fragment and every query value but harmless ones redacted.

    ``https://u:p@h/v1?api-version=1&api-key=k`` becomes ``https://***@h/v1?api-version=1&api-key=***``.
    Text without a query or user info (``"sim"``) is returned as it is.
    """
    if not url:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:  # one that cannot be parsed (``http://[::1/v1``)
        parts = None
    if parts is None or not parts.scheme or not parts.netloc:
        # not an absolute URL (a mistyped one, or "sim"): the same rules, by hand
        head, sep, query = url.partition("?")
        if "@" in head:
            head = f"{REDACTED}@{head.rpartition('@')[2]}"
        return head + (sep + _redact_query(query.partition("#")[0]) if sep else "")
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{REDACTED}@{host}" if "@" in parts.netloc else host
    return urlunsplit((parts.scheme, netloc, parts.path, _redact_query(parts.query), ""))


def scheme_only(url: str) -> str:
    """A URL with everything but its scheme redacted (``slack://***``): for URLs whose host
    or path may be the secret, such as Apprise's notification URLs."""
    scheme, sep, _ = url.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        return REDACTED
    return f"{scheme}://{REDACTED}"


def url_origin(url: str) -> str | None:
    """``scheme://host[:port]`` of an absolute URL (no credentials); ``None`` for a relative one."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return None
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], "", "", ""))


def secrets_in(url: str | None) -> list[str]:
    """The credentials a URL carries (user info, query values but harmless ones), in the
    spellings a library may quote them in: as written, decoded and percent-encoded."""
    if not url:
        return []
    parts = urlsplit(url)
    found: list[str] = []
    if "@" in parts.netloc:
        userinfo = parts.netloc.rpartition("@")[0]
        found += [userinfo, *userinfo.split(":", 1)]
    for name, value in _pairs(parts.query):
        if not _harmless(name):
            found.append(value)
    if parts.fragment:
        found.append(parts.fragment)
    spellings = {s for raw in found for s in (raw, unquote_plus(raw), quote(unquote_plus(raw)))}
    spellings |= {quote_plus(unquote_plus(raw)) for raw in found}
    # longest first: a secret that contains another is replaced whole
    return sorted((s for s in spellings if len(s) >= _MIN_SECRET), key=len, reverse=True)


def scrub(text: str, url: str | None) -> str:
    """``text`` with every credential of ``url`` replaced (for messages that may quote it)."""
    for secret in secrets_in(url):
        text = text.replace(secret, REDACTED)
    return text


def client_secrets(
    url: str | None, api_key: str | None, headers: Mapping[str, str] | None
) -> list[str]:
    """Every credential a client sends, longest first (as ``secrets_in`` gives them): the base
    URL's, and the Basic authorization its user info is sent as; the API key; and the value of
    every header but the harmless ones (``HARMLESS_HEADERS``: as for the query, a secret's
    name cannot be guessed), whole and without its scheme (``Basic``, ``Token``, ``bearer``).
    An API key or header value shorter than ``_MIN_CREDENTIAL`` is a placeholder (``EMPTY``,
    ``none``), not searched for: it would blank out words of every message."""
    found = set(secrets_in(url))
    found |= _basic_authorization(url)
    credentials = [api_key or ""]
    for name, value in (headers or {}).items():
        if name.lower() not in HARMLESS_HEADERS:
            credentials += [value.strip(), value.strip().partition(" ")[2].strip()]
    found |= {c for c in credentials if len(c) >= _MIN_CREDENTIAL}
    return sorted((s for s in found if len(s) >= _MIN_SECRET), key=len, reverse=True)


def _basic_authorization(url: str | None) -> set[str]:
    """The base64 token a URL's user info is sent as (``Authorization: Basic ...``)."""
    if not url:
        return set()
    netloc = urlsplit(url).netloc
    if "@" not in netloc:
        return set()
    user, _, password = netloc.rpartition("@")[0].partition(":")
    pair = f"{unquote(user)}:{unquote(password)}"
    return {base64.b64encode(pair.encode(code, "replace")).decode("ascii") for code in _BASIC}


def scrub_json(value: Any, secrets: Sequence[str]) -> Any:
    """``value`` (text, or JSON made of dicts and lists) with each of ``secrets`` replaced in
    every string, keys included: for an error answer that quotes what it was sent."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {scrub_json(k, secrets): scrub_json(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_json(item, secrets) for item in value]
    return value


def _redact_query(query: str) -> str:
    if not query:
        return ""
    kept = []
    for name, value in _pairs(query):
        if not name:
            kept.append(REDACTED)  # a bare value (``?k3y``): the whole item may be the secret
        else:
            kept.append(f"{name}={value}" if _harmless(name) else f"{name}={REDACTED}")
    return "&".join(kept)


def _pairs(query: str) -> list[tuple[str, str]]:
    """The raw (still encoded) name and value of each ``&``- or ``;``-separated parameter;
    an item without ``=`` is a value without a name."""
    pairs = []
    for item in query.replace(";", "&").split("&"):
        if item:
            name, eq, value = item.partition("=")
            pairs.append((name, value) if eq else ("", item))
    return pairs


def _harmless(name: str) -> bool:
    return unquote_plus(name).strip().lower() in HARMLESS_QUERY_NAMES
