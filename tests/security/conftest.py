"""Security: authenticated and TLS connections, least-privilege permissions, secret hygiene."""
