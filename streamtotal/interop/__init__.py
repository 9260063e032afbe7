"""Interoperability with other tools: importing saved scvi-tools TOTALVI / TOTALANVI models as run directories."""

from streamtotal.interop.scvi_import import ScviImportResult, import_scvi_model

__all__ = ["ScviImportResult", "import_scvi_model"]
