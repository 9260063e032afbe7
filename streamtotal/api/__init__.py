"""The Python model API: scvi-tools' ``TOTALVI`` / ``TOTALANVI`` calls over streamtotal's engine and run
directories (the CLI and this API are two faces of the same functions)."""

from streamtotal.api.totalanvi_model import TOTALANVI
from streamtotal.api.totalvi_model import TOTALVI

__all__ = ["TOTALVI", "TOTALANVI"]
