"""Command line entry point.

The per-connection path (no arguments, as tcpserver runs it) goes straight
to the driver: click is imported only when options or subcommands are used,
because every import costs every connection.
"""

import os
import sys


def main(argv=None):
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["serve"]:
        return _serve_main(args[1:])
    if not args or not args[0].startswith("-"):
        from .server import serve
        code = serve(args)
        os._exit(code)  # nothing is buffered: all output went through os.write
    return _click_main(args)


def _click_main(args):
    import click

    from . import __version__

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--qmail-home", envvar="QMAILHOME", default="/var/qmail", show_default=True,
                  type=click.Path(file_okay=False), help="qmail home: control/ is read from here.")
    @click.version_option(__version__, prog_name="qmail-smtpd-py")
    @click.argument("checkpassword", nargs=-1, type=click.UNPROCESSED)
    def command(qmail_home, checkpassword):
        """SMTP on fd 0/1 for one connection, as qmail-smtpd: run it under
        tcpserver.  Replies, the Received line and the envelope are notqmail's.

        CHECKPASSWORD: for SMTP AUTH, the checkpassword command line
        (e.g. /bin/checkpassword /bin/true); the old form HOSTNAME
        CHECKPASSWORD... is accepted too.

        \b
        Environment (set by tcpserver, tcprules or envdir):
          TCPREMOTEIP TCPREMOTEHOST TCPREMOTEINFO TCPLOCALIP TCPLOCALHOST
          RELAYCLIENT   relaying allowed; its value is appended to recipients
          DATABYTES     overrides control/databytes
          QMAILQUEUE    queue program (default bin/qmail-queue in the qmail home)
          QMAILHOME     qmail home (default /var/qmail)
          SMTPMAXLINE   longest command line accepted (default 65536 bytes)
          NOSPP         qmail-spp off (control/smtpplugins then not needed)
          SPPCONFFILE   qmail-spp configuration instead of control/smtpplugins
          SPPTIMEOUT    seconds a qmail-spp plugin may run (default: no limit);
                        a plugin over it is killed and treated as crashed
          SMTPEXTFORK   programs judging each RCPT (SMTPEXTFORKR: for relay
                        clients); 421SMTPEXTFORK... custom texts; XF_QUITASAP
          SMTPAUTH      AUTH mode: "" LOGIN PLAIN, cram, +cram, ! (required),
                        !cram, !+cram, - (off)
          SMTPS         TLS from the first byte (port 465)
          TLSCIPHERS    OpenSSL cipher list (else control/tlsserverciphers)
          FORCETLS      no AUTH before STARTTLS
          TLSREQUIRED   no MAIL before STARTTLS
        \b
        Control files: me smtpgreeting localiphost rcpthosts morercpthosts.cdb
        badmailfrom databytes timeoutsmtpd smtpplugins servercert.pem
        clientca.pem tlsclients tlsserverciphers dh2048.pem.
        """
        from .server import serve
        sys.exit(serve(checkpassword, os.fsencode(qmail_home)))

    return command.main(args, prog_name="qmail-smtpd-py")


def _serve_main(args):
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("-x", "rules", type=click.Path(dir_okay=False),
                  help="tcprules CDB file: deny, or set variables per client address.")
    @click.option("-c", "max_connections", type=click.IntRange(1), default=40, show_default=True,
                  help="Most sessions at once; further connections wait.")
    @click.option("-l", "local_name", help="TCPLOCALHOST for the sessions (no DNS lookups).")
    @click.option("-b", "backlog", type=click.IntRange(1), default=128, show_default=True,
                  help="Listen backlog.")
    @click.option("-H", "-R", "ignored", is_flag=True, hidden=True,
                  help="Accepted for tcpserver compatibility: names are never looked up.")
    @click.option("--qmail-home", envvar="QMAILHOME", type=click.Path(file_okay=False),
                  help="qmail home (default /var/qmail).")
    @click.argument("host", required=False)
    @click.argument("port", type=int, required=False)
    @click.argument("checkpassword", nargs=-1, type=click.UNPROCESSED)
    def command(rules, max_connections, local_name, backlog, ignored, qmail_home, host, port,
                checkpassword):
        """Resident mode: accept SMTP connections on HOST PORT (tcpserver's
        order) and fork one session per connection, with the environment a
        `tcpserver -H -R` child gets.  Everything is imported once, so a
        session costs a fork instead of a new interpreter.  With systemd
        socket activation (LISTEN_FDS) HOST and PORT may be omitted.
        SIGTERM: stop accepting, let the running sessions finish, exit.
        """
        from .resident import Options, Resident
        if port is None and not os.environ.get("LISTEN_FDS"):
            raise click.UsageError("HOST and PORT are required without LISTEN_FDS")
        options = Options(host or "0.0.0.0", port or 0, rules, max_connections, local_name,
                          backlog, os.fsencode(qmail_home) if qmail_home else None,
                          tuple(checkpassword))
        sys.exit(Resident(options).run())

    return command.main(args, prog_name="qmail-smtpd-py serve")
