"""The DNS sample plugins mfdnscheck and rbl under the installed qmail-smtpd-py.

Each test builds a qmail home whose control/smtpplugins names the installed
plugin (next to the server in the venv's bin/), points the plugins at a real
DNS server on loopback (dnsserver.DNSServer, UDP and TCP) through
DNSCACHEIP=127.0.0.1:PORT, runs one SMTP session and compares the replies,
what the DNS server was asked and the log (the server's stderr, which
plugins share).  The sessions are played in-process (plugin_world.run_home:
the core with the home's configuration, the plugin a real process) with
both plugins preloaded as the pool runs them, rbl as a plain entry with
RBL_ARGS; the shell-entry tests run the installed server over pipes.  Temporary failures use SERVFAIL and a server that
never answers, with a small DNSTIMEOUT; only outcomes are asserted, never
durations.

Behaviour: plugins/mfdnscheck and plugins/rbl (their docstrings are the
manuals), Gentoo's mfdnscheck (../shared/spec/spp.md §8) and rblsmtpd(1).
"""

import os
import re

import pytest
from plugin_world import preloaded, run_home

from dnsserver import NXDOMAIN, REFUSED, SERVFAIL, SLOW, DNSServer
from helpers import BIN_DIR, BYE, GREETING, HELO250, OK, crlf, run_smtp

MFDNSCHECK = os.path.join(BIN_DIR, "mfdnscheck")
RBL = os.path.join(BIN_DIR, "rbl")


AUTH_OK = b"235 ok, go ahead (#2.0.0)\r\n"

MUST_EXIST = b"550 sorry, envelope sender domain must exist. (#5.1.8)\r\n"
INVALID = b"550 sorry, invalid envelope sender address. (#5.1.8)\r\n"
NO_SENDER = b"550 sorry, no envelope sender address. (#5.1.8)\r\n"
NULL_MX = b"550 sorry, envelope sender domain does not accept mail. (#5.7.27)\r\n"
DNS_TEMP = b"451 DNS temporary failure. (#4.4.0)\r\n"
RBL_LOOKUP_ERROR = b"451 temporary RBL lookup error (#4.4.3)\r\n"


@pytest.fixture
def dns_server():
    """A DNSServer on loopback with no records (every name NXDOMAIN): tests set
    `.records`.  Stopped at teardown."""
    with DNSServer() as server:
        yield server


def mail(sender):
    return crlf(b"HELO c.test", b"MAIL FROM:<" + sender + b">", b"QUIT")


def plugin_home(make_home, section, entry):
    for path in (MFDNSCHECK, RBL):
        if not os.access(path, os.X_OK):
            pytest.fail("%s is not installed next to the server (pip install .)" % path)
    return make_home(control={"smtpplugins": "[%s]\n%s\n" % (section, entry)})


@pytest.fixture(scope="module", autouse=True)
def plugins_preloaded():
    with preloaded(MFDNSCHECK, RBL, base_env={}):
        yield


def run(home, data, dns, env=None, args=(), process=False):
    """One session with DNSCACHEIP at `dns` (in-process, or with process the
    installed server), and the home's env; asserts the log has no traceback."""
    full = {"DNSCACHEIP": dns.cacheip, "DNSTIMEOUT": "2"}
    full.update(getattr(home, "env", {}))
    full.update(env or {})
    res = (run_smtp if process else run_home)(data, env=full, home=home, args=args)
    assert b"Traceback" not in res.err, res.err.decode(errors="replace")
    assert res.status == 0
    return res


def replies(out):
    """The reply lines; each must end in CRLF and hold no other CR or LF."""
    assert out.endswith(b"\r\n")
    lines = out.split(b"\r\n")[:-1]
    for line in lines:
        assert b"\n" not in line and b"\r" not in line and b"\0" not in line, line
        assert re.match(rb"^\d{3}[ -]", line), line
    return lines


# ================================================================== mfdnscheck

@pytest.fixture
def mfd(make_home):
    return plugin_home(make_home, "mail", MFDNSCHECK)


