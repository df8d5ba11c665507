"""Standards and their document types, and the registry plugins add them to.

A :class:`Standard` is a named, versioned XML vocabulary. Each of its :class:`DocumentType`
objects ties together a root element, an XSD, a jinja2 template, a mapping from a canonical
model to the template's variables, and a parser from the XML back to the model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import as_file
from importlib.resources.abc import Traversable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar

import jinja2
from lxml import etree
from pydantic import BaseModel, ValidationError

from cmi_sdk._exceptions import (
    DocumentTypeNotFoundError,
    DocumentValidationError,
    MappingError,
    ModelValidationError,
    PluginError,
    RenderError,
    StandardNotFoundError,
    ValidationIssue,
)
from cmi_sdk._xml import find_xml_illegal, load_lxml_schema

if TYPE_CHECKING:
    import xmlschema

__all__ = ["DocumentType", "SignaturePlacement", "Standard", "StandardRegistry"]

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class SignaturePlacement:
    """Where a document type's XML-DSig signature goes, so that what a customer's store
    receives is what the standard's own tools accept.

    Use one of the three placements:

    - :attr:`ENVELOPED`: the root's last child, for a vocabulary whose schema has room for
      it there (the SDK's own ``cmi`` and ``cmi-ticket``);
    - :meth:`ubl_extension`: UBL 2.x's place for signatures,
      ``ext:UBLExtensions/ext:UBLExtension/ext:ExtensionContent/sig:UBLDocumentSignatures/
      sac:SignatureInformation/ds:Signature``, with a ``cac:Signature`` in the document
      referring to it (the UBL signature profile);
    - :attr:`DETACHED`: beside the document, for a standard with no place for one (OFX): the
      document goes out byte for byte as rendered and a detached signature over its exact
      bytes travels with it (a delivery header, a field of a pull answer, a file beside it
      in the customer's store).

    :ivar kind: ``enveloped``, ``ubl-extension`` or ``detached``.
    :ivar before: for ``ubl-extension``, the local names of the root's children that
        ``cac:Signature`` goes before (the first one present), in the schema's order.
    """

    kind: Literal["enveloped", "ubl-extension", "detached"]
    before: tuple[str, ...] = ()

    ENVELOPED: ClassVar[SignaturePlacement]
    """The root's last child."""
    DETACHED: ClassVar[SignaturePlacement]
    """A signature beside the document, over its exact bytes."""

    @classmethod
    def ubl_extension(cls, *before: str) -> SignaturePlacement:
        """UBL's signature extension, with ``cac:Signature`` before the first of the root's
        children named ``before`` (local names, such as ``AccountingSupplierParty``)."""
        if not before:
            raise PluginError("a UBL signature placement names what cac:Signature precedes")
        return cls("ubl-extension", tuple(before))

    @property
    def detached(self) -> bool:
        """Whether the signature travels beside the document."""
        return self.kind == "detached"


SignaturePlacement.ENVELOPED = SignaturePlacement("enveloped")
SignaturePlacement.DETACHED = SignaturePlacement("detached")


@dataclass(frozen=True, eq=False)
class DocumentType(Generic[M]):
    """One kind of document a standard defines.

    :param name: the document type's name within its standard, such as ``ticket``.
    :param root: the root element in Clark notation, ``{namespace}local``.
    :param model: the canonical model the document expresses.
    :param schema: the XSD that every document of this type must satisfy.
    :param template: the jinja2 template's file name in the standard's ``templates``.
    :param to_context: the mapping: a model to the template's variables. It raises
        :class:`~cmi_sdk.MappingError` for a model the document type cannot express.
    :param from_xml: the parser back: a validated root element to the model.
    :param description: one line for ``cmi standards`` and the docs.
    :param fields: what sharing terms can withhold: a field name (the canonical model's,
        such as ``seat`` or ``total``) to the XPaths, relative to the root with the prefix
        ``d`` for the document's namespace, of the elements or attributes that carry it.
        Every one of them must be optional in the XSD, and the root element must admit an
        optional ``withheld`` attribute (a list of field names), so that a minimized
        document stays valid and says what was withheld.
    :param kept: the fields every document of the type carries, whatever the terms say
        (its identity: ids, time, parties); terms may name them, but they are never removed.
    :param digest: the mapping for many models at once, when the type has a digest form (an
        OFX statement of many lines): rendered with the same template, validated by the
        same XSD. Digest terms then get one document a window instead of one a model.
    :param render: a hand-written renderer, for a document type rendered on a latency path
        (an answer to a request is rendered once per request, and a jinja2 template costs
        several times what the rest of the answer does). When it is set, :func:`render_text`
        calls it instead of the template; what follows rendering still applies (characters
        XML cannot carry are refused, naming the field; a bare CR is kept as ``&#13;``).
        It must return exactly the text the template renders from ``to_context(model)``,
        byte for byte, for every valid model: the template stays the reference that
        documents the output (digests and ``render_context`` still use it), and the
        plugin's tests must prove the two identical.
    :param kinds: for a document type made from transactions, the transaction kinds
        (``flight``, ``bank_statement_line``, ``loan``, ``purchase``) it can express; None
        (the default) for every kind. The SDK emits a transaction under a customer's terms
        only when their document type expresses its kind (the others are skipped and
        logged), and refuses terms whose document type expresses none of the kinds the
        firm emits. A mapping may still raise :class:`~cmi_sdk.MappingError` for one
        transaction it cannot carry: that is recorded for the operator, never raised to
        the firm or the customer.
    :param signature: where the type's signature goes (see :class:`SignaturePlacement`):
        the root's last child by default.
    :param media_type: the ``Content-Type`` the document is delivered with.
    :param extension: the file name extension a customer's store keeps it under.
    :param reader: for a document type that is not XML (OFX 1's SGML), what reads its
        bytes into an element tree, hardened as the SDK's XML parser is (a byte cap, no
        declarations, a depth limit): validation and parsing go through it. None (the
        default): XML, read by the hardened XML parser.
    :param magic: for such a type, the bytes its documents start with (``OFXHEADER:``),
        which tell it apart from XML when no document type is named.
    """

    name: str
    root: str
    model: type[M]
    schema: Traversable
    template: str
    to_context: Callable[[M], dict[str, Any]]
    from_xml: Callable[[etree._Element], M]
    description: str = ""
    fields: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    kept: tuple[str, ...] = ()
    digest: Callable[[Sequence[M]], dict[str, Any]] | None = None
    render: Callable[[M], str] | None = None
    kinds: tuple[str, ...] | None = None
    signature: SignaturePlacement = SignaturePlacement.ENVELOPED
    media_type: str = "application/xml"
    extension: str = "xml"
    reader: Callable[[bytes], etree._Element] | None = None
    magic: bytes | None = None
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def namespace(self) -> str:
        """The root element's namespace URI ('' when it has none)."""
        return self.root[1:].split("}", 1)[0] if self.root.startswith("{") else ""

    def _cached(self, key: str, build: Callable[[], Any]) -> Any:
        value = self._cache.get(key)
        if value is None:
            with self._lock:
                value = self._cache.get(key)
                if value is None:
                    value = self._cache[key] = build()
        return value

    @property
    def lxml_schema(self) -> etree.XMLSchema:
        """The XSD compiled by lxml: the fast validation path, compiled once."""
        schema: etree.XMLSchema = self._cached("lxml", lambda: load_lxml_schema(self.schema))
        return schema

    @property
    def xmlschema_schema(self) -> xmlschema.XMLSchema:
        """The same XSD loaded by xmlschema, which explains failures; loaded on first use."""

        def build() -> xmlschema.XMLSchema:
            import xmlschema  # noqa: PLC0415  (33 MiB: imported only when a document fails)

            with as_file(self.schema) as path:
                return xmlschema.XMLSchema(str(path), allow="local", defuse="always")

        schema: xmlschema.XMLSchema = self._cached("xmlschema", build)
        return schema

    @property
    def field_names(self) -> frozenset[str]:
        """Every field name sharing terms may list for this type: withholdable or kept."""
        names: frozenset[str] = self._cached(
            "field_names", lambda: frozenset(self.fields) | frozenset(self.kept)
        )
        return names

    def _field_paths(self) -> dict[str, tuple[etree.XPath, ...]]:
        def build() -> dict[str, tuple[etree.XPath, ...]]:
            ns = {"d": self.namespace} if self.namespace else None
            return {
                name: tuple(etree.XPath(p, namespaces=ns) for p in paths)
                for name, paths in self.fields.items()
            }

        paths: dict[str, tuple[etree.XPath, ...]] = self._cached("field_paths", build)
        return paths

    def expresses(self, kind: str) -> bool:
        """Whether documents of this type can express a transaction of ``kind``."""
        return self.kinds is None or kind in self.kinds

    def withhold(self, root: etree._Element, names: Iterable[str]) -> tuple[str, ...]:
        """Remove the fields ``names`` from the tree under ``root``, in place, and record
        them in the root's ``withheld`` attribute; return the names withheld, sorted.

        :raises MappingError: a name is not one of :attr:`fields`.
        """
        paths = self._field_paths()
        withheld = tuple(sorted(set(names)))
        for name in withheld:
            if name not in paths:
                raise MappingError(f"a {self.name} document cannot withhold {name!r}")
            for xpath in paths[name]:
                found = xpath(root)
                for node in found if isinstance(found, list) else ():
                    if isinstance(node, etree._Element):
                        parent = node.getparent()
                        if parent is not None:
                            parent.remove(node)  # lxml takes the tail along: layout stays
                    elif isinstance(node, etree._ElementUnicodeResult) and node.is_attribute:
                        owner = node.getparent()
                        if owner is not None and node.attrname is not None:
                            owner.attrib.pop(node.attrname, None)
        if withheld:
            root.set("withheld", " ".join(withheld))
        return withheld

    def issues(self, tree: etree._ElementTree) -> list[ValidationIssue]:
        """Explain why ``tree`` fails the schema: reason, path and line for each error."""
        issues = [
            ValidationIssue(
                reason=str(err.reason or err.message),
                path=err.path or "/",
                line=err.sourceline if isinstance(err.sourceline, int) else None,
            )
            for err in self.xmlschema_schema.iter_errors(tree)  # type: ignore[arg-type]
        ]
        if not issues:
            # Both libraries read the same XSD; if xmlschema sees no fault, lxml's own log is
            # still a located explanation.
            schema = self.lxml_schema
            schema.validate(tree)
            issues = [
                ValidationIssue(reason=e.message, path=e.path or "/", line=e.line or None)
                for e in schema.error_log
            ]
        return issues


@dataclass(frozen=True, eq=False)
class Standard:
    """A named, versioned XML vocabulary, provided by a plugin.

    :param name: the name users select it by, such as ``cmi-ticket``.
    :param version: the standard's version, such as ``1.0``.
    :param templates: the folder holding the document types' jinja2 templates.
    :param document_types: what the standard can render and parse.
    :param title: a human-readable title.
    :param description: a paragraph for ``cmi standards`` and the docs.
    :param default_document_type: the type chosen when none is named (a standard that
        gained a second form of its one document, as OFX 1 beside OFX 2); without it, a
        standard of several types needs the type named.
    """

    name: str
    version: str
    templates: Traversable
    document_types: tuple[DocumentType[Any], ...]
    title: str = ""
    description: str = ""
    default_document_type: str | None = None
    _env: dict[str, jinja2.Environment] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.document_types:
            raise PluginError(f"standard {self.name!r} has no document types", plugin=self.name)
        names = [d.name for d in self.document_types]
        if len(set(names)) != len(names):
            raise PluginError(f"standard {self.name!r} repeats a document type name")
        if self.default_document_type is not None and self.default_document_type not in names:
            raise PluginError(
                f"standard {self.name!r} has no document type {self.default_document_type!r}"
                " to default to"
            )

    def document_type(self, name: str | None = None) -> DocumentType[Any]:
        """Return the document type called ``name``; with no name, the only one there is.

        :raises DocumentTypeNotFoundError: no such type, or several and no name was given.
        """
        if name is None:
            if len(self.document_types) == 1:
                return self.document_types[0]
            if self.default_document_type is not None:
                return self.document_type(self.default_document_type)
            raise DocumentTypeNotFoundError(
                f"standard {self.name!r} has several document types; choose one of "
                f"{', '.join(d.name for d in self.document_types)}"
            )
        for doc_type in self.document_types:
            if doc_type.name == name:
                return doc_type
        raise DocumentTypeNotFoundError(
            f"standard {self.name!r} has no document type {name!r}; it has "
            f"{', '.join(d.name for d in self.document_types)}"
        )

    def environment(self) -> jinja2.Environment:
        """The standard's jinja2 environment: XML autoescaping, undefined names are errors."""
        env = self._env.get("env")
        if env is None:
            templates = self.templates

            def load(name: str) -> str:
                return (templates / name).read_text(encoding="utf-8")

            env = jinja2.Environment(
                loader=jinja2.FunctionLoader(load),
                autoescape=True,
                undefined=jinja2.StrictUndefined,
                trim_blocks=True,
                lstrip_blocks=True,
                keep_trailing_newline=True,
                auto_reload=False,
            )
            self._env["env"] = env
        return env

    def template(self, doc_type: DocumentType[Any]) -> jinja2.Template:
        """The compiled template of ``doc_type``."""
        template: jinja2.Template = doc_type._cached(
            "template", lambda: self.environment().get_template(doc_type.template)
        )
        return template


class StandardRegistry:
    """The standards an adapter knows, filled by the ``cmi_register_standards`` hook.

    Plugins receive it as ``register`` and call :meth:`add`.
    """

    def __init__(self) -> None:
        self._by_name: dict[str, Standard] = {}
        self._by_root: dict[str, tuple[Standard, DocumentType[Any]]] = {}

    def add(self, standard: Standard) -> None:
        """Register ``standard``.

        :raises PluginError: the name, or one of its root elements, is already taken.
        """
        if not isinstance(standard, Standard):
            raise PluginError(f"register.add() takes a Standard, not {type(standard).__name__}")
        if standard.name in self._by_name:
            raise PluginError(
                f"two plugins register a standard named {standard.name!r}", plugin=standard.name
            )
        for doc_type in standard.document_types:
            if doc_type.reader is not None:
                continue  # not XML: never found by an XML root element
            taken = self._by_root.get(doc_type.root)
            if taken is not None:
                raise PluginError(
                    f"root element {doc_type.root} of {standard.name!r} is already used by "
                    f"{taken[0].name!r}",
                    plugin=standard.name,
                )
        self._by_name[standard.name] = standard
        for doc_type in standard.document_types:
            if doc_type.reader is None:
                self._by_root[doc_type.root] = (standard, doc_type)

    def describe(self) -> list[dict[str, Any]]:
        """The standards and their document types as JSON-ready data (for ``cmi standards
        --json`` and ``/.well-known/cmi``): names, versions, roots, models, and the fields
        sharing terms can withhold or that are always kept, and the transaction kinds a
        type expresses (None: every kind)."""
        return [
            {
                "name": std.name,
                "version": std.version,
                "title": std.title,
                "document_types": [
                    {
                        "name": d.name,
                        "root": d.root,
                        "model": d.model.__name__,
                        "description": d.description,
                        "fields": sorted(d.fields),
                        "kept": list(d.kept),
                        "kinds": None if d.kinds is None else list(d.kinds),
                        "signature": d.signature.kind,
                        "media_type": d.media_type,
                    }
                    for d in std.document_types
                ],
            }
            for std in self
        ]

    def __iter__(self) -> Iterator[Standard]:
        return iter(sorted(self._by_name.values(), key=lambda s: s.name))

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str) -> Standard:
        """Return the standard called ``name``.

        :raises StandardNotFoundError: no plugin registered it.
        """
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise StandardNotFoundError(
                f"no standard named {name!r} is installed (installed: {known})"
            ) from None

    def for_root(self, root: str) -> tuple[Standard, DocumentType[Any]]:
        """Find the standard and document type whose root element is ``root`` (Clark form).

        :raises DocumentTypeNotFoundError: no registered document type has that root.
        """
        try:
            return self._by_root[root]
        except KeyError:
            raise DocumentTypeNotFoundError(
                f"no installed standard has a document whose root element is {root}"
            ) from None

    def for_magic(self, data: bytes) -> tuple[Standard, DocumentType[Any]] | None:
        """The document type that is not XML whose documents start like ``data``, if any."""
        head = data.lstrip()[:64]
        for std in self:
            for doc_type in std.document_types:
                if doc_type.magic is not None and head.startswith(doc_type.magic):
                    return std, doc_type
        return None

    def resolve(
        self, standard: str, document_type: str | None = None
    ) -> tuple[Standard, DocumentType[Any]]:
        """Return the standard called ``standard`` and its document type ``document_type``."""
        std = self.get(standard)
        return std, std.document_type(document_type)


def render_text(standard: Standard, doc_type: DocumentType[M], model: M) -> str:
    """Render ``model`` with ``doc_type``'s renderer, or its template when it has none;
    refuse text XML cannot carry."""
    if not isinstance(model, doc_type.model):
        raise MappingError(
            f"{standard.name} {doc_type.name} documents are made from a "
            f"{doc_type.model.__name__}, not a {type(model).__name__}"
        )
    if doc_type.render is not None:
        # The mapping is only needed to name the field of a character XML cannot carry.
        return _checked(doc_type.render(model), lambda: doc_type.to_context(model))
    return render_context(standard, doc_type, doc_type.to_context(model))


def render_digest(standard: Standard, doc_type: DocumentType[M], models: Sequence[M]) -> str:
    """Render many models as one digest document of ``doc_type`` (see its ``digest``).

    :raises MappingError: the type has no digest form, or cannot put these together.
    """
    if doc_type.digest is None:
        raise MappingError(f"{standard.name} {doc_type.name} documents have no digest form")
    return render_context(standard, doc_type, doc_type.digest(models))


def render_context(standard: Standard, doc_type: DocumentType[Any], context: dict[str, Any]) -> str:
    """Render a template context of ``doc_type`` with its template (never its ``render``);
    refuse text XML cannot carry."""
    return _checked(_render_template(standard, doc_type, context), lambda: context)


def _render_template(
    standard: Standard, doc_type: DocumentType[Any], context: dict[str, Any]
) -> str:
    template = standard.template(doc_type)
    # A shared context uses the mapping as it is instead of copying it under the globals:
    # a third of jinja2's cost for a document this size.
    return "".join(template.root_render_func(template.new_context(context, shared=True)))


def _checked(text: str, context: Callable[[], Mapping[str, Any]]) -> str:
    """``text`` as a document may carry it: refuse characters XML 1.0 cannot carry, naming
    the field of ``context`` (built only then) that holds one; keep a bare CR."""
    bad = find_xml_illegal(text)
    if bad is not None:
        char = bad.group()
        holder = next(
            (key for key, value in _flatten(context()) if isinstance(value, str) and char in value),
            None,
        )
        where = f" in {holder}" if holder else ""
        raise RenderError(
            f"U+{ord(char):04X}{where} cannot be carried by XML 1.0, even escaped",
            field=holder,
            character=char,
        )
    # A bare CR would come back as LF (XML normalizes line ends); a reference keeps it.
    if "\r" in text:
        text = text.replace("\r", "&#13;")
    return text


def _flatten(value: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _flatten(item, f"{prefix}[{index}]")
    else:
        yield prefix, value


def parse_model(
    standard: Standard, doc_type: DocumentType[M], tree: etree._ElementTree, document: bytes
) -> M:
    """Turn a schema-valid tree into the canonical model, reporting model rules the XSD
    cannot express (such as a currency's minor units) as validation issues."""
    root = tree.getroot()
    try:
        return doc_type.from_xml(root)
    except (ValidationError, ModelValidationError, MappingError) as exc:
        if isinstance(exc, MappingError):
            issues = [ValidationIssue(str(exc), "/", root.sourceline)]
        elif isinstance(exc, ValidationError):
            issues = [
                _in_document(
                    doc_type,
                    root,
                    err["msg"].removeprefix("Value error, "),
                    ".".join(str(p) for p in err["loc"]) or "/",
                )
                for err in exc.errors(include_url=False)
            ]
        else:
            issues = [_in_document(doc_type, root, i.reason, i.path) for i in exc.issues]
        raise DocumentValidationError(
            issues, document=document, standard=standard.name, document_type=doc_type.name
        ) from None


def _in_document(
    doc_type: DocumentType[Any], root: etree._Element, reason: str, field: str
) -> ValidationIssue:
    """An issue the model found in ``field`` (``total``, ``total.amount``), placed where
    the reader of the document can find it: the element that carries the field (its path
    and line, from the document type's ``fields``; for an amount, the value after its
    currency), else the root."""
    namespaces = {"d": root.nsmap[None]} if root.nsmap.get(None) else {}
    elements: list[etree._Element] = []
    for xpath in doc_type.fields.get(field.split(".", maxsplit=1)[0], ()):
        try:
            found = root.xpath(xpath, namespaces=namespaces)
        except etree.XPathError:
            continue
        if isinstance(found, list):
            elements += [e for e in found if isinstance(e, etree._Element)]
    if not elements:
        return ValidationIssue(reason, field, root.sourceline)
    element = elements[-1]
    steps = [etree.QName(e).localname for e in (*reversed(list(element.iterancestors())), element)]
    return ValidationIssue(f"{reason} ({field})", "/" + "/".join(steps), element.sourceline)
