"""IMAP and POP3 proxy appliance that adds TLS toward mail servers."""

__version__ = "0.1.0"