@pytest.mark.parametrize("records", [
    {"MX": ["10 mx.example.net."]},
    {"A": ["192.0.2.1"]},
    {"AAAA": ["2001:db8::25"]},
], ids=["mx", "a-only", "aaaa-only"])
def test_mfdnscheck_accepts_a_domain_with_mx_a_or_aaaa(mfd, dns_server, records):
    dns_server.records = {"sender.test": records}
    res = run(mfd, mail(b"someone@Sender.Test"), dns_server)
    assert res.out == GREETING + HELO250 + OK + BYE
    asked = dns_server.queried()
    assert asked[0] == "sender.test"
    # stops at the first type found, in the order MX, A, AAAA
    wanted = {"MX": 1, "A": 2, "AAAA": 3}[next(iter(records))]
    assert len(asked) == wanted
    assert dns_server.queried("MX") == ["sender.test"]


def test_mfdnscheck_refuses_a_domain_that_does_not_exist(mfd, dns_server):
    res = run(mfd, mail(b"someone@nowhere.test"), dns_server)
    assert res.out == GREETING + HELO250 + MUST_EXIST + BYE
    assert dns_server.queried() == ["nowhere.test"]  # NXDOMAIN: no need to ask for A
    assert b"mfdnscheck: pid " in res.err and b"nowhere.test: NXDOMAIN" in res.err


def test_mfdnscheck_refuses_a_domain_without_mx_a_or_aaaa(mfd, dns_server):
    dns_server.records = {"txtonly.test": {"TXT": ['"v=spf1 -all"']}}
    res = run(mfd, mail(b"someone@txtonly.test"), dns_server)
    assert res.out == GREETING + HELO250 + MUST_EXIST + BYE
    assert sorted(dns_server.queried()) == ["txtonly.test"] * 3
    assert sorted(t for _, t, _ in dns_server.queries) == ["A", "AAAA", "MX"]


def test_mfdnscheck_refused_mail_keeps_the_session_going(mfd, dns_server):
    dns_server.records = {"ok.test": {"MX": ["10 mx.ok.test."]}}
    res = run(mfd, crlf(b"MAIL FROM:<a@nowhere.test>", b"MAIL FROM:<a@ok.test>",
                        b"RCPT TO:<u@example.com>", b"DATA", b"hi", b".", b"QUIT"),
              dns_server)
    assert res.out.startswith(GREETING + MUST_EXIST + OK + OK + b"354 go ahead\r\n")
    (msg,) = res.queued
    assert msg.sender == b"a@ok.test"


def test_mfdnscheck_null_mx_refuses(mfd, dns_server):
    dns_server.records = {"nomail.test": {"MX": ["0 ."], "A": ["192.0.2.1"]}}
    res = run(mfd, mail(b"someone@nomail.test"), dns_server)
    assert res.out == GREETING + HELO250 + NULL_MX + BYE


@pytest.mark.parametrize("records", [
    SERVFAIL,
    REFUSED,
    {"MX": SERVFAIL, "A": SERVFAIL, "AAAA": []},
], ids=["servfail", "refused", "servfail-then-nodata"])
def test_mfdnscheck_temporary_failure_is_451(mfd, dns_server, records):
    dns_server.records = {"flaky.test": records}
    res = run(mfd, mail(b"someone@flaky.test"), dns_server)
    assert res.out == GREETING + HELO250 + DNS_TEMP + BYE
    assert b"temporary failure for <someone@flaky.test>" in res.err


def test_mfdnscheck_timeout_is_451(mfd, dns_server):
    dns_server.records = {"slow.test": SLOW}
    res = run(mfd, mail(b"someone@slow.test"), dns_server, env={"DNSTIMEOUT": "0.5"})
    assert res.out == GREETING + HELO250 + DNS_TEMP + BYE
    assert b"timed out" in res.err or b"used up" in res.err


def test_mfdnscheck_a_record_outweighs_a_failed_mx_lookup(mfd, dns_server):
    dns_server.records = {"mixed.test": {"MX": SERVFAIL, "A": ["192.0.2.7"]}}
    res = run(mfd, mail(b"someone@mixed.test"), dns_server)
    assert res.out == GREETING + HELO250 + OK + BYE


def test_mfdnscheck_nxdomain_outweighs_a_failed_mx_lookup(mfd, dns_server):
    dns_server.records = {"gone.test": {"MX": SERVFAIL, "A": NXDOMAIN},
                          "half.test": {"MX": SERVFAIL}}
    res = run(mfd, mail(b"someone@gone.test"), dns_server)
    assert res.out == GREETING + HELO250 + MUST_EXIST + BYE
    # the same failed MX lookup with "no data" for A and AAAA stays temporary
    res = run(mfd, mail(b"someone@half.test"), dns_server)
    assert res.out == GREETING + HELO250 + DNS_TEMP + BYE


