"""Hostile fake mail servers for the security tests (our own Python port of the public EAST test cases).

``servers``: a scripted, TLS-capable fake server on 127.0.0.1 that records every byte it receives, and the checks
that no credential crossed the wire in clear text. ``certs``: server TLS contexts with bad certificates.
"""
