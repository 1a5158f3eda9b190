"""Deployment artefacts: Dockerfile, compose file and the Kubernetes manifests, checked
without a container engine or a cluster."""
