"""XML-DSig for documents: signatures a customer's store can verify years later.

A signature sits where the document's standard allows one (the document type says where,
and :class:`~cmi_sdk.Documents` puts it there):

- **enveloped** (:meth:`DocumentSigner.sign`): one ``<Signature>`` element, in the XML-DSig
  namespace, as the last child of the document's root (the SDK's own vocabularies);
- **enveloped elsewhere** (:meth:`DocumentSigner.enveloped_signature`): the same element,
  placed by the caller where the standard keeps signatures (UBL's signature extension);
- **detached** (:meth:`DocumentSigner.sign_detached`): a ``<Signature>`` document of its
  own over the exact bytes of a document that has no place for one (OFX), which travels
  beside it.

The algorithms are pinned:

- canonicalization: exclusive XML canonicalization 1.0, without comments;
- reference: ``URI=""``, the document's root element, with the enveloped-signature and
  exclusive canonicalization transforms, digested with SHA-256;
- signature: ECDSA P-256 with SHA-256 (RFC 4051; the value is ``r || s``), or RSA PKCS#1
  v1.5 with SHA-256 for keys of 2048 bits or more;
- key info: the signer's X.509 certificate, so a receiver can pin it;
- a detached signature's one reference names the document (a relative URI, its file name)
  and has no transforms: its digest is the SHA-256 of the document's bytes as delivered.

The signature is spliced into the document's bytes just before the root's end tag: the
signed content is never re-serialized, so the stored bytes are the rendered bytes. The
``SignedInfo`` is written directly in its canonical form, so what is signed is exactly what
a verifier canonicalizes.

Verification (:func:`verify_document`, :func:`verify_detached`) uses signxml, an
independent implementation, with the expected algorithms pinned and the signer's certificate
given.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from lxml import etree

from cmi_sdk._exceptions import (
    ConfigurationError,
    DocumentNotSignedError,
    DocumentTooLargeError,
    SignatureVerificationError,
)
from cmi_sdk._files import private_directory, write_private_file
from cmi_sdk._xml import DEFAULT_MAX_BYTES, HardenedParser

__all__ = [
    "DETACHED_SIGNATURE_HEADER",
    "DSIG_NAMESPACE",
    "UBL_SIGNATURE_PATH",
    "DocumentSigner",
    "generate_development_keys",
    "self_signed_certificate",
    "verify_detached",
    "verify_document",
]

DSIG_NAMESPACE = "http://www.w3.org/2000/09/xmldsig#"

DETACHED_SIGNATURE_HEADER = "cmi-document-signature"
"""The delivery header that carries a detached signature: the signature document in
base64 (one line, as a header must be)."""
_EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"
_ENVELOPED = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
_SHA256 = "http://www.w3.org/2001/04/xmlenc#sha256"
_ECDSA_SHA256 = "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256"
_RSA_SHA256 = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"

# SignedInfo in exclusive canonical form: the one namespace it uses is declared on it,
# empty elements have end tags, attributes are in order, and there is no whitespace.
_SIGNED_INFO = (
    f'<SignedInfo xmlns="{DSIG_NAMESPACE}">'
    f'<CanonicalizationMethod Algorithm="{_EXC_C14N}"></CanonicalizationMethod>'
    '<SignatureMethod Algorithm="{method}"></SignatureMethod>'
    '<Reference URI="">'
    "<Transforms>"
    f'<Transform Algorithm="{_ENVELOPED}"></Transform>'
    f'<Transform Algorithm="{_EXC_C14N}"></Transform>'
    "</Transforms>"
    f'<DigestMethod Algorithm="{_SHA256}"></DigestMethod>'
    "<DigestValue>{digest}</DigestValue>"
    "</Reference>"
    "</SignedInfo>"
)

# A detached signature's SignedInfo: one reference to the document's bytes, no transforms.
_DETACHED_SIGNED_INFO = (
    f'<SignedInfo xmlns="{DSIG_NAMESPACE}">'
    f'<CanonicalizationMethod Algorithm="{_EXC_C14N}"></CanonicalizationMethod>'
    '<SignatureMethod Algorithm="{method}"></SignatureMethod>'
    '<Reference URI="{uri}">'
    f'<DigestMethod Algorithm="{_SHA256}"></DigestMethod>'
    "<DigestValue>{digest}</DigestValue>"
    "</Reference>"
    "</SignedInfo>"
)

# Where an enveloped signature may sit: the root's child (the SDK's own vocabularies) or
# UBL's signature extension (the UBL 2.x signature profile).
_UBL_EXT = "urn:oasis:names:specification:ubl:schema:xsd:CommonExtensionComponents-2"
_UBL_SIG = "urn:oasis:names:specification:ubl:schema:xsd:CommonSignatureComponents-2"
_UBL_SAC = "urn:oasis:names:specification:ubl:schema:xsd:SignatureAggregateComponents-2"
UBL_SIGNATURE_PATH = (
    f"{{{_UBL_EXT}}}UBLExtensions",
    f"{{{_UBL_EXT}}}UBLExtension",
    f"{{{_UBL_EXT}}}ExtensionContent",
    f"{{{_UBL_SIG}}}UBLDocumentSignatures",
    f"{{{_UBL_SAC}}}SignatureInformation",
)
"""The elements from a UBL document's root down to the one holding its ``ds:Signature``."""

