"""streamtotal: out-of-core, streaming, distributed totalVI / totalANVI for atlas-scale CITE-seq."""

__version__ = "0.1.0"

__all__ = ["TOTALVI", "TOTALANVI", "__version__"]


def __getattr__(name: str):
    # Imported on first use: ``import streamtotal`` (and every CLI start) stays free of torch and the model code.
    if name in ("TOTALVI", "TOTALANVI"):
        from streamtotal import api

        return getattr(api, name)
    raise AttributeError(f"module 'streamtotal' has no attribute {name!r}")