def test_mfdnscheck_null_sender_accepted(mfd, dns_server):
    res = run(mfd, mail(b""), dns_server)
    assert res.out == GREETING + HELO250 + OK + BYE
    assert dns_server.queries == []


@pytest.mark.parametrize("value,refused", [("1", True), ("yes", False), ("", False)])
def test_mfdnscheck_nomfdnsbounce_1_refuses_the_null_sender(mfd, dns_server, value, refused):
    res = run(mfd, mail(b""), dns_server, env={"NOMFDNSBOUNCE": value})
    assert res.out == GREETING + HELO250 + (NO_SENDER if refused else OK) + BYE


@pytest.mark.parametrize("value", ["", "1"])
def test_mfdnscheck_nomfdnscheck_disables(mfd, dns_server, value):
    res = run(mfd, mail(b"someone@nowhere.test"), dns_server, env={"NOMFDNSCHECK": value})
    assert res.out == GREETING + HELO250 + OK + BYE
    assert dns_server.queries == []


def test_mfdnscheck_skips_relay_clients(mfd, dns_server):
    res = run(mfd, mail(b"someone@nowhere.test"), dns_server, env={"RELAYCLIENT": ""})
    assert res.out == GREETING + HELO250 + OK + BYE
    assert dns_server.queries == []


def test_mfdnscheck_skips_authenticated_sessions(mfd, dns_server):
    login = b"AUTH PLAIN AGpvZQBzZWNyZXQ="  # \0joe\0secret; /bin/true accepts anyone
    res = run(mfd, crlf(b"EHLO c.test", login, b"MAIL FROM:<a@nowhere.test>", b"QUIT"),
              dns_server, env={"SMTPAUTH": ""}, args=("/bin/true",))
    lines = replies(res.out)
    assert lines[-3:] == [AUTH_OK[:-2], OK[:-2], BYE[:-2]]
    assert dns_server.queries == []


@pytest.mark.parametrize("sender", [b"a@[192.0.2.1]", b"a@[IPv6:2001:db8::1]"])
def test_mfdnscheck_accepts_address_literals_without_dns(mfd, dns_server, sender):
    res = run(mfd, mail(sender), dns_server)
    assert res.out == GREETING + HELO250 + OK + BYE
    assert dns_server.queries == []


def test_mfdnscheck_sender_without_domain_is_invalid(mfd, dns_server):
    res = run(mfd, mail(b"postmaster"), dns_server)
    assert res.out == GREETING + HELO250 + INVALID + BYE


@pytest.mark.parametrize("sender", [
    b"a@exa..mple.test",
    b"a@" + b"x" * 70 + b".test",
    b"a@\xff\xfe.test",
    b"a@b\xc3\xa9.test",
    b"a@.",
])
def test_mfdnscheck_bad_domains_are_refused_without_traceback(mfd, dns_server, sender):
    res = run(mfd, mail(sender), dns_server)
    assert res.out == GREETING + HELO250 + MUST_EXIST + BYE


def test_mfdnscheck_bad_dnscacheip_accepts_and_logs(mfd, dns_server):
    res = run(mfd, mail(b"a@nowhere.test"), dns_server, env={"DNSCACHEIP": "not-an-ip"})
    assert res.out == GREETING + HELO250 + OK + BYE
    assert b"DNSCACHEIP" in res.err and b"accepting" in res.err


# ================================================================== rbl

LISTED4 = "99.2.0.192.bl.test"
LISTED6 = ".".join("20010db8000000000000000000000001"[::-1]) + ".bl.test"


def rbl_home(make_home, args="bl.test", section="mail"):
    """rbl as a plain entry in that section, args in RBL_ARGS (home.env)."""
    home = plugin_home(make_home, section, RBL)
    home.env = {"RBL_ARGS": args}
    return home


def test_rbl_shell_entry_takes_its_arguments(make_home, listed):
    home = plugin_home(make_home, "mail", ":%s -b bl.test" % RBL)
    res = run(home, mail(b"a@b.test"), listed, dict(client("192.0.2.99"), RBL_ARGS="-c x.test"),
              process=True)
    assert res.out == (GREETING + HELO250
                       + b"553 Listed by bl.test, see http://bl.test/192.0.2.99 (#5.7.1)\r\n"
                       + BYE)
    assert listed.queried("A") == [LISTED4]


def client(ip):
    return {"TCPREMOTEIP": ip}


