"""The one document pipeline (:class:`cmi_sdk.Documents`): every path validates alike.

Before it, emission validated with the schema alone while ``Adapter.render`` also checked
the root element; a schema that declares several global elements let an emitted document
of one type go out, signed, as another. These tests hold the merged check on every path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from cmi_sdk import (
    Adapter,
    Documents,
    DocumentType,
    DocumentValidationError,
    Standard,
    Transaction,
    hookimpl,
)
from cmi_sdk.signing import verify_document
from cmi_ticket.plugin import STANDARD as TICKET_STANDARD
from tests.support import emitting_adapter, register, signer, ticket

NS = "urn:test:pair"
# One schema, two global elements: a <wrong/> document is valid against it, and is not a
# "right" document.
XSD = f"""<?xml version="1.0" encoding="UTF-8"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" targetNamespace="{NS}"
           elementFormDefault="qualified">
  <xs:element name="right"><xs:complexType><xs:attribute name="id" type="xs:string"/>
  </xs:complexType></xs:element>
  <xs:element name="wrong"><xs:complexType><xs:attribute name="id" type="xs:string"/>
  </xs:complexType></xs:element>
</xs:schema>
"""


def _context(tx: Transaction) -> dict[str, Any]:
    return {"id": tx.id}


def _from_xml(root: etree._Element) -> Transaction:
    raise AssertionError("not read back in these tests")


def _pair(tmp_path: Path) -> Standard:
    """A standard whose ``right`` type's renderer (a plugin's bug) writes a ``wrong``."""
    (tmp_path / "pair.xsd").write_text(XSD, encoding="utf-8")
    (tmp_path / "right.xml.j2").write_text(f'<right xmlns="{NS}" id="{{{{ id }}}}"></right>\n')
    right: DocumentType[Transaction] = DocumentType(
        name="right",
        root=f"{{{NS}}}right",
        model=Transaction,
        schema=tmp_path / "pair.xsd",
        template="right.xml.j2",
        to_context=_context,
        from_xml=_from_xml,
        render=lambda tx: f'<wrong xmlns="{NS}" id="{tx.id}"></wrong>\n',
    )
    return Standard(name="pair", version="1.0", templates=tmp_path, document_types=(right,))


class _Pair:
    def __init__(self, standard: Standard) -> None:
        self.standard = standard

    @hookimpl
    def cmi_register_standards(self, register: Any) -> None:
        register.add(self.standard)


def test_an_emitted_document_of_another_root_is_a_problem_not_sent(tmp_path: Path) -> None:
    adapter = emitting_adapter(tmp_path, plugins=[_Pair(_pair(tmp_path))])
    register(adapter, standard="pair")
    assert adapter.emit(ticket()) == []
    (problem,) = adapter.store.emission_problems()
    assert "root element is {urn:test:pair}wrong, expected {urn:test:pair}right" in (problem.reason)
    assert adapter.store.rows(limit=10) == []


def test_every_entry_point_checks_the_root_element(tmp_path: Path) -> None:
    std = _pair(tmp_path)
    documents = Documents(signer=signer())
    for make in (documents.render, documents.render_signed):
        with pytest.raises(DocumentValidationError) as info:
            make(ticket(), standard=std)
        assert info.value.issues[0].reason.startswith("root element is")
        assert info.value.document_type == "right"
    wrong = f'<wrong xmlns="{NS}"/>'.encode()
    with pytest.raises(DocumentValidationError, match="root element"):
        documents.check(
            etree.fromstring(wrong), wrong, standard=std, document_type=std.document_type()
        )


def test_the_template_path_renders_the_right_root(tmp_path: Path) -> None:
    std = _pair(tmp_path)
    xml = Documents().render_context({"id": "a-1"}, standard=std, document_type="right")
    assert xml == f'<right xmlns="{NS}" id="a-1"></right>\n'.encode()


def test_a_pipeline_of_its_own_makes_the_adapters_bytes() -> None:
    adapter = Adapter(signer=signer())
    documents = Documents(standards=adapter.standards, signer=signer())
    unsigned = documents.render(ticket(), standard="cmi-ticket")
    assert unsigned == adapter.render(ticket(), standard="cmi-ticket")
    # Given the Standard itself, no registry is needed.
    assert Documents().render(ticket(), standard=TICKET_STANDARD) == unsigned
    signed = documents.render_signed(ticket(), standard="cmi-ticket")
    vouched = verify_document(signed, signer().certificate)
    assert vouched == verify_document(adapter.documents.sign(unsigned), signer().certificate)
    assert Documents().sign(unsigned) == unsigned  # no signer: as it is
