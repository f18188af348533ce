"""Command line entry point.

The per-connection path (no options, as tcpserver runs it: nothing but an
optional checkpassword command line) goes straight to the driver without
importing click, because every import costs every connection.  Everything
else is one click group: `serve`, `check`, `plugin-test`, and the options
and --help of the connection itself.
"""

import os
import sys

TOOLS = ("serve", "check", "plugin-test")


def main(argv=None):
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or (not args[0].startswith("-") and args[0] not in TOOLS):
        from .driver import run_connection
        code = run_connection(args, prepare_plugins=True)
        _save_coverage()
        os._exit(code)  # nothing is buffered: all output went through os.write
    return _tools(args)


def _tools(args):
    import click

    from . import __version__
    from .check import command as check_command
    from .plugin_test import command as plugin_test_command
    from .pool import command as serve_command

    class Group(click.Group):
        """The tools, and a connection when the first argument names none."""

        def resolve_command(self, ctx, args):
            if args and args[0] not in self.commands and not args[0].startswith("-"):
                return "connection", connection, args
            return super().resolve_command(ctx, args)

    @click.group(cls=Group, invoke_without_command=True,
                 context_settings={"help_option_names": ["-h", "--help"]})
    @click.option("--qmail-home", envvar="QMAILHOME", default="/var/qmail", show_default=True,
                  type=click.Path(file_okay=False), help="qmail home: control/ is read from here.")
    @click.version_option(__version__, prog_name="qmail-smtpd-py")
    @click.pass_context
    def group(ctx, qmail_home):
        """SMTP on fd 0/1 for one connection, as qmail-smtpd: run it under
        tcpserver.  Replies, the Received line and the envelope are notqmail's.
        A first argument that is no command below starts the checkpassword
        command line for SMTP AUTH (e.g. /bin/checkpassword /bin/true; the
        old form HOSTNAME CHECKPASSWORD... is accepted too).

        \b
        Environment (set by tcpserver, tcprules or envdir):
          TCPREMOTEIP TCPREMOTEHOST TCPREMOTEINFO TCPLOCALIP TCPLOCALHOST
          RELAYCLIENT   relaying allowed; its value is appended to recipients
          DATABYTES     overrides control/databytes
          QMAILQUEUE    queue program (default bin/qmail-queue in the qmail home)
          QMAILHOME     qmail home (default /var/qmail)
          SMTPMAXLINE   longest command line accepted (default 65536 bytes)
          SMTPUTF8      1: offer SMTPUTF8 (RFC 6531); off: netqmail's EHLO
          SMTPLOGLEVEL  log: 0 errors, 1 events (default), 2 +commands,
                        3 +replies; never passwords
          NOSPP         qmail-spp off (control/smtpplugins then not needed)
          SPPCONFFILE   qmail-spp configuration instead of control/smtpplugins
          SPPTIMEOUT    seconds a qmail-spp plugin may run (default: no limit);
                        a plugin over it is killed and treated as crashed
          SMTPEXTFORK   programs judging each RCPT (SMTPEXTFORKR: for relay
                        clients); 421SMTPEXTFORK ... 554SMTPEXTFORK: custom
                        texts; XF_QUITASAP: close after a refusal
          SMTPEXTFORKTIMEOUT  seconds an SMTPEXTFORK program may run (default:
                        no limit); one over it is killed (the RCPT is accepted)
          NOPRELOAD     Python plugins and programs are always exec'd
          PROXYPROTOCOL the connection starts with a proxy protocol header (v1, v2)
                        naming the client (set it in the balancer's tcprules rule);
                        its value: seconds to wait for it (empty: 5)
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
        ctx.obj = qmail_home
        if ctx.invoked_subcommand is None:
            ctx.invoke(connection)

    @click.command(hidden=True, context_settings={"ignore_unknown_options": True})
    @click.argument("checkpassword", nargs=-1, type=click.UNPROCESSED)
    @click.pass_obj
    def connection(qmail_home, checkpassword):
        from .driver import run_connection
        sys.exit(run_connection(checkpassword, os.fsencode(qmail_home), prepare_plugins=True))

    group.add_command(connection)
    group.add_command(serve_command)
    group.add_command(check_command)
    group.add_command(plugin_test_command)
    return group.main(args, prog_name="qmail-smtpd-py")


def _save_coverage():
    """Under `make coverage` only: os._exit skips the exit handler that saves
    coverage.py's data."""
    coverage = sys.modules.get("coverage")
    current = coverage and coverage.Coverage.current()
    if current is not None:
        current.stop()
        current.save()
