"""The façade: one :class:`Adapter` owns its plugin manager, its standards and its parser."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pluggy
from lxml import etree
from pydantic import BaseModel

from cmi_sdk import hookspecs
from cmi_sdk._exceptions import (
    DocumentTypeNotFoundError,
    DocumentValidationError,
    PluginError,
    ValidationIssue,
)
from cmi_sdk._standards import (
    DocumentType,
    Standard,
    StandardRegistry,
    parse_model,
    render_text,
)
from cmi_sdk._xml import DEFAULT_MAX_BYTES, DEFAULT_MAX_DEPTH, HardenedParser

__all__ = ["DEFAULT_PLUGINS", "Adapter", "ValidatedDocument"]

log = logging.getLogger("cmi_sdk")

DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (("cmi", "cmi_core.plugin"),)
"""The plugins every adapter registers first, as (name, module) pairs. They are ordinary
plugins: a user can block them by name, and any plugin registered later overrides them."""


@dataclass(frozen=True, slots=True)
class ValidatedDocument:
    """A document that passed its schema.

    :ivar standard: the standard it belongs to.
    :ivar document_type: its document type.
    :ivar tree: the parsed tree (parse it again only if you need a fresh copy).
    :ivar xml: the bytes that were validated.
    """

    standard: Standard
    document_type: DocumentType[Any]
    tree: etree._ElementTree
    xml: bytes

    def to_model(self) -> BaseModel:
        """The document's canonical model.

        :raises DocumentValidationError: for rules the XSD cannot express, such as an amount
            finer than its currency allows.
        """
        model: BaseModel = parse_model(self.standard, self.document_type, self.tree, self.xml)
        return model


class Adapter:
    """The firm's side of customer-managed interactions: one per process is typical.

    :param plugins: extra plugin objects (modules, classes or instances with hook
        implementations), registered after the default and entry-point plugins so that
        theirs win.
    :param entry_points: load the plugins installed under the ``cmi_sdk`` entry-point group.
    :param block: names of plugins never to register (default or entry-point ones).
    :param max_document_bytes: the cap on incoming documents.
    :param max_depth: the nesting limit for incoming documents.
    :raises PluginError: a plugin failed to load, implements an unknown ``cmi_`` hook, or
        registers a standard that clashes with another.
    """

    def __init__(
        self,
        *,
        plugins: Iterable[object] = (),
        entry_points: bool = True,
        block: Iterable[str] = (),
        max_document_bytes: int = DEFAULT_MAX_BYTES,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        for name in block:
            self._pm.set_blocked(name)
        for name, module in DEFAULT_PLUGINS:
            if not self._pm.is_blocked(name):
                self._register(_import(name, module), name)
        if entry_points:
            try:
                self._pm.load_setuptools_entrypoints(hookspecs.PROJECT_NAME)
            except Exception as exc:
                raise PluginError(f"an entry-point plugin failed to load: {exc}") from exc
        for plugin in plugins:
            self._register(plugin, None)
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(str(exc), plugin=self._pm.get_name(exc.plugin)) from exc
        self.parser = HardenedParser(max_bytes=max_document_bytes, max_depth=max_depth)
        """The hardened parser for every incoming document."""
        self.standards = StandardRegistry()
        """The standards the plugins registered."""
        self._pm.hook.cmi_register_standards(register=self.standards)

    def _register(self, plugin: object, name: str | None) -> None:
        try:
            self._pm.register(plugin, name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(f"cannot register plugin {name or plugin!r}: {exc}") from exc

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        """The adapter's own pluggy plugin manager (for inspection and tests)."""
        return self._pm

    def plugin_names(self) -> list[str]:
        """The names of the registered plugins, in registration order."""
        return [name for name, _ in self._pm.list_name_plugin()]

    # -- documents -----------------------------------------------------------------------

    def render(
        self,
        model: BaseModel,
        *,
        standard: str,
        document_type: str | None = None,
        validate: bool = True,
    ) -> bytes:
        """Render ``model`` as a document of ``standard`` and return its UTF-8 bytes.

        :param model: a canonical model: Transaction, Request, Offer or Acceptance.
        :param standard: the standard's name, such as ``cmi-ticket``.
        :param document_type: required when the standard has several document types.
        :param validate: check the result against the document type's XSD (the default).
        :raises StandardNotFoundError: no such standard.
        :raises DocumentTypeNotFoundError: no such document type.
        :raises MappingError: the document type cannot express this model.
        :raises RenderError: a value holds a character XML 1.0 cannot carry.
        :raises DocumentValidationError: the result breaks the schema (a plugin bug).
        """
        std, doc_type = self.standards.resolve(standard, document_type)
        xml = render_text(std, doc_type, model).encode("utf-8")
        if validate:
            # Our own output: trusted as to size and depth, so the plain fast parse.
            root = etree.fromstring(xml, self.parser.lxml_parser())
            self._check(std, doc_type, root, xml)
        return xml

    def validate(
        self,
        xml: bytes,
        *,
        standard: str | None = None,
        document_type: str | None = None,
    ) -> ValidatedDocument:
        """Parse ``xml`` with the hardened parser and validate it against its schema.

        With no ``standard``, the document type is found from the root element.

        :raises XMLInputError: the bytes were refused before validation (too large,
            malformed, a DTD, too deep).
        :raises NotFoundError: no installed standard knows this document.
        :raises DocumentValidationError: the document breaks the schema; ``issues`` says
            where and why.
        """
        tree = self.parser.parse(xml)
        std, doc_type = self._identify(tree, standard, document_type)
        self._check(std, doc_type, tree.getroot(), xml)
        return ValidatedDocument(std, doc_type, tree, xml)

    def parse(
        self,
        xml: bytes,
        *,
        standard: str | None = None,
        document_type: str | None = None,
    ) -> BaseModel:
        """Validate ``xml`` (see :meth:`validate`) and return its canonical model.

        :raises DocumentValidationError: also for rules the XSD cannot express, such as an
            amount finer than its currency allows.
        """
        return self.validate(xml, standard=standard, document_type=document_type).to_model()

    def _identify(
        self, tree: etree._ElementTree, standard: str | None, document_type: str | None
    ) -> tuple[Standard, DocumentType[Any]]:
        root = str(tree.getroot().tag)
        if standard is None:
            std, doc_type = self.standards.for_root(root)
            if document_type is not None and document_type != doc_type.name:
                raise DocumentTypeNotFoundError(
                    f"the document is a {std.name} {doc_type.name}, not a {document_type}"
                )
            return std, doc_type
        std = self.standards.get(standard)
        if document_type is not None:
            doc_type = std.document_type(document_type)
        else:
            found = [d for d in std.document_types if d.root == root]
            if not found:
                raise DocumentTypeNotFoundError(
                    f"standard {std.name!r} has no document whose root element is {root}"
                )
            doc_type = found[0]
        return std, doc_type

    @staticmethod
    def _check(
        std: Standard, doc_type: DocumentType[Any], root: etree._Element, xml: bytes
    ) -> None:
        tag = root.tag
        if tag != doc_type.root:
            issue = ValidationIssue(
                f"root element is {tag!s}, expected {doc_type.root}", "/", root.sourceline
            )
            raise DocumentValidationError(
                [issue],
                document=xml,
                standard=std.name,
                document_type=doc_type.name,
            )
        if not doc_type.lxml_schema.validate(root):
            raise DocumentValidationError(
                doc_type.issues(root.getroottree()),
                document=xml,
                standard=std.name,
                document_type=doc_type.name,
            )


def _import(name: str, module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise PluginError(f"default plugin {name!r} ({module}) is missing: {exc}") from exc
