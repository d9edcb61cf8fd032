"""The Ray layer: starting Ray and running fluxir's pure-torch recipes on it."""
