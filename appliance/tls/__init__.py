"""TLS: context building, and later the capability probe and the known-servers store."""
