"""postbridge: reach on-premise mail servers from the cloud through an outbound connector."""

__version__ = "0.1.0"
