"""What a session needs from control/ and its start-up environment.

control.py reads the files and variables into one Config, once per
connection, before the greeting; the core only ever sees this object.
"""

from .requests import Value

DEFAULT_MAX_LINE = 1 << 16

# SMTPLOGLEVEL: what goes to the log.  Errors are always logged; the default
# adds one line per connection event (connect, accept, each refusal, AUTH,
# TLS, close); 2 adds every command (AUTH arguments hidden), 3 every reply.
LOG_ERRORS, LOG_EVENTS, LOG_COMMANDS, LOG_REPLIES = 0, 1, 2, 3


class Config(Value):
    """One connection's configuration (frozen)."""

    __slots__ = (
        "greeting",            # bytes, used verbatim in 220/250/221
        "localiphost",         # bytes, or None: the rewrite is off
        "timeout",             # seconds for each read and write
        "rcpthosts",           # set of lower-cased domains, or None: accept all
        "morercpthosts",       # control/morercpthosts.cdb exists (looked up by request)
        "badmailfrom",         # set of lower-cased entries, or None
        "databytes",           # 0 = unlimited
        "max_line",            # longest command line accepted
        "plugins",             # qmail-spp entries per section letter; None = off
        "plugin_time_limit",   # SPPTIMEOUT seconds, or None
        "program_time_limit",  # SMTPEXTFORKTIMEOUT seconds, or None
        "auth_mode",           # auth.* mode; None = plain notqmail, no AUTH patch
        "checkpassword",       # argv of the checkpassword program
        "auth_hostname",       # CRAM-MD5 challenge host (the old 3-argument form)
        "tls",                 # control/servercert.pem exists: offer STARTTLS
        "smtps",               # SMTPS set: TLS from the first byte
        "force_tls",           # FORCETLS: no AUTH before TLS
        "require_tls",         # TLSREQUIRED: no MAIL before TLS
        "tls_ciphers",         # TLSCIPHERS or control/tlsserverciphers, or None
        "tls_clients",         # control/tlsclients addresses (with clientca.pem), or None
        "smtputf8",            # SMTPUTF8: offer RFC 6531 (off: netqmail's EHLO)
        "log_level",           # SMTPLOGLEVEL: LOG_ERRORS ... LOG_REPLIES
    )
    _defaults = {
        "localiphost": None, "timeout": 1200, "rcpthosts": None, "morercpthosts": False,
        "badmailfrom": None, "databytes": 0, "max_line": DEFAULT_MAX_LINE, "plugins": None,
        "plugin_time_limit": None, "program_time_limit": None, "auth_mode": None,
        "checkpassword": (), "auth_hostname": None, "tls": False, "smtps": False,
        "force_tls": False, "require_tls": False, "tls_ciphers": None, "tls_clients": None,
        "smtputf8": False, "log_level": LOG_EVENTS,
    }
