"""Interoperability with other tools: importing saved scvi-tools TOTALVI / TOTALANVI models as run directories, and
exporting trained totalVI runs as scvi-tools TOTALVI model directories."""

from streamtotal.interop.scvi_export import ScviExportResult, export_scvi_model
from streamtotal.interop.scvi_import import ScviImportResult, import_scvi_model

__all__ = ["ScviExportResult", "ScviImportResult", "export_scvi_model", "import_scvi_model"]
