"""Kubernetes operator that reconciles ZImageService resources (work in progress)."""
