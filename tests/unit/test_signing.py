"""Enveloped XML-DSig: pinned algorithms, interop with signxml, tamper evidence."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from lxml import etree

from cmi_sdk import (
    ConfigurationError,
    SignatureVerificationError,
    XMLInputError,
)
from cmi_sdk.signing import (
    DSIG_NAMESPACE,
    DocumentSigner,
    self_signed_certificate,
    verify_document,
)


def _certificate(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> x509.Certificate:
    return self_signed_certificate(key, common_name="delta.com")


@pytest.fixture(scope="module")
def ec_signer() -> DocumentSigner:
    key = ec.generate_private_key(ec.SECP256R1())
    return DocumentSigner(key=key, certificate=_certificate(key))


@pytest.fixture(scope="module")
def rsa_signer() -> DocumentSigner:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return DocumentSigner(key=key, certificate=_certificate(key))


@pytest.mark.parametrize("signer_name", ["ec_signer", "rsa_signer"])
def test_signatures_verify_with_the_pinned_certificate(
    request: pytest.FixtureRequest, signer_name: str, ticket_xml: bytes
) -> None:
    signer: DocumentSigner = request.getfixturevalue(signer_name)
    signed = signer.sign(ticket_xml)
    vouched = verify_document(signed, signer.certificate)
    assert b"<ticketnumber>12524057</ticketnumber>" in vouched
    assert b"Signature" not in vouched
    # PEM works as well as a certificate object.
    pem = signer.certificate.public_bytes(serialization.Encoding.PEM)
    assert verify_document(signed, pem) == vouched


def test_signed_content_is_never_reserialized(ec_signer: DocumentSigner, ticket_xml: bytes) -> None:
    signed = ec_signer.sign(ticket_xml)
    end = ticket_xml.rfind(b"</")
    assert signed.startswith(ticket_xml[:end])
    assert signed.endswith(ticket_xml[end:])
    root = etree.fromstring(signed)
    assert root[-1].tag == f"{{{DSIG_NAMESPACE}}}Signature"
    # The signed document still validates: the schema's root allows only its own children,
    # so the signature is checked by the SDK, not by the XSD.


def test_signed_info_is_written_in_canonical_form(
    ec_signer: DocumentSigner, ticket_xml: bytes
) -> None:
    signed = ec_signer.sign(ticket_xml)
    root = etree.fromstring(signed)
    signed_info = root.find(f"{{{DSIG_NAMESPACE}}}Signature/{{{DSIG_NAMESPACE}}}SignedInfo")
    assert signed_info is not None
    canonical = etree.tostring(signed_info, method="c14n", exclusive=True)
    assert canonical in signed


def test_algorithms_are_pinned(ec_signer: DocumentSigner, ticket_xml: bytes) -> None:
    signed = ec_signer.sign(ticket_xml).decode()
    for algorithm in (
        "http://www.w3.org/2001/10/xml-exc-c14n#",
        "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256",
        "http://www.w3.org/2000/09/xmldsig#enveloped-signature",
        "http://www.w3.org/2001/04/xmlenc#sha256",
    ):
        assert f'Algorithm="{algorithm}"' in signed


def test_any_changed_byte_of_the_signed_content_fails(
    ec_signer: DocumentSigner, ticket_xml: bytes
) -> None:
    signed = ec_signer.sign(ticket_xml)
    start = signed.index(b"<ticket")  # the XML declaration is not part of what is signed
    stop = signed.index(b"<Signature")
    for position in range(start, stop):
        replacement = b"X" if signed[position : position + 1] != b"X" else b"Y"
        tampered = signed[:position] + replacement + signed[position + 1 :]
        # A signature that fails, or XML the hardened parser refuses: never accepted.
        with pytest.raises((SignatureVerificationError, XMLInputError)):
            verify_document(tampered, ec_signer.certificate)


def test_another_signer_or_no_signature_fails(
    ec_signer: DocumentSigner, rsa_signer: DocumentSigner, ticket_xml: bytes
) -> None:
    signed = ec_signer.sign(ticket_xml)
    with pytest.raises(SignatureVerificationError):
        verify_document(signed, rsa_signer.certificate)
    with pytest.raises(SignatureVerificationError):
        verify_document(ticket_xml, ec_signer.certificate)


def test_signature_value_changed_fails(ec_signer: DocumentSigner, ticket_xml: bytes) -> None:
    signed = ec_signer.sign(ticket_xml)
    start = signed.index(b"<SignatureValue>") + len(b"<SignatureValue>")
    flipped = b"A" if signed[start : start + 1] != b"A" else b"B"
    with pytest.raises(SignatureVerificationError):
        verify_document(signed[:start] + flipped + signed[start + 1 :], ec_signer.certificate)


def test_key_checks() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(ConfigurationError, match="P-256"):
        DocumentSigner(key=p384, certificate=_certificate(p384))
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 (refused)
    with pytest.raises(ConfigurationError, match="2048"):
        DocumentSigner(key=small, certificate=_certificate(small))
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ConfigurationError, match="not the signing key's"):
        DocumentSigner(key=key, certificate=_certificate(other))


def test_from_pem(ec_signer: DocumentSigner, ticket_xml: bytes) -> None:
    key_pem = ec_signer.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    cert_pem = ec_signer.certificate.public_bytes(serialization.Encoding.PEM)
    loaded = DocumentSigner.from_pem(key_pem, cert_pem)
    verify_document(loaded.sign(ticket_xml), cert_pem)
    with pytest.raises(ConfigurationError, match="cannot load"):
        DocumentSigner.from_pem(b"not a key", cert_pem)


def test_a_document_without_an_end_tag_is_refused(ec_signer: DocumentSigner) -> None:
    with pytest.raises(ValueError, match="no end tag"):
        ec_signer.sign(b"<ticket/>")


def test_verify_refuses_hostile_xml_first(ec_signer: DocumentSigner) -> None:
    from cmi_sdk import ForbiddenXMLError

    with pytest.raises(ForbiddenXMLError):
        verify_document(b'<!DOCTYPE t [<!ENTITY x "y">]><t>&x;</t>', ec_signer.certificate)


def test_generate_development_keys(tmp_path: Path, ticket_xml: bytes) -> None:
    from cmi_sdk.signing import generate_development_keys

    key, cert = generate_development_keys(tmp_path / "keys")
    assert key.stat().st_mode & 0o777 == 0o600
    signer = DocumentSigner.from_pem(key.read_bytes(), cert.read_bytes())
    verify_document(signer.sign(ticket_xml), cert.read_bytes())
    with pytest.raises(FileExistsError):
        generate_development_keys(tmp_path / "keys")


def test_cli_keys_and_verify(
    tmp_path: Path, ticket_xml: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    from cmi_sdk.cli import EXIT_INVALID, EXIT_OK, main

    keys = tmp_path / "keys"
    assert main(["keys", "generate", str(keys)]) == EXIT_OK
    assert main(["keys", "generate", str(keys)]) == EXIT_INVALID  # never overwrites
    signer = DocumentSigner.from_pem(
        (keys / "key.pem").read_bytes(), (keys / "cert.pem").read_bytes()
    )
    signed = tmp_path / "signed.xml"
    signed.write_bytes(signer.sign(ticket_xml))
    capsys.readouterr()
    assert main(["verify", str(signed), "--cert", str(keys / "cert.pem")]) == EXIT_OK
    assert "signature verified" in capsys.readouterr().out
    signed.write_bytes(signed.read_bytes().replace(b"451.89", b"451.88"))
    assert main(["verify", str(signed), "--cert", str(keys / "cert.pem")]) == EXIT_INVALID
    assert "does not verify" in capsys.readouterr().err
    assert main(["verify", str(signed), "--cert", str(signed)]) == EXIT_INVALID
    assert "Traceback" not in capsys.readouterr().err
