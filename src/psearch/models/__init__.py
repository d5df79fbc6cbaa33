"""Networks of the paper (joint net, IDNet), identity losses, model files (see docs/models.md)."""