@pytest.fixture
def listed(dns_server):
    """192.0.2.99 and 2001:db8::1 are listed at bl.test with a TXT record."""
    dns_server.records = {
        LISTED4: {"A": ["127.0.0.2"], "TXT": ['"Listed by bl.test, see http://bl.test/192.0.2.99"']},
        LISTED6: {"A": ["127.0.0.4"], "TXT": ['"v6 listed"']},
    }
    return dns_server


def test_rbl_listed_ipv4_gets_451_with_the_txt_text(make_home, listed):
    res = run(rbl_home(make_home), mail(b"a@b.test"), listed, client("192.0.2.99"))
    assert res.out == (GREETING + HELO250
                       + b"451 Listed by bl.test, see http://bl.test/192.0.2.99 (#4.7.1)\r\n"
                       + BYE)
    assert (LISTED4, "A", "udp") in listed.queries
    assert (LISTED4, "TXT", "udp") in listed.queries
    assert b"rbl: pid " in res.err and b"192.0.2.99 listed at bl.test (127.0.0.2)" in res.err


def test_rbl_b_option_makes_it_553(make_home, listed):
    res = run(rbl_home(make_home, "-b bl.test"), mail(b"a@b.test"), listed,
              client("192.0.2.99"))
    assert res.out == (GREETING + HELO250
                       + b"553 Listed by bl.test, see http://bl.test/192.0.2.99 (#5.7.1)\r\n"
                       + BYE)


def test_rbl_capital_b_after_b_is_451_again(make_home, listed):
    res = run(rbl_home(make_home, "-b -B bl.test"), mail(b"a@b.test"), listed,
              client("192.0.2.99"))
    assert replies(res.out)[2].startswith(b"451 Listed by bl.test")


def test_rbl_not_listed_is_accepted(make_home, listed):
    res = run(rbl_home(make_home), mail(b"a@b.test"), listed, client("192.0.2.98"))
    assert res.out == GREETING + HELO250 + OK + BYE
    assert listed.queried() == ["98.2.0.192.bl.test"]


def test_rbl_ipv6_client_uses_the_nibble_name(make_home, listed):
    res = run(rbl_home(make_home), mail(b"a@b.test"), listed, client("2001:db8::1"))
    assert res.out == GREETING + HELO250 + b"451 v6 listed (#4.7.1)\r\n" + BYE
    assert listed.queried("A") == [LISTED6]
    assert LISTED6.startswith("1.0.0.0.0.0.0.0") and LISTED6.count(".") == 33


def test_rbl_ipv6_client_not_listed(make_home, listed):
    res = run(rbl_home(make_home), mail(b"a@b.test"), listed, client("2001:db8::2"))
    assert res.out == GREETING + HELO250 + OK + BYE
    assert listed.queried() == ["2" + LISTED6[1:]]


def test_rbl_ipv4_mapped_client_is_looked_up_as_ipv4(make_home, listed):
    res = run(rbl_home(make_home), mail(b"a@b.test"), listed, client("::ffff:192.0.2.99"))
    assert replies(res.out)[2].startswith(b"451 Listed by bl.test")
    assert listed.queried("A") == [LISTED4]


def test_rbl_listed_without_txt_names_the_zone(make_home, dns_server):
    dns_server.records = {LISTED4: {"A": ["127.0.0.2"]}}
    res = run(rbl_home(make_home), mail(b"a@b.test"), dns_server, client("192.0.2.99"))
    assert res.out == (GREETING + HELO250
                       + b"451 sorry, 192.0.2.99 is listed at bl.test (#4.7.1)\r\n" + BYE)


def test_rbl_zones_are_asked_in_order_first_hit_decides(make_home, dns_server):
    dns_server.records = {
        "99.2.0.192.two.test": {"A": ["127.0.0.2"], "TXT": ['"two"']},
        "99.2.0.192.three.test": {"A": ["127.0.0.2"], "TXT": ['"three"']},
    }
    home = rbl_home(make_home, "one.test two.test three.test")
    res = run(home, mail(b"a@b.test"), dns_server, client("192.0.2.99"))
    assert replies(res.out)[2] == b"451 two (#4.7.1)"
    assert dns_server.queried("A") == ["99.2.0.192.one.test", "99.2.0.192.two.test"]


