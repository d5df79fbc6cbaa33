"""Networks of the paper (joint net, IDNet), identity losses, model files (see the README, "Models")."""
