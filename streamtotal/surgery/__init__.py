"""scArches-style reference mapping (architecture surgery) of totalVI / totalANVI runs onto query data."""
