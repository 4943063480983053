"""Stage 1, prepare: corpora to manifests, manifests to the preprocessing cache."""
