"""Serving a trained model: source change detection, the model registry, promotion and publication."""
