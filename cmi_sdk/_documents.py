"""The document pipeline: the one way the SDK makes a document.

Every document the SDK sends (an emitted transaction, a digest, a consent record, an
answer to a request, an offer, a standard's own helper's output) goes the same way::

    render (the type's renderer, or its template) ─▶ validate (root element and XSD)
    ─▶ minimize to the fields the terms allow (emission only) ─▶ sign (XML-DSig)

:class:`Documents` is that pipeline; the adapter owns one (``adapter.documents``) and hands
it to the emitter and to the request pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from lxml import etree

from cmi_sdk._exceptions import DocumentValidationError, ValidationIssue
from cmi_sdk._standards import (
    DocumentType,
    Standard,
    StandardRegistry,
    render_context,
    render_digest,
    render_text,
)
from cmi_sdk._xml import HardenedParser

if TYPE_CHECKING:
    from pydantic import BaseModel

    from cmi_sdk._models import SharingTerms
    from cmi_sdk.signing import DocumentSigner

__all__ = ["Documents", "TermsDocument"]

log = logging.getLogger("cmi_sdk.documents")


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
            self.check(self._root(xml), xml, standard=std, document_type=doc_type)
        return xml

    def render_signed(
        self, model: BaseModel, *, standard: str | Standard, document_type: str | None = None
    ) -> bytes:
        """:meth:`render`, always validated, then signed.

        :raises: as :meth:`render`.
        """
        std, doc_type = self._resolve(standard, document_type)
        xml = render_text(std, doc_type, model).encode()
        # Our own output: trusted as to size and depth, so the plain fast parse.
        root = etree.fromstring(xml, self.parser.lxml_parser())
        self.check(root, xml, standard=std, document_type=doc_type)
        return self.sign(xml, root=root)

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
        self.check(self._root(xml), xml, standard=std, document_type=doc_type)
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
        root = etree.fromstring(xml, self.parser.lxml_parser())
        self.check(root, xml, standard=std, document_type=doc_type)
        withheld: tuple[str, ...] = ()
        if terms.fields is not None:
            withheld = doc_type.withhold(root, set(doc_type.fields) - set(terms.fields))
        if withheld:
            xml = etree.tostring(root, xml_declaration=True, encoding="UTF-8") + b"\n"
            self.check(root, xml, standard=std, document_type=doc_type)
            # The tree no longer holds exactly these bytes: the signer parses them itself.
            return TermsDocument(xml, self.sign(xml), withheld)
        return TermsDocument(xml, self.sign(xml, root=root), withheld)

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

    def sign(self, xml: bytes, *, root: etree._Element | None = None) -> bytes:
        """``xml`` signed (see :meth:`DocumentSigner.sign`), or as it is without a signer.

        :param root: the root element parsed from exactly these bytes, if at hand.
        """
        signer = self.signer
        if signer is None:
            if not self._warned_unsigned:
                log.warning("no signing key is configured: documents go out unsigned")
                self._warned_unsigned = True
            return xml
        return signer.sign(xml, root=root)

    def _resolve(
        self, standard: str | Standard, document_type: str | None
    ) -> tuple[Standard, DocumentType[Any]]:
        if isinstance(standard, Standard):
            return standard, standard.document_type(document_type)
        return self.standards.resolve(standard, document_type)

    def _root(self, xml: bytes) -> etree._Element:
        # Our own output: trusted as to size and depth, so the plain fast parse.
        return etree.fromstring(xml, self.parser.lxml_parser())
