"""qmail-smtpd-py: a drop-in, byte-compatible replacement for qmail-smtpd."""

__version__ = "0.1.0"
