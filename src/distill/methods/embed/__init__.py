"""Methods of the embedding family (sentence encoders)."""