def test_rbl_zones_from_rbl_zones_env_and_r_option(make_home, dns_server):
    dns_server.records = {"99.2.0.192.env.test": {"A": ["127.0.0.2"], "TXT": ['"env"']}}
    home = rbl_home(make_home, "-r opt.test")
    res = run(home, mail(b"a@b.test"), dns_server,
              dict(client("192.0.2.99"), RBL_ZONES="x.test, env.test"))
    assert replies(res.out)[2] == b"451 env (#4.7.1)"
    assert dns_server.queried("A") == [
        "99.2.0.192.opt.test", "99.2.0.192.x.test", "99.2.0.192.env.test"]


def test_rbl_allowlist_before_blocklist_wins(make_home, listed):
    listed.records["99.2.0.192.allow.test"] = {"A": ["127.0.0.2"]}
    home = rbl_home(make_home, "-a allow.test -r bl.test")
    res = run(home, mail(b"a@b.test"), listed, client("192.0.2.99"))
    assert res.out == GREETING + HELO250 + OK + BYE
    assert listed.queried() == ["99.2.0.192.allow.test"]


def test_rbl_allowlist_miss_goes_on(make_home, listed):
    home = rbl_home(make_home, "-a allow.test -r bl.test")
    res = run(home, mail(b"a@b.test"), listed, client("192.0.2.99"))
    assert replies(res.out)[2].startswith(b"451 Listed by bl.test")


def test_rblsmtpd_empty_skips_the_check(make_home, listed):
    res = run(rbl_home(make_home), mail(b"a@b.test"), listed,
              dict(client("192.0.2.99"), RBLSMTPD=""))
    assert res.out == GREETING + HELO250 + OK + BYE
    assert listed.queries == []


@pytest.mark.parametrize("value,reply", [
    ("you are blocked", b"451 you are blocked"),
    ("-you are blocked", b"553 you are blocked"),
    ("-two\nlines\r\x01", b"553 two?lines??"),
])
def test_rblsmtpd_text_refuses_without_dns(make_home, listed, value, reply):
    res = run(rbl_home(make_home), mail(b"a@b.test"), listed,
              dict(client("192.0.2.1"), RBLSMTPD=value))
    assert res.out == GREETING + HELO250 + reply + b"\r\n" + BYE
    assert listed.queries == []


def test_rbl_skips_relay_clients(make_home, listed):
    res = run(rbl_home(make_home), mail(b"a@b.test"), listed,
              dict(client("192.0.2.99"), RELAYCLIENT=""))
    assert res.out == GREETING + HELO250 + OK + BYE
    assert listed.queries == []


def test_rbl_skips_authenticated_sessions(make_home, listed):
    login = b"AUTH PLAIN AGpvZQBzZWNyZXQ="
    res = run(rbl_home(make_home), crlf(b"EHLO c.test", login, b"MAIL FROM:<a@b.test>",
                                        b"QUIT"),
              listed, dict(client("192.0.2.99"), SMTPAUTH=""), args=("/bin/true",))
    assert replies(res.out)[-3:] == [AUTH_OK[:-2], OK[:-2], BYE[:-2]]
    assert listed.queries == []


@pytest.mark.parametrize("records", [SERVFAIL, SLOW], ids=["servfail", "timeout"])
def test_rbl_dns_failure_fails_open_with_a_log_line(make_home, dns_server, records):
    dns_server.records = {LISTED4: records}
    res = run(rbl_home(make_home), mail(b"a@b.test"), dns_server,
              dict(client("192.0.2.99"), DNSTIMEOUT="0.5"))
    assert res.out == GREETING + HELO250 + OK + BYE
    assert b"lookup of 192.0.2.99 at bl.test failed" in res.err
    assert b"fail open" in res.err


def test_rbl_c_option_fails_closed(make_home, dns_server):
    dns_server.records = {LISTED4: SERVFAIL}
    res = run(rbl_home(make_home, "-c bl.test"), mail(b"a@b.test"), dns_server,
              client("192.0.2.99"))
    assert res.out == GREETING + HELO250 + RBL_LOOKUP_ERROR + BYE


def test_rbl_c_option_listing_elsewhere_still_decides(make_home, dns_server):
    dns_server.records = {LISTED4: SERVFAIL,
                          "99.2.0.192.other.test": {"A": ["127.0.0.2"], "TXT": ['"other"']}}
    res = run(rbl_home(make_home, "-c -b bl.test other.test"), mail(b"a@b.test"),
              dns_server, client("192.0.2.99"))
    assert replies(res.out)[2] == b"553 other (#5.7.1)"


