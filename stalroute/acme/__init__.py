"""Certificates from an ACME server (RFC 8555, SPEC §2.13), fleet-wide (SPEC §2.11 roles)."""
