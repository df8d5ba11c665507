"""The ``ubl`` standard: OASIS UBL 2.4 RequestForQuotation, Quotation, Order and Invoice.

Register it with an adapter (installed, it is found through the ``cmi_sdk`` entry points)::

    import cmi_ubl.plugin
    from cmi_sdk import Adapter

    adapter = Adapter(plugins=[cmi_ubl.plugin])
    xml = adapter.render(offer, standard="ubl", document_type="Quotation")

To validate against the official OASIS schemas as well as the plugin's profile, point it at
your copy of their ``xsdrt`` folder: ``cmi_ubl.official_schemas(path)``, or set
``CMI_UBL_SCHEMAS``. :func:`read` reads UBL documents from other producers. The mapping is
documented in :mod:`cmi_ubl.plugin`.
"""

from __future__ import annotations

from cmi_ubl.plugin import (
    CUSTOMIZATION_ID,
    OFFICIAL_SCHEMAS_ENV,
    PROFILE_ID,
    STANDARD,
    UblDocumentType,
    official_schemas,
    official_schemas_folder,
    read,
)

__all__ = [
    "CUSTOMIZATION_ID",
    "OFFICIAL_SCHEMAS_ENV",
    "PROFILE_ID",
    "STANDARD",
    "UblDocumentType",
    "official_schemas",
    "official_schemas_folder",
    "read",
]
