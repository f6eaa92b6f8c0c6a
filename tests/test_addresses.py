"""Address syntax and the one normalisation used wherever two addresses are compared."""

from __future__ import annotations

import unicodedata

import pytest

from mailproc.addresses import AddressError, normalize_address, normalize_domain

# -- normalisation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "normalized"),
    [
        ("support@example.com", "support@example.com"),
        ("Support@Example.COM", "support@example.com"),
        ("SUPPORT@EXAMPLE.COM", "support@example.com"),
        ("first.last@sub.example.co.uk", "first.last@sub.example.co.uk"),
        ("o'neil+reset@example.com", "o'neil+reset@example.com"),
        ("x!#$%&*/=?^_`{|}~-y@example.com", "x!#$%&*/=?^_`{|}~-y@example.com"),
        ("a@a-b.example", "a@a-b.example"),
        ("a@123.example", "a@123.example"),
    ],
)
def test_ascii_local_part_and_domain_are_lowercased(address: str, normalized: str) -> None:
    assert normalize_address(address) == normalized


def test_plus_tags_and_dots_are_not_stripped() -> None:
    tagged = normalize_address("A.B+Reset@Example.com")

    assert tagged == "a.b+reset@example.com"
    assert tagged != normalize_address("ab@example.com")
    assert tagged != normalize_address("a.b@example.com")
    assert normalize_address("ab@example.com") != normalize_address("a.b@example.com")


@pytest.mark.parametrize(
    ("address", "normalized"),
    [
        ("user@Bücher.Example", "user@xn--bcher-kva.example"),
        ("user@BÜCHER.EXAMPLE", "user@xn--bcher-kva.example"),
        ("user@xn--bcher-kva.example", "user@xn--bcher-kva.example"),
        ("user@XN--BCHER-KVA.Example", "user@xn--bcher-kva.example"),
        ("user@пример.испытание", "user@xn--e1afmkfd.xn--80akhbyknj4f"),
    ],
)
def test_domain_becomes_lowercase_idna_a_labels(address: str, normalized: str) -> None:
    assert normalize_address(address) == normalized


def test_u_label_and_a_label_spellings_compare_equal() -> None:
    assert normalize_address("Help@Bücher.example") == normalize_address(
        "help@xn--bcher-kva.EXAMPLE"
    )


def test_non_ascii_local_part_keeps_its_case() -> None:
    assert normalize_address("Jörg@Example.org") == "Jörg@example.org"
    assert normalize_address("Jörg@example.org") != normalize_address("jörg@example.org")


def test_non_ascii_local_part_is_put_in_nfc() -> None:
    decomposed = "Jo\u0308rg@example.org"  # o + COMBINING DIAERESIS
    composed = "J\u00f6rg@example.org"

    assert normalize_address(decomposed) == composed
    assert normalize_address(decomposed) == normalize_address(composed)
    assert unicodedata.is_normalized("NFC", normalize_address(decomposed))


def test_non_ascii_local_part_is_not_otherwise_folded() -> None:
    # NFC, not NFKC: the ligature and the fullwidth letter stay as they are.
    assert normalize_address("\ufb01le@example.org") == "\ufb01le@example.org"
    assert normalize_address("\uff41@example.org") == "\uff41@example.org"


def test_normalisation_is_idempotent() -> None:
    for address in (
        "Support@Example.COM",
        "A.B+x@Bücher.Example",
        "Jo\u0308rg@Example.org",
        "用户@例子.广告",
    ):
        once = normalize_address(address)
        assert normalize_address(once) == once


def test_longest_local_part_is_accepted() -> None:
    local = "a" * 64

    assert normalize_address(f"{local}@example.com") == f"{local}@example.com"


def test_local_part_length_counts_utf8_bytes() -> None:
    assert normalize_address("é" * 32 + "@example.com") == "é" * 32 + "@example.com"
    with pytest.raises(AddressError, match="bad local part"):
        normalize_address("é" * 33 + "@example.com")


def test_normalize_domain_alone() -> None:
    assert normalize_domain("Mail.Example.COM") == "mail.example.com"
    assert normalize_domain("bücher.example") == "xn--bcher-kva.example"


