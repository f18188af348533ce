"""Command line entry point.

The per-connection path (no arguments, as tcpserver runs it) goes straight
to the driver, `serve` to the resident mode, `check` to the control-file
checker and `plugin-test` to the plugin tester: click is imported only for
options and --help, because every import costs every connection.
"""

import os
import sys


def main(argv=None):
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["serve"]:
        from .resident import main as serve_resident
        return serve_resident(args[1:])
    if args[:1] == ["check"]:
        from .check import main as check_main
        return check_main(args[1:])
    if args[:1] == ["plugin-test"]:
        from .plugin_test import main as plugin_test_main
        return plugin_test_main(args[1:])
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

        `qmail-smtpd-py serve ...` is the resident mode: see
        `qmail-smtpd-py serve --help`.  `qmail-smtpd-py check [--qmail-home DIR]`
        looks over the control files for mistakes.  `qmail-smtpd-py plugin-test
        PLUGIN [ARG...]` tries a qmail-spp plugin out (see its --help).

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