def test_rbl_t_option_bounds_the_lookup(make_home, dns_server):
    dns_server.records = {LISTED4: SLOW}
    res = run(rbl_home(make_home, "-t 0.3 bl.test"), mail(b"a@b.test"), dns_server,
              dict(client("192.0.2.99"), DNSTIMEOUT="60"))
    assert res.out == GREETING + HELO250 + OK + BYE
    assert b"timed out" in res.err


@pytest.mark.parametrize("code", ["127.255.255.254", "192.0.2.1"])
def test_rbl_answers_that_are_not_listings_are_ignored(make_home, dns_server, code):
    dns_server.records = {LISTED4: {"A": [code], "TXT": ['"query refused"']}}
    res = run(rbl_home(make_home), mail(b"a@b.test"), dns_server, client("192.0.2.99"))
    assert res.out == GREETING + HELO250 + OK + BYE
    assert b"answered " + code.encode() + b" for 192.0.2.99: not a listing" in res.err


def test_rbl_txt_with_line_breaks_and_8bit_is_one_clean_line(make_home, dns_server):
    dns_server.records = {LISTED4: {"A": ["127.0.0.2"], "TXT": [
        r'"first\013\010550 injected\000 \195\169" "second"', '"record two"']}}
    res = run(rbl_home(make_home), crlf(b"MAIL FROM:<a@b.test>", b"QUIT"), dns_server,
              client("192.0.2.99"))
    lines = replies(res.out)
    assert len(lines) == 3
    refusal = lines[1]
    # the records' order is the server's choice; the strings of one record keep theirs
    assert refusal in (b"451 first??550 injected? ??second; record two (#4.7.1)",
                       b"451 record two; first??550 injected? ??second (#4.7.1)")


def test_rbl_long_txt_comes_over_tcp_and_is_cut(make_home, dns_server):
    # one record of eight 250-byte strings (the strings of a record keep their order)
    long_txt = " ".join('"%s"' % (chr(ord("a") + n) * 250) for n in range(8))
    dns_server.records = {LISTED4: {"A": ["127.0.0.2"], "TXT": [long_txt]}}
    res = run(rbl_home(make_home), mail(b"a@b.test"), dns_server, client("192.0.2.99"))
    refusal = replies(res.out)[2]
    assert (LISTED4, "TXT", "tcp") in dns_server.queries
    assert refusal.startswith(b"451 " + b"a" * 250)
    assert refusal.endswith(b"... (#4.7.1)") and len(refusal) <= 510


def test_rbl_in_rcpt_refuses_the_recipient(make_home, listed):
    home = rbl_home(make_home, section="rcpt")
    res = run(home, crlf(b"MAIL FROM:<a@b.test>", b"RCPT TO:<u@example.com>", b"QUIT"),
              listed, client("192.0.2.99"))
    assert res.out == (GREETING + OK
                       + b"451 Listed by bl.test, see http://bl.test/192.0.2.99 (#4.7.1)\r\n"
                       + BYE)


@pytest.mark.parametrize("args,code", [("bl.test", b"421"), ("-b bl.test", b"554")])
def test_rbl_in_connection_answers_and_disconnects(make_home, listed, args, code):
    home = rbl_home(make_home, args, section="connection")
    res = run(home, mail(b"a@b.test"), listed, client("192.0.2.99"))
    assert res.out == code + b" Listed by bl.test, see http://bl.test/192.0.2.99 (#" + (
        b"5" if code == b"554" else b"4") + b".7.1)\r\n"
    assert res.queued == []


def test_rbl_in_connection_not_listed_greets(make_home, listed):
    home = rbl_home(make_home, section="connection")
    res = run(home, mail(b"a@b.test"), listed, client("192.0.2.1"))
    assert res.out == GREETING + HELO250 + OK + BYE


@pytest.mark.parametrize("args,ip,log", [
    ("-t nonsense bl.test", "192.0.2.99", b"usage: rbl"),
    ("-x bl.test", "192.0.2.99", b"usage: rbl"),
    ("", "192.0.2.99", b"no zones given"),
    ("bl.test", "not-an-ip", b"is no IP address"),
])
def test_rbl_bad_configuration_accepts_and_logs(make_home, listed, args, ip, log):
    res = run(rbl_home(make_home, args), mail(b"a@b.test"), listed, client(ip))
    assert res.out == GREETING + HELO250 + OK + BYE
    assert log in res.err
    assert listed.queries == []