# A detached reference names a file beside the signature: no scheme, no folder, no fragment.
_DOCUMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# Lossless (comments and processing instructions kept, as a signature must see them), with
# the resolver that refuses every external reference; one lxml parser a thread.
_PARSER = HardenedParser()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class DocumentSigner:
    """Signs rendered documents with the firm's key.

    :param key: an ECDSA P-256 or RSA (2048 bits or more) private key.
    :param certificate: the key's X.509 certificate, embedded in each signature.
    :raises ConfigurationError: another kind of key, or a certificate for another key.
    """

    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    certificate: x509.Certificate

    def __post_init__(self) -> None:
        key = self.key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            if not isinstance(key.curve, ec.SECP256R1):
                raise ConfigurationError("ECDSA signing keys must be on the P-256 curve")
            method = _ECDSA_SHA256
        elif isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < 2048:
                raise ConfigurationError("RSA signing keys must have at least 2048 bits")
            method = _RSA_SHA256
        else:
            raise ConfigurationError("signing keys must be ECDSA P-256 or RSA")
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if self.certificate.public_key().public_bytes(der, public) != key.public_key().public_bytes(
            der, public
        ):
            raise ConfigurationError("the certificate is not the signing key's")
        cert_b64 = _b64(self.certificate.public_bytes(der))
        object.__setattr__(self, "_method", method)
        object.__setattr__(
            self,
            "_key_info",
            f"<KeyInfo><X509Data><X509Certificate>{cert_b64}"
            "</X509Certificate></X509Data></KeyInfo>",
        )

    @classmethod
    def from_pem(
        cls, key_pem: bytes, certificate_pem: bytes, *, password: bytes | None = None
    ) -> DocumentSigner:
        """Load the key and certificate from PEM (as ``cmi keys generate`` writes them)."""
        try:
            key = serialization.load_pem_private_key(key_pem, password=password)
            certificate = x509.load_pem_x509_certificate(certificate_pem)
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"cannot load the signing key or certificate: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ConfigurationError("signing keys must be ECDSA P-256 or RSA")
        return cls(key=key, certificate=certificate)

    def sign(self, xml: bytes, *, root: etree._Element | None = None) -> bytes:
        """Return ``xml`` with an enveloped signature before its root's end tag.

        ``xml`` is a document the SDK rendered (it is parsed without the hardened checks):
        UTF-8, one root element with an end tag, no DOCTYPE.

        :param root: the root element parsed from exactly these bytes, when the caller
            already has it (the emit pipeline parsed them to validate): saves a parse.
        """
        end = xml.rfind(b"</")
        if end < 0 or xml[end:].rstrip()[-1:] != b">":
            raise ValueError("the document's root element has no end tag to sign before")
        if root is None:
            root = etree.fromstring(xml, _PARSER.lxml_parser())
        return xml[:end] + self.enveloped_signature(root) + xml[end:]

    def enveloped_signature(self, root: etree._Element) -> bytes:
        """An enveloped ``<Signature>`` element over ``root``, for the caller to place
        inside it where nothing else changes (no whitespace added or removed): what the
        enveloped-signature transform removes is then exactly what was added.

        ``root`` is the tree as it will be sent, without the signature.
        """
        # The root element, not the document: processing instructions before it (OFX's
        # <?OFX ...?> header) are outside what is signed, as signxml, the verifier the SDK
        # and its receivers use, reads URI="" for an enveloped signature.
        canonical = etree.tostring(root, method="c14n", exclusive=True, with_comments=False)
        digest = _b64(hashlib.sha256(canonical).digest())
        signed_info = _SIGNED_INFO.format(method=self._method, digest=digest)  # type: ignore[attr-defined]
        return self._signature(signed_info)

    def sign_detached(self, data: bytes, *, name: str = "document") -> bytes:
        """A detached signature over exactly ``data``: a ``<Signature>`` document whose one
        reference, ``URI=name``, digests the bytes as they are (no transforms).

        :param name: the document's file name beside the signature (what ``xmlsec1`` opens
            and what its ``--url-map`` maps): letters, digits, ``.``, ``_`` and ``-``.
        :raises ValueError: ``name`` is not such a name.
        """
        if not _DOCUMENT_NAME.fullmatch(name):
            raise ValueError(f"a detached signature names its document by a file name: {name!r}")
        digest = _b64(hashlib.sha256(data).digest())
        signed_info = _DETACHED_SIGNED_INFO.format(method=self._method, uri=name, digest=digest)  # type: ignore[attr-defined]
        return b'<?xml version="1.0" encoding="UTF-8"?>\n' + self._signature(signed_info) + b"\n"

    def _signature(self, signed_info: str) -> bytes:
        value = _b64(self._signature_value(signed_info.encode()))
        return (
            f'<Signature xmlns="{DSIG_NAMESPACE}">{signed_info}'
            f"<SignatureValue>{value}</SignatureValue>{self._key_info}</Signature>"  # type: ignore[attr-defined]
        ).encode()

    def _signature_value(self, data: bytes) -> bytes:
        key = self.key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def self_signed_certificate(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    *,
    common_name: str = "cmi-sdk development",
    days: int = 365,
) -> x509.Certificate:
    """A self-signed certificate for ``key``, valid from five minutes ago for ``days``."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def generate_development_keys(
    directory: str | Path, *, algorithm: str = "ec", common_name: str = "cmi-sdk development"
) -> tuple[Path, Path]:
    """Write ``key.pem`` (mode 0600) and a self-signed ``cert.pem`` into ``directory``.

    For development and tests: a production key's certificate comes from the firm's own
    certificate authority. Existing files are never overwritten.

    :param algorithm: ``ec`` (ECDSA P-256, the default) or ``rsa`` (3072 bits).
    :raises FileExistsError: ``key.pem`` or ``cert.pem`` is already there.
    """
    folder = Path(directory)
    key_path, cert_path = folder / "key.pem", folder / "cert.pem"
    for path in (key_path, cert_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; not overwriting a key")
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if algorithm == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    elif algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    else:
        raise ConfigurationError(f"unknown key algorithm {algorithm!r}: use ec or rsa")
    certificate = self_signed_certificate(key, common_name=common_name)
    private_directory(folder)  # a folder made here for a key: its owner's only
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Created with 0600 from the start, so the key is never readable by others.
    write_private_file(key_path, key_bytes)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def verify_document(
    xml: bytes, certificate: x509.Certificate | bytes, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> bytes:
    """Verify an enveloped signature against the signer's certificate (pinned).

    The signature is looked for where the SDK puts one: the root's last child, or UBL's
    signature extension (``ext:UBLExtensions/.../sac:SignatureInformation``); a document
    holds exactly one ``Signature``. The document first passes the hardened parser (size
    cap, no DOCTYPE, depth limit, nothing opened), and the verifier works on that tree: it
    never parses the bytes itself. Everything in the document must be what the signature
    covers: a comment anywhere (the signature's canonical form leaves comments out, so a
    comment could split a value without breaking the signature), or a processing
    instruction anywhere, is refused; the one exception is an OFX root's own ``<?OFX?>``
    header before it (statements earlier releases signed inside), from which the SDK reads
    no value.

    :param certificate: the expected signer's certificate, as an object or PEM bytes.
    :returns: the signed document's canonical form, without the signature: what is
        actually vouched for, and what values are to be read from (parse it with
        :meth:`cmi_sdk.Adapter.parse`).
    :raises DocumentNotSignedError: the document has no signature.
    :raises SignatureVerificationError: another signer, other algorithms than the pinned
        ones, a signature elsewhere or twice, a signature over less than the whole document
        (a reference by ID, other transforms), content changed after signing, or content
        the signature does not cover.
    :raises XMLInputError: the hardened parser refused the document.
    """
    tree = _hardened(max_bytes).parse(xml, lossless=True)
    _refuse_uncovered(tree)
    location = _signature_location(tree.getroot())
    _require_whole_document(tree.getroot())
    result = _verify(tree.getroot(), certificate, location=location)
    signed: bytes = result.signed_data
    return signed


def verify_detached(
    document: bytes,
    signature: bytes,
    certificate: x509.Certificate | bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> bytes:
    """Verify a detached signature (see :meth:`DocumentSigner.sign_detached`) over exactly
    ``document``'s bytes, against the signer's certificate (pinned).

    The signature passes the hardened parser; it must be one ``Signature`` element with one
    reference that names a file (no scheme, folder or fragment) and has no transforms, so
    its digest is of the bytes as they are: one changed, added or removed byte anywhere
    fails it. The document itself is never parsed here.

    :returns: ``document``, verified.
    :raises SignatureVerificationError: not such a signature, another signer, other
        algorithms than the pinned ones, or the bytes changed after signing.
    :raises DocumentTooLargeError: ``document`` is over ``max_bytes``.
    :raises XMLInputError: the hardened parser refused the signature.
    """
    if len(document) > max_bytes:
        raise DocumentTooLargeError(
            f"the document is over the {max_bytes}-byte cap", limit=max_bytes
        )
    tree = _hardened(max_bytes).parse(signature, lossless=True)
    _refuse_uncovered(tree)
    root = tree.getroot()
    if root.tag != f"{{{DSIG_NAMESPACE}}}Signature":
        raise SignatureVerificationError(
            f"a detached signature is a Signature element, not {root.tag!s}"
        )
    references = root.findall(f"{{{DSIG_NAMESPACE}}}SignedInfo/{{{DSIG_NAMESPACE}}}Reference")
    if len(references) != 1:
        raise SignatureVerificationError("a detached signature has exactly one reference")
    reference = references[0]
    uri = reference.get("URI") or ""
    if not _DOCUMENT_NAME.fullmatch(uri):
        raise SignatureVerificationError(
            f"a detached signature's reference names a file beside it, not {uri!r}"
        )
    if reference.find(f"{{{DSIG_NAMESPACE}}}Transforms") is not None:
        # A transform would digest something made from the bytes, not the bytes.
        raise SignatureVerificationError("a detached signature's reference has no transforms")

    def resolve(wanted: str) -> bytes | None:
        return document if wanted == uri else None

    _verify(root, certificate, location=None, uri_resolver=resolve)
    return document


def _verify(
    root: etree._Element,
    certificate: x509.Certificate | bytes,
    *,
    location: str | None,
    uri_resolver: Callable[[str], bytes | None] | None = None,
) -> Any:
    # signxml is imported by verifiers only: the signing path does not need it.
    from signxml.algorithms import DigestAlgorithm, SignatureMethod  # noqa: PLC0415
    from signxml.exceptions import InvalidInput, InvalidSignature  # noqa: PLC0415
    from signxml.verifier import SignatureConfiguration, XMLVerifier  # noqa: PLC0415

    pem = (
        certificate.public_bytes(serialization.Encoding.PEM)
        if isinstance(certificate, x509.Certificate)
        else certificate
    )
    options: dict[str, Any] = {} if location is None else {"location": location}
    config = SignatureConfiguration(
        require_x509=True,
        expect_references=1,
        signature_methods=frozenset({SignatureMethod.ECDSA_SHA256, SignatureMethod.RSA_SHA256}),
        digest_algorithms=frozenset({DigestAlgorithm.SHA256}),
        **options,
    )
    try:
        # The parsed root, and the hardened parser for signxml's own re-parses of it.
        result = XMLVerifier().verify(
            root,
            x509_cert=pem.decode("ascii"),
            expect_config=config,
            parser=_PARSER.lxml_parser(),
            uri_resolver=uri_resolver,
        )
    except (InvalidSignature, InvalidInput, etree.XMLSyntaxError) as exc:
        raise SignatureVerificationError(
            f"the document's signature does not verify: {exc}"
        ) from None
    if isinstance(result, list):  # one reference is expected, so one result comes back
        result = result[0]
    return result


def _require_whole_document(root: etree._Element) -> None:
    """Refuse an enveloped signature of any other shape than the SDK makes: one reference,
    ``URI=""``, the enveloped-signature then exclusive canonicalization transforms.

    A reference to an element by ID (or a transform that picks part of the document)
    vouches for that part only, and everything around it would pass as verified: a
    signature the same key made over something else could be carried into a forged
    document (signature wrapping).
    """
    signature = next(root.iter(f"{{{DSIG_NAMESPACE}}}Signature"))
    references = signature.findall(f"{{{DSIG_NAMESPACE}}}SignedInfo/{{{DSIG_NAMESPACE}}}Reference")
    transforms = [
        transform.get("Algorithm")
        for reference in references
        for transform in reference.iterfind(f"{{{DSIG_NAMESPACE}}}Transforms/*")
    ]
    if (
        len(references) != 1
        or references[0].get("URI") != ""
        or transforms != [_ENVELOPED, _EXC_C14N]
    ):
        raise SignatureVerificationError(
            'an enveloped signature covers the whole document (one reference, URI="",'
            " enveloped and exclusive canonicalization): this one covers something else"
        )


def _signature_location(root: etree._Element) -> str:
    """Where the document's one signature is, as signxml's ``location``.

    :raises DocumentNotSignedError: there is none.
    :raises SignatureVerificationError: there are several, or it is somewhere else.
    """
    found = list(root.iter(f"{{{DSIG_NAMESPACE}}}Signature"))
    if not found:
        raise DocumentNotSignedError("this document is not signed")
    if len(found) > 1:
        raise SignatureVerificationError(
            f"the document holds {len(found)} signatures; the SDK signs a document once"
        )
    parent = found[0].getparent()
    if parent is root and found[0].getnext() is None:
        return "./"
    path: list[str] = []
    node = parent
    while node is not None and node is not root:
        path.append(str(node.tag))
        node = node.getparent()
    if tuple(reversed(path)) == UBL_SIGNATURE_PATH:
        return "./" + "".join(f"{tag}/" for tag in UBL_SIGNATURE_PATH)
    raise SignatureVerificationError(
        "the document's signature is neither the root's last child nor in UBL's signature"
        " extension: refused"
    )


def _hardened(max_bytes: int) -> HardenedParser:
    return _PARSER if max_bytes == _PARSER.max_bytes else HardenedParser(max_bytes=max_bytes)


def _refuse_uncovered(tree: etree._ElementTree) -> None:
    """Refuse what a signature over the root does not cover, or covers but the SDK would
    not read: comments anywhere, processing instructions anywhere but the OFX header."""
    root = tree.getroot()
    before = list(root.itersiblings(preceding=True))
    after = list(root.itersiblings())
    inside = list(root.iter(etree.Comment, etree.ProcessingInstruction))
    if any(isinstance(node, etree._Comment) for node in (*before, *inside, *after)):
        raise SignatureVerificationError(
            "the document holds a comment, which its signature does not cover: refused"
        )
    if inside or after:
        raise SignatureVerificationError(
            "the document holds a processing instruction inside or after its root element: refused"
        )
    # Before the root, outside the signature: only an OFX root's own header, once (OFX 2
    # statements signed inside by earlier releases). Anything else, such as an
    # xml-stylesheet a viewer would fetch, would ride along unsigned with verified content.
    header = (
        root.tag == "OFX"
        and len(before) == 1
        and isinstance(before[0], etree._ProcessingInstruction)
        and before[0].target == "OFX"
    )
    if before and not header:
        raise SignatureVerificationError(
            "the document holds a processing instruction before its root element, which its"
            " signature does not cover: refused"
        )
