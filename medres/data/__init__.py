"""Manifests, splits and leakage audit, datasets and transforms, synthetic phantoms."""
