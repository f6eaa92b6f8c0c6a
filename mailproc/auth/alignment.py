"""Identifier alignment (DMARC-style): does an authenticated domain speak for the From domain?

``strict``: the two domains are equal. ``relaxed``: they share an organizational domain by the
Public Suffix List (private section included). Nothing ever aligns through a public suffix:
a signature by ``co.uk`` or ``github.io`` speaks for nobody."""

from __future__ import annotations

from functools import lru_cache

from publicsuffixlist import PublicSuffixList

from mailproc.addresses import AddressError, normalize_domain


@lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


def canonical_domain(domain: str | None) -> str | None:
    """Lowercase A-label form, or None if it is not a valid host name."""
    if not domain:
        return None
    try:
        return normalize_domain(domain.rstrip("."))
    except AddressError:
        return None


def is_public_suffix(domain: str) -> bool:
    return bool(_psl().is_public(domain))


def organizational_domain(domain: str) -> str | None:
    """The registrable domain of ``domain``; None for a public suffix itself."""
    result = _psl().privatesuffix(domain)
    return str(result) if result else None


def aligned(authenticated: str | None, from_domain: str | None, mode: str) -> bool:
    auth = canonical_domain(authenticated)
    author = canonical_domain(from_domain)
    if auth is None or author is None or is_public_suffix(auth) or is_public_suffix(author):
        return False
    if auth == author:
        return True
    if mode != "relaxed":
        return False
    org = organizational_domain(author)
    return org is not None and org == organizational_domain(auth)