# -- rejections -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "sup port@example.com",
        " support@example.com",
        "support@example.com ",
        "support\t@example.com",
        "support@example.com\r\n",
        "support@example.com\nbcc@evil.example",
        "support\r\n@example.com",
        "support\x00@example.com",
        "support@example.com\x00",
        "support\x1b@example.com",
        "support\x7f@example.com",
        "support@exa mple.com",
    ],
)
def test_control_characters_and_whitespace_are_rejected(address: str) -> None:
    with pytest.raises(AddressError, match="whitespace or control character"):
        normalize_address(address)


@pytest.mark.parametrize("address", ["support", "support.example.com", "", "support%example.com"])
def test_missing_at_is_rejected(address: str) -> None:
    with pytest.raises(AddressError, match="expected local@domain"):
        normalize_address(address)


def test_empty_local_part_is_rejected() -> None:
    with pytest.raises(AddressError, match="expected local@domain"):
        normalize_address("@example.com")


@pytest.mark.parametrize(
    "address",
    [
        ".support@example.com",
        "support.@example.com",
        "sup..port@example.com",
        '"support"@example.com',
        "support@evil.example@example.com",
        "(comment)support@example.com",
        "support(comment)@example.com",
        "<support@example.com>",
        "sup,port@example.com",
        "sup;port@example.com",
        "sup[port]@example.com",
        "sup\\port@example.com",
        "a" * 65 + "@example.com",
    ],
)
def test_bad_local_part_is_rejected(address: str) -> None:
    with pytest.raises(AddressError, match="bad local part"):
        normalize_address(address)


@pytest.mark.parametrize(
    "domain",
    [
        "-example.com",
        "example-.com",
        "exa_mple.com",
        "example..com",
        ".example.com",
        "example.com.",
        "a" * 64 + ".com",
        "[192.0.2.1]",
        "example.com:25",
        "exa!mple.com",
        "xn--zz.com",
        "example.xn--",
    ],
)
def test_bad_domain_labels_are_rejected(domain: str) -> None:
    with pytest.raises(AddressError, match="invalid domain"):
        normalize_address(f"support@{domain}")


@pytest.mark.parametrize("domain", ["localhost", "com", "LOCALHOST", "bücher"])
def test_single_label_domains_are_rejected(domain: str) -> None:
    with pytest.raises(AddressError, match="needs at least two labels"):
        normalize_address(f"support@{domain}")


def test_empty_domain_is_rejected() -> None:
    with pytest.raises(AddressError, match="invalid domain"):
        normalize_address("support@")


def test_overlong_domain_is_rejected() -> None:
    domain = ".".join(["a" * 63] * 4) + ".com"  # 4 * 64 + 3 = 259 characters

    with pytest.raises(AddressError, match="invalid domain"):
        normalize_address(f"support@{domain}")


@pytest.mark.parametrize(
    "address",
    ["\udcff@example.com", "sup\udcc3port@example.com", "support@\udcffexample.com"],
)
def test_undecodable_bytes_are_an_address_error(address: str) -> None:
    # aiosmtpd decodes envelope arguments with surrogateescape: invalid UTF-8 arrives as lone
    # surrogates and must give AddressError (a 550), not some other exception (a 451).
    with pytest.raises(AddressError):
        normalize_address(address)


def test_address_error_is_a_value_error_naming_the_address() -> None:
    with pytest.raises(ValueError, match=r"'nobody'") as info:
        normalize_address("nobody")

    assert isinstance(info.value, AddressError)


@pytest.mark.parametrize(
    "character",
    [
        pytest.param("\x85", id="NEL"),
        pytest.param("\x9b", id="C1-CSI"),
        pytest.param("\xa0", id="NBSP"),
        pytest.param("\u2028", id="LINE-SEPARATOR"),
        pytest.param("\u3000", id="IDEOGRAPHIC-SPACE"),
    ],
)
def test_non_ascii_whitespace_and_control_characters_are_rejected(character: str) -> None:
    with pytest.raises(AddressError):
        normalize_address(f"sup{character}port@example.com")
