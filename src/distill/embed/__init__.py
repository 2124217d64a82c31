"""The embedding family: sentence encoders, their text, their evaluation."""
