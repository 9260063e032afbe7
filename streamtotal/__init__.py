"""streamtotal: out-of-core, streaming, distributed totalVI / totalANVI for atlas-scale CITE-seq."""

__version__ = "0.1.0"
