"""The document pipeline: the one way the SDK makes a document.

Every document the SDK sends (an emitted transaction, a digest, a consent record, an
answer to a request, an offer, a standard's own helper's output) goes the same way::

    render (the type's renderer, or its template) ─▶ validate (root element and XSD)
    ─▶ minimize to the fields the terms allow (emission only) ─▶ sign (XML-DSig)

:class:`Documents` is that pipeline; the adapter owns one (``adapter.documents``) and hands
it to the emitter and to the request pipeline.

The signature goes where the document type's standard keeps one (its
:class:`~cmi_sdk.SignaturePlacement`): the root's last child (the SDK's own vocabularies),
UBL's signature extension, or, for a standard with no place for one (OFX), beside the
document: the document is queued as rendered, and :meth:`Documents.detached_signature` signs
its exact bytes when it leaves (a delivery's ``cmi-document-signature`` header, a pull
answer's ``signature``).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from lxml import etree

from cmi_sdk._exceptions import CMIError, DocumentValidationError, PluginError, ValidationIssue
from cmi_sdk._standards import (
    DocumentType,
    SignaturePlacement,
    Standard,
    StandardRegistry,
    render_context,
    render_digest,
    render_text,
)
from cmi_sdk._xml import HardenedParser
from cmi_sdk.signing import DETACHED_SIGNATURE_HEADER

if TYPE_CHECKING:
    from pydantic import BaseModel

    from cmi_sdk._models import SharingTerms
    from cmi_sdk.signing import DocumentSigner

__all__ = ["DETACHED_SIGNATURE_HEADER", "Documents", "TermsDocument"]

log = logging.getLogger("cmi_sdk.documents")


# UBL 2.x's signature extension (UBL-CommonSignatureComponents-2.4.xsd and neighbours).
_EXT = "urn:oasis:names:specification:ubl:schema:xsd:CommonExtensionComponents-2"
_SIG = "urn:oasis:names:specification:ubl:schema:xsd:CommonSignatureComponents-2"
_SAC = "urn:oasis:names:specification:ubl:schema:xsd:SignatureAggregateComponents-2"
_SBC = "urn:oasis:names:specification:ubl:schema:xsd:SignatureBasicComponents-2"
_CAC = "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2"
_CBC = "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2"
# The UBL signature profile's method for an enveloped XML-DSig without XAdES properties.
UBL_SIGNATURE_METHOD = "urn:oasis:names:specification:ubl:dsig:enveloped"
_UBL_SIGNATURE_END = b"</sac:SignatureInformation>"


class TermsDocument(NamedTuple):
    """A document made for one set of sharing terms.

    :ivar xml: the document as validated, with what the terms do not allow withheld,
        before signing (what a message id is derived from).
    :ivar body: what goes out: ``xml`` signed, or ``xml`` itself without a signer.
    :ivar withheld: the names of the fields withheld.
    """

    xml: bytes
    body: bytes
    withheld: tuple[str, ...]


class Documents:
    """Render, validate, minimize and sign documents of the registered standards.

    :param standards: the standards documents are named from; empty by default, for
        callers that pass :class:`~cmi_sdk.Standard` objects themselves.
    :param parser: parses the SDK's own output for validation (trusted as to size and
        depth, so its plain lxml parser); a default :class:`~cmi_sdk.HardenedParser`
        when not given.
    :param signer: signs what :meth:`render_signed`, :meth:`for_terms` and
        :meth:`sign` return; without one, documents stay unsigned (logged once).
    """

    def __init__(
        self,
        *,
        standards: StandardRegistry | None = None,
        parser: HardenedParser | None = None,
        signer: DocumentSigner | None = None,
    ) -> None:
        self.standards = standards if standards is not None else StandardRegistry()
        """The standards looked up by name."""
        self.parser = parser if parser is not None else HardenedParser()
        """The parser of the rendered text."""
        self.signer = signer
        """What signs documents, if anything."""
        self._warned_unsigned = False

    # -- one document ---------------------------------------------------------------------

    def render(
        self,
        model: BaseModel,
        *,
        standard: str | Standard,
        document_type: str | None = None,
        validate: bool = True,
    ) -> bytes:
        """``model`` as a document of ``standard``, in UTF-8, validated unless told not to;
        unsigned.

        :raises NotFoundError: no such standard or document type.
        :raises MappingError: the document type cannot express this model.
        :raises RenderError: a value holds a character XML 1.0 cannot carry.
        :raises DocumentValidationError: the result breaks the schema (a plugin bug).
        """
        std, doc_type = self._resolve(standard, document_type)
        xml = render_text(std, doc_type, model).encode()
        if validate:
            self.check(self._root(xml, doc_type), xml, standard=std, document_type=doc_type)
        return xml

    def render_signed(
        self, model: BaseModel, *, standard: str | Standard, document_type: str | None = None
    ) -> bytes:
        """:meth:`render`, always validated, then signed where the document type's signature
        goes (a detached type comes back as rendered: sign it with
        :meth:`detached_signature`).

        :raises: as :meth:`render`.
        """
        std, doc_type = self._resolve(standard, document_type)
        xml = render_text(std, doc_type, model).encode()
        root = self._root(xml, doc_type)
        self.check(root, xml, standard=std, document_type=doc_type)
        return self.sign(xml, root=root, document_type=doc_type)

    def render_context(
        self,
        context: dict[str, Any],
        *,
        standard: str | Standard,
        document_type: str | None = None,
    ) -> bytes:
        """A template context rendered with the document type's template (for helpers
        that build the context themselves, such as a standard's digest), validated;
        unsigned.

        :raises RenderError: a value holds a character XML 1.0 cannot carry.
        :raises DocumentValidationError: the result breaks the schema.
        """
        std, doc_type = self._resolve(standard, document_type)
        xml = render_context(std, doc_type, context).encode()
        self.check(self._root(xml, doc_type), xml, standard=std, document_type=doc_type)
        return xml

    # -- for sharing terms ----------------------------------------------------------------

    def for_terms(
        self,
        model: BaseModel,
        terms: SharingTerms,
        *,
        standard: Standard,
        document_type: DocumentType[Any],
    ) -> TermsDocument:
        """``model`` as ``terms`` allow it to go out: rendered, validated, minimized to the
        terms' fields (validated again when anything was withheld) and signed.

        :raises: as :meth:`render`.
        """
        xml = render_text(standard, document_type, model).encode()
        return self._minimized(xml, terms, standard, document_type)

    def digest_for_terms(
        self,
        models: Sequence[BaseModel],
        terms: SharingTerms,
        *,
        standard: Standard,
        document_type: DocumentType[Any],
    ) -> TermsDocument:
        """Many models as the document type's one digest document (see
        :attr:`DocumentType.digest`), otherwise as :meth:`for_terms`.

        :raises MappingError: the type has no digest form, or cannot put these together.
        """
        xml = render_digest(standard, document_type, models).encode()
        return self._minimized(xml, terms, standard, document_type)

    def _minimized(
        self,
        xml: bytes,
        terms: SharingTerms,
        std: Standard,
        doc_type: DocumentType[Any],
    ) -> TermsDocument:
        root = self._root(xml, doc_type)
        self.check(root, xml, standard=std, document_type=doc_type)
        withheld: tuple[str, ...] = ()
        if terms.fields is not None:
            withheld = doc_type.withhold(root, set(doc_type.fields) - set(terms.fields))
        if withheld:
            xml = etree.tostring(root, xml_declaration=True, encoding="UTF-8") + b"\n"
            self.check(root, xml, standard=std, document_type=doc_type)
            # The tree no longer holds exactly these bytes: the signer parses them itself.
            return TermsDocument(xml, self.sign(xml, document_type=doc_type), withheld)
        return TermsDocument(xml, self.sign(xml, root=root, document_type=doc_type), withheld)

    # -- the steps ------------------------------------------------------------------------

    def check(
        self,
        root: etree._Element,
        xml: bytes,
        *,
        standard: Standard,
        document_type: DocumentType[Any],
    ) -> None:
        """Validate ``root`` (parsed from ``xml``) as a ``document_type`` document: its
        root element, then its schema.

        :raises DocumentValidationError: the root element is another, or the schema is
            broken; ``issues`` say where and why.
        """
        if root.tag != document_type.root:
            # A schema may declare several global elements: valid, but not this type.
            issues = [
                ValidationIssue(
                    f"root element is {root.tag!s}, expected {document_type.root}",
                    "/",
                    root.sourceline,
                )
            ]
        elif document_type.lxml_schema.validate(root):
            return
        else:
            issues = document_type.issues(root.getroottree()) or [ValidationIssue("invalid", "/")]
        raise DocumentValidationError(
            issues, document=xml, standard=standard.name, document_type=document_type.name
        )

    def sign(
        self,
        xml: bytes,
        *,
        root: etree._Element | None = None,
        document_type: DocumentType[Any] | None = None,
    ) -> bytes:
        """``xml`` signed where ``document_type``'s signature goes (the root's last child
        when no type is given), or as it is without a signer.

        A detached type's document comes back as it is: its signature is made over the
        bytes that leave, by :meth:`detached_signature`.

        :param root: the root element parsed from exactly these bytes, if at hand (it may
            be changed: the caller does not use it again).
        """
        placement = (
            SignaturePlacement.ENVELOPED if document_type is None else document_type.signature
        )
        if placement.detached:
            return xml
        signer = self._signer()
        if signer is None:
            return xml
        if placement.kind == "ubl-extension":
            if root is None:
                root = self._root(xml, document_type)
            return self._sign_in_ubl_extension(root, placement)
        return signer.sign(xml, root=root)

    def detached_signature(
        self,
        xml: bytes,
        *,
        standard: str | Standard,
        document_type: str | None = None,
        name: str | None = None,
    ) -> bytes | None:
        """A detached signature over exactly ``xml``, when its document type is signed
        detached and a signer is configured; None otherwise.

        :param name: the document's file name the signature's reference gives (a
            customer's store keeps the document under it); ``document.<extension>`` by
            default.
        :raises NotFoundError: no such standard or document type.
        """
        _std, doc_type = self._resolve(standard, document_type)
        if not doc_type.signature.detached:
            return None
        signer = self._signer()
        if signer is None:
            return None
        return signer.sign_detached(xml, name=name or f"document.{doc_type.extension}")

    def delivery_headers(
        self, xml: bytes, *, standard: str, document_type: str, name: str
    ) -> dict[str, str]:
        """The headers a queued document of ``standard``'s ``document_type`` is delivered
        with: its ``content-type``, and for a detached type its signature in
        :data:`DETACHED_SIGNATURE_HEADER` (base64).

        :param name: the document's name (its message id); the signature names it
            ``<name>.<extension>``, the file a customer's store keeps it in.
        """
        doc_type = self._queued_type(standard, document_type, name)
        if doc_type is None:
            return {"content-type": "application/xml"}
        headers = {"content-type": doc_type.media_type}
        signature = self.signature_beside(
            xml, standard=standard, document_type=document_type, name=name
        )
        if signature is not None:
            headers[DETACHED_SIGNATURE_HEADER] = base64.b64encode(signature).decode("ascii")
        return headers

    def signature_beside(
        self, xml: bytes, *, standard: str, document_type: str, name: str
    ) -> bytes | None:
        """A queued document's detached signature (see :meth:`detached_signature`), naming
        it ``<name>.<extension>``; None when its type is signed inside, or nothing signs."""
        doc_type = self._queued_type(standard, document_type, name)
        if doc_type is None:
            return None
        return self.detached_signature(
            xml, standard=standard, document_type=document_type, name=f"{name}.{doc_type.extension}"
        )

    def _queued_type(
        self, standard: str, document_type: str, name: str
    ) -> DocumentType[Any] | None:
        try:
            return self._resolve(standard, document_type)[1]
        except CMIError:
            # Queued under a standard since uninstalled: it still goes out, as it was queued.
            log.warning("%s: no installed %s %s; sent as XML", name, standard, document_type)
            return None

    def _signer(self) -> DocumentSigner | None:
        signer = self.signer
        if signer is None and not self._warned_unsigned:
            log.warning("no signing key is configured: documents go out unsigned")
            self._warned_unsigned = True
        return signer

    def _sign_in_ubl_extension(self, root: etree._Element, placement: SignaturePlacement) -> bytes:
        """The document with UBL's signature extension first and ``cac:Signature`` in its
        place, both covered by the enveloped signature spliced into the extension."""
        signer = self.signer
        assert signer is not None  # noqa: S101  (sign() checked)
        local = etree.QName(root).localname
        signature_id = f"urn:oasis:names:specification:ubl:signature:{local}"
        position = next(
            (i for i, child in enumerate(root) if etree.QName(child).localname in placement.before),
            None,
        )
        if position is None:
            raise PluginError(
                f"a signed {local} needs one of {', '.join(placement.before)} to place"
                " cac:Signature before"
            )
        # cac:Signature first (its index counts the children as rendered), then the
        # extension, the root's first child; each added where its parent's prefixes are
        # in scope, and indented like its neighbours.
        reference = etree.Element(f"{{{_CAC}}}Signature")
        root.insert(position, reference)
        etree.SubElement(reference, f"{{{_CBC}}}ID").text = signature_id
        etree.SubElement(reference, f"{{{_CBC}}}SignatureMethod").text = UBL_SIGNATURE_METHOD
        extensions = etree.Element(f"{{{_EXT}}}UBLExtensions", nsmap={"ext": _EXT})
        root.insert(0, extensions)
        extension = etree.SubElement(extensions, f"{{{_EXT}}}UBLExtension")
        etree.SubElement(extension, f"{{{_EXT}}}ExtensionURI").text = UBL_SIGNATURE_METHOD
        content = etree.SubElement(extension, f"{{{_EXT}}}ExtensionContent")
        signatures = etree.SubElement(
            content,
            f"{{{_SIG}}}UBLDocumentSignatures",
            nsmap={"sig": _SIG, "sac": _SAC, "sbc": _SBC},
        )
        information = etree.SubElement(signatures, f"{{{_SAC}}}SignatureInformation")
        etree.SubElement(
            information, f"{{{_CBC}}}ID"
        ).text = "urn:oasis:names:specification:ubl:signature:1"
        etree.SubElement(information, f"{{{_SBC}}}ReferencedSignatureID").text = signature_id
        for added in (reference, extensions):
            etree.indent(added, space="  ", level=1)
            added.tail = "\n  "
        # UBL documents have nothing before the root but the declaration, written as the
        # templates write it.
        xml = b'<?xml version="1.0" encoding="UTF-8"?>\n' + etree.tostring(root) + b"\n"
        # Spliced where the enveloped transform takes it out again: the bytes around it are
        # exactly those the digest was computed over.
        end = xml.index(_UBL_SIGNATURE_END)
        return xml[:end] + signer.enveloped_signature(root) + xml[end:]

    def _resolve(
        self, standard: str | Standard, document_type: str | None
    ) -> tuple[Standard, DocumentType[Any]]:
        if isinstance(standard, Standard):
            return standard, standard.document_type(document_type)
        return self.standards.resolve(standard, document_type)

    def _root(self, xml: bytes, document_type: DocumentType[Any] | None = None) -> etree._Element:
        if document_type is not None and document_type.reader is not None:
            return document_type.reader(xml)
        # Our own output: trusted as to size and depth, so the plain fast parse.
        return etree.fromstring(xml, self.parser.lxml_parser())
