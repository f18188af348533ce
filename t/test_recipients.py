"""qmail_smtpd_py.recipients (the resolver behind plugins/rcptcheck) and
qmail_smtpd_py.cdbmake (users/assign -> users/cdb), in-process.

Theory of operation: every test builds a real qmail installation in a
directory (Site): control files, users/assign compiled to users/cdb with the
project's own qmail-newu (cdbmake.newu), home directories with .qmail files,
and passwd entries behind a test passwd lookup (a dict; the resolver takes
it as `getpw`).  Then it asks Resolver.check what qmail would do with a
recipient and compares the verdict, and where it matters the trace: the
user, dash and extension qmail-lspawn would pass on and the .qmail names
qmail-local would try.

Behaviour: ../shared/spec/recipients.md; §12's worked examples are
SPEC_EXAMPLES.  The tests run as root in CI (the homes are chowned to test
uids) or as any other user (then every account has that user's uid).
Permission tests run the resolver in a child that drops to nobody.
The last part is a Hypothesis property: random installations and
addresses, the resolver against `reference_verdict`, a resolver written
again from the spec's prose, reading the model instead of the files.
"""

import os
import pickle
import shutil
import subprocess
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmail_smtpd_py import cdbmake
from qmail_smtpd_py.cdb import Cdb
from qmail_smtpd_py.recipients import (
    ACCEPT,
    REJECT,
    REMOTE,
    TRASH,
    UNKNOWN,
    AddressMap,
    Controls,
    PasswdFile,
    Resolver,
    rewrite,
)

ROOT = os.geteuid() == 0
UID = 1001 if ROOT else os.geteuid()  # the uid of every test account (never 0)
OTHER_UID = UID + 1                    # someone else
VPOP_UID = 89 if ROOT else UID
NOBODY = 65534

VDELIVERMAIL = b"| /home/vpopmail/bin/vdelivermail '' bounce-no-mailbox\n"


class Site:
    """A qmail installation under root: the qmail home (control/, users/;
    root/qmail unless qmail is given), home directories under root/homes and
    a test passwd (the dict .passwd behind .getpw, or written out by
    .passwd_file)."""

    def __init__(self, root, control=None, qmail=None):
        self.root = os.fsencode(root)
        self.qmail = os.fsencode(qmail) if qmail else os.path.join(self.root, b"qmail")
        os.makedirs(os.path.join(self.qmail, b"control"), exist_ok=True)
        os.makedirs(os.path.join(self.qmail, b"users"), exist_ok=True)
        os.makedirs(os.path.join(self.root, b"homes"), exist_ok=True)
        self.passwd = {}
        for name, text in (control or {}).items():
            self.control(name, text)

    def control(self, name, text):
        """Write control/NAME (bytes); None removes it."""
        path = os.path.join(self.qmail, b"control", os.fsencode(name))
        if text is None:
            if os.path.lexists(path):
                os.unlink(path)
            return
        with open(path, "wb") as f:
            f.write(text)

    def home(self, name, owner=UID, mode=0o755):
        """A directory root/homes/NAME owned by owner (when we may chown)."""
        path = os.path.join(self.root, b"homes", name)
        os.makedirs(path, exist_ok=True)
        if ROOT:
            os.chown(path, owner, 100)
        os.chmod(path, mode)
        return path

    def account(self, name, uid=UID, home=None, owner=None, files=(), mode=0o755):
        """A passwd entry (name, uid, 100, home) with its home directory
        (root/homes/NAME unless home is given; owned by owner, default uid)
        holding the .qmail files named in files (empty).  Returns the home."""
        if home is None:
            home = self.home(name, uid if owner is None else owner, mode)
        self.passwd[name] = (name, uid, 100, home)
        for file in files:
            self.dotqmail(home, file)
        return home

    @staticmethod
    def dotqmail(home, name, content=b"", mode=0o644):
        path = os.path.join(home, name)
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, mode)
        return path

    def assign(self, *lines):
        """users/assign with these lines and the final ".", compiled to users/cdb."""
        with open(os.path.join(self.qmail, b"users", b"assign"), "wb") as f:
            f.write(b"".join(line + b"\n" for line in lines) + b".\n")
        cdbmake.newu(self.qmail)

    def getpw(self, name):
        return self.passwd.get(name)

    def passwd_file(self):
        """The test passwd as a passwd(5) file; returns its path."""
        path = os.path.join(self.root, b"passwd")
        with open(path, "wb") as f:
            f.writelines(b"%s:x:%d:%d:test:%s:/bin/sh\n" % entry
                         for entry in self.passwd.values())
        return path

    def resolver(self, **kw):
        kw.setdefault("getpw", self.getpw)
        return Resolver(qmail=self.qmail, **kw)

    def check(self, rcpt, **kw):
        return self.resolver(**kw).check(rcpt)


# ================================================================== §12 worked examples

SPEC_CONTROL = {
    "me": b"mail.example.org\n",
    "locals": b"example.org\nmail.example.org\n",
    "virtualdomains": b"virt.example.com:vjoe\nbob@virt.example.com:joe\n"
                      b"vpop.example.net:vpop.example.net\next.example.com:\n",
    "rcpthosts": b"example.org\nmail.example.org\nvirt.example.com\nvpop.example.net\n"
                 b"ext.example.com\n",
}


def spec_site(root, qmail=None):
    """The set-up of spec §12: accounts joe and vjoe (owning their homes), root,
    alias; users/assign's joe.shmoe line and a vpopmail domain; the listed files."""
    site = Site(root, SPEC_CONTROL, qmail)
    joe = site.account(b"joe", files=[b".qmail-sos", b".qmail-list-default"])
    site.account(b"vjoe", files=[b".qmail-info"])
    site.account(b"root", uid=0, owner=0)
    site.account(b"alias", files=[b".qmail-postmaster", b".qmail-root"])
    vpop = site.home(b"vpopmail-domains-vpop.example.net", owner=VPOP_UID)
    site.dotqmail(vpop, b".qmail-default", VDELIVERMAIL)
    site.assign(b"=joe.shmoe:joe:1001:100:" + joe + b":-:shmoe:",
                b"+vpop.example.net-:vpop.example.net:89:89:" + vpop + b":-::")
    return site


@pytest.fixture
def spec(tmp_path):
    return spec_site(tmp_path)


LONG = b"l" * 300
# SMTPRCPTTO, verdict, (user, dash, ext) or None, .qmail names tried (None: no search)
SPEC_EXAMPLES = [
    (b"joe@example.org", ACCEPT, (b"joe", b"", b""), None),
    (b"JOE@Example.ORG", ACCEPT, (b"joe", b"", b""), None),
    (b"joe-sos@example.org", ACCEPT, (b"joe", b"-", b"sos"), [b".qmail-sos"]),
    (b"joe-SOS@example.org", ACCEPT, (b"joe", b"-", b"SOS"), [b".qmail-sos"]),
    (b"joe-nosuch@example.org", REJECT, (b"joe", b"-", b"nosuch"),
     [b".qmail-nosuch", b".qmail-default"]),
    (b"joe-list-x@example.org", ACCEPT, (b"joe", b"-", b"list-x"),
     [b".qmail-list-x", b".qmail-list-default"]),
    (b"Joe.Shmoe@example.org", REJECT, (b"joe", b"-", b"shmoe"),
     [b".qmail-shmoe", b".qmail-default"]),
    (b"postmaster@example.org", ACCEPT, (b"alias", b"-", b"postmaster"),
     [b".qmail-postmaster"]),
    (b"postmaster", ACCEPT, (b"alias", b"-", b"postmaster"), [b".qmail-postmaster"]),
    (b"root@example.org", ACCEPT, (b"alias", b"-", b"root"), [b".qmail-root"]),
    (b"first.last@example.org", REJECT, (b"alias", b"-", b"first.last"),
     [b".qmail-first:last", b".qmail-default"]),
    (b"joe smith@example.org", REJECT, (b"alias", b"-", b"joe smith"),
     [b".qmail-joe smith", b".qmail-default"]),
    (b"joe+tag@example.org", REJECT, (b"alias", b"-", b"joe+tag"),
     [b".qmail-joe+tag", b".qmail-default"]),
    (b"alias@example.org", ACCEPT, (b"alias", b"", b""), None),
    (b"", TRASH, None, None),
    (b"@example.org", TRASH, None, None),
    (b"info@virt.example.com", ACCEPT, (b"vjoe", b"-", b"info"), [b".qmail-info"]),
    (b"sales@virt.example.com", REJECT, (b"vjoe", b"-", b"sales"),
     [b".qmail-sales", b".qmail-default"]),
    (b"bob@virt.example.com", REJECT, (b"joe", b"-", b"bob"),
     [b".qmail-bob", b".qmail-default"]),
    (b"anyone@vpop.example.net", ACCEPT, (b"vpop.example.net", b"-", b"anyone"),
     [b".qmail-anyone", b".qmail-default"]),
    (b"x@ext.example.com", REMOTE, None, None),
    (b"joe-" + LONG + b"@example.org", REJECT, (b"joe", b"-", LONG),
     [b".qmail-" + LONG, b".qmail-default"]),
]


@pytest.mark.parametrize("rcpt,status,who,tried", SPEC_EXAMPLES,
                         ids=[e[0][:40].decode() or "<>" for e in SPEC_EXAMPLES])
def test_spec_worked_examples(spec, rcpt, status, who, tried):
    verdict = spec.check(rcpt)
    assert verdict.status == status, verdict.reason
    if who is not None:
        assert (verdict.user, verdict.dash, verdict.ext) == who
    assert verdict.tried == tried


def test_spec_rewrite_column(spec):
    """The "rewrite -> L" column: the address qmail-lspawn gets."""
    assert spec.check(b"postmaster").address == b"postmaster@mail.example.org"
    assert spec.check(b"").local == b""
    assert spec.check(b"info@virt.example.com").local == b"vjoe-info"
    assert spec.check(b"bob@virt.example.com").address == b"joe-bob@virt.example.com"
    verdict = spec.check(b"anyone@vpop.example.net")
    assert verdict.local == b"vpop.example.net-anyone"
    assert verdict.found == b".qmail-default"


def test_spec_break_plus_still_rejects(spec):
    """conf-break "+": joe+tag is joe / - / tag, and still no .qmail-tag."""
    verdict = spec.check(b"joe+tag@example.org", brk=b"+")
    assert (verdict.status, verdict.user, verdict.dash, verdict.ext) == (
        REJECT, b"joe", b"-", b"tag")
    assert verdict.tried == [b".qmail-tag", b".qmail-default"]


def test_spec_alias_catch_all_accepts_every_alias_row(spec):
    """With ~alias/.qmail-default every address that reaches alias is accepted."""
    spec.dotqmail(spec.passwd[b"alias"][3], b".qmail-default")
    for rcpt, _, who, _ in SPEC_EXAMPLES:
        if who is not None and who[0] == b"alias":
            assert spec.check(rcpt).status == ACCEPT, rcpt
    assert spec.check(b"joe-nosuch@example.org").status == REJECT  # joe has no catch-all


def test_refusal_reason_names_the_files(spec):
    verdict = spec.check(b"joe-nosuch@example.org")
    assert verdict.refused
    assert ".qmail-nosuch or .qmail-default" in verdict.reason
    assert os.fsdecode(spec.passwd[b"joe"][3]) in verdict.reason


# ================================================================== rewrite (qmail-send)


def controls(locals_=(b"example.org",), vdoms=(), percenthack=(), envnoathost=b"mail.test"):
    return Controls(list(locals_), envnoathost, list(percenthack), list(vdoms))


WILD = [b".wild.example.com:w", b"sub.wild.example.com:", b":catch"]


@pytest.mark.parametrize("addr,expected", [
    (b"a@x.wild.example.com", ("local", b"w-a@x.wild.example.com")),
    (b"a@y.x.wild.example.com", ("local", b"w-a@y.x.wild.example.com")),
    (b"a@wild.example.com", ("local", b"catch-a@wild.example.com")),  # ".wild" is not "wild"
    (b"a@sub.wild.example.com", ("remote", b"a@sub.wild.example.com")),  # exception stops
    (b"a@x.sub.wild.example.com", ("local", b"w-a@x.sub.wild.example.com")),
    (b"a@elsewhere.net", ("local", b"catch-a@elsewhere.net")),
    (b"A@X.WILD.Example.COM", ("local", b"w-A@X.WILD.Example.COM")),  # case kept
])
def test_rewrite_wildcards_exceptions_and_catch_all(addr, expected):
    kind, address, _ = rewrite(addr, controls(vdoms=WILD))
    assert (kind, address) == expected


def test_rewrite_locals_beat_virtualdomains():
    assert rewrite(b"joe@Example.ORG", controls(vdoms=[b"example.org:v"]))[:2] == (
        "local", b"joe@Example.ORG")


def test_rewrite_whole_address_beats_domain():
    vd = [b"v.example.com:vee", b"bob@v.example.com:bobby"]
    assert rewrite(b"BOB@V.example.com", controls(vdoms=vd))[1] == b"bobby-BOB@V.example.com"
    assert rewrite(b"ann@v.example.com", controls(vdoms=vd))[1] == b"vee-ann@v.example.com"


def test_rewrite_key_quirks():
    vd = [b" lead.example.com:x", b"c.example.com:a:b", b"d.example.com:first",
          b"D.example.com:last", b"crlf.example.com:y\r", b"nocolon.example.com"]
    c = controls(vdoms=vd)
    assert rewrite(b"u@lead.example.com", c)[0] == "remote"  # leading space never matches
    assert rewrite(b"u@c.example.com", c)[1] == b"a:b-u@c.example.com"  # first ":" splits
    assert rewrite(b"u@d.example.com", c)[1] == b"last-u@d.example.com"  # last line wins
    assert rewrite(b"u@crlf.example.com", c)[1] == b"y\r-u@crlf.example.com"
    assert rewrite(b"u@nocolon.example.com", c)[0] == "remote"
    assert rewrite(b"u@example.org.", c)[0] == "remote"  # no trailing-dot removal


def test_rewrite_percent_hack():
    c = controls(percenthack=[b"relay.example.org"])
    assert rewrite(b"u%x%y.com@relay.example.org", c)[1] == b"u%x@y.com"  # one step
    assert rewrite(b"u%o.net@Relay.Example.ORG", c)[1] == b"u@o.net"
    assert rewrite(b"u%o.net@example.org", c)[1] == b"u%o.net@example.org"
    assert rewrite(b"u%joe%example.org@relay.example.org",
                   controls(percenthack=[b"relay.example.org", b"joe%example.org"]))[1] \
        == b"u%joe@example.org"


def test_rewrite_without_at_appends_envnoathost():
    c = controls(envnoathost=b"example.org")
    assert rewrite(b"joe", c)[:2] == ("local", b"joe@example.org")
    assert rewrite(b"", c)[:2] == ("local", b"@example.org")
    assert rewrite(b"a@b@example.org", c)[:2] == ("local", b"a@b@example.org")


def test_control_files_envnoathost_and_defaults(tmp_path):
    site = Site(tmp_path, {"me": b"me.example\n", "locals": b"example.org\n",
                           "envnoathost": b"example.org  \n"})
    site.account(b"alias", files=[b".qmail-joe"])
    assert site.check(b"joe").address == b"joe@example.org"
    site.control("envnoathost", None)
    assert site.check(b"joe").status == REMOTE  # joe@me.example: me is not in locals
    site.control("locals", None)  # absent: me is the one local domain
    assert site.check(b"joe").status == ACCEPT
    site.control("me", None)
    verdict = site.check(b"joe@example.org")
    assert verdict.status == UNKNOWN and "qmail-send would not start" in verdict.reason


def test_control_list_format(tmp_path):
    """Trailing blanks stripped, leading kept, # lines and blank lines skipped,
    a CR kept (the entry never matches), a last line without LF counts."""
    site = Site(tmp_path, {"me": b"me.example\n",
                           "locals": b"#example.org\n\nblank.example  \t\n crlf.example\r\n"
                                     b"lead.example\n last.example"})
    site.account(b"alias", files=[b".qmail-u"])
    assert site.check(b"u@blank.example").status == ACCEPT
    assert site.check(b"u@last.example").status == REMOTE  # " last.example"
    assert site.check(b"u@example.org").status == REMOTE
    assert site.check(b"u@lead.example").status == ACCEPT
    site.control("locals", b"")  # present and empty: nothing is local
    assert site.check(b"u@me.example").status == REMOTE
    site.control("locals", b"a\0b\n")
    verdict = site.check(b"u@a")
    assert verdict.status == UNKNOWN and "NUL" in verdict.reason


def test_empty_local_part_at_a_virtual_domain(tmp_path):
    """prepend-@d: user prepend, dash "-", ext "": .qmail-, then .qmail-default."""
    site = Site(tmp_path, {"me": b"m\n", "locals": b"m\n",
                           "virtualdomains": b"v.example:prepend\n"})
    home = site.account(b"prepend")
    verdict = site.check(b"@v.example")
    assert (verdict.status, verdict.local, verdict.ext) == (REJECT, b"prepend-", b"")
    assert verdict.tried == [b".qmail-", b".qmail-default"]
    site.dotqmail(home, b".qmail-")
    assert site.check(b"@v.example").status == ACCEPT


# ================================================================== users/cdb (qmail-lspawn)


@pytest.fixture
def local(tmp_path):
    """A site where example.org is local and an alias user exists (no files)."""
    site = Site(tmp_path, {"me": b"example.org\n", "locals": b"example.org\n"})
    site.account(b"alias")
    return site


def entry(kind, loc, home, user=b"u", uid=b"1001", dash=b"-", ext=b""):
    return kind + loc + b":" + user + b":" + uid + b":100:" + home + b":" + dash + b":" + ext + b":"


def test_cdb_exact_entry_beats_wildcards(local):
    h1, h2 = local.home(b"h1"), local.home(b"h2")
    local.assign(entry(b"+", b"joe", h1, user=b"wild"), entry(b"=", b"joe", h2, user=b"exact"))
    assert local.check(b"JOE@example.org").user == b"exact"
    verdict = local.check(b"joex@example.org")
    assert (verdict.user, verdict.ext) == (b"wild", b"x")


def test_cdb_first_of_duplicate_keys_wins(local):
    h1, h2 = local.home(b"h1"), local.home(b"h2")
    local.assign(entry(b"=", b"joe", h1, user=b"first"), entry(b"=", b"JOE", h2, user=b"second"),
                 entry(b"+", b"x", h1, user=b"first"), entry(b"+", b"x", h2, user=b"second"))
    assert local.check(b"joe@example.org").user == b"first"
    assert local.check(b"xy@example.org").user == b"first"


def test_cdb_longest_wildcard_first_and_rest_keeps_case(local):
    h = local.home(b"h")
    local.dotqmail(h, b".qmail-pre-sub")
    local.assign(entry(b"+", b"a-", h, user=b"short", ext=b"pre-"),
                 entry(b"+", b"a-b-", h, user=b"long", ext=b"pre-"))
    verdict = local.check(b"A-B-Sub@example.org")
    assert (verdict.user, verdict.ext, verdict.status) == (b"long", b"pre-Sub", ACCEPT)
    assert verdict.tried == [b".qmail-pre-sub"]
    assert local.check(b"a-c@example.org").user == b"short"


def test_cdb_catch_all_means_no_passwd_lookup(local):
    h = local.home(b"h")
    local.assign(entry(b"+", b"", h, user=b"catch"))
    asked = []
    verdict = local.check(b"joe@example.org", getpw=lambda name: asked.append(name))
    assert (verdict.user, verdict.ext, verdict.status) == (b"catch", b"joe", REJECT)
    assert asked == []


def test_cdb_wildcard_shadows_a_passwd_account(local):
    h = local.home(b"h")
    local.account(b"joe-sub", files=[b".qmail-x"])
    local.assign(entry(b"+", b"joe-", h, user=b"wild"))
    verdict = local.check(b"joe-sub-x@example.org")
    assert (verdict.user, verdict.ext, verdict.status) == (b"wild", b"sub-x", REJECT)


def test_cdb_wildchars_quirk(local):
    """+joE: is stored as !joe but adds "E" to wildchars, and the lookup tests the
    lowercased "e": it never matches, until another + key ends in "e"."""
    h = local.home(b"h")
    local.assign(entry(b"+", b"joE", h, user=b"joe-wild"))
    assert local.check(b"joey@example.org").user == b"alias"
    local.assign(entry(b"+", b"joE", h, user=b"joe-wild"), entry(b"+", b"zze", h, user=b"z"))
    assert local.check(b"joey@example.org").user == b"joe-wild"


def test_cdb_entry_fields(local):
    h = local.home(b"h")
    os.mkdir(os.path.join(h, b".qmail-"))
    local.dotqmail(h, b".qmail-/x")
    local.assign(entry(b"=", b"nodash", h, dash=b""),
                 entry(b"=", b"slash", h, dash=b"-/", ext=b"x"),
                 entry(b"=", b"root", h, uid=b"0"), entry(b"=", b"uid", h, uid=b"007x"),
                 entry(b"=", b"noid", h, uid=b""), entry(b"=", b"rel", b"relative/home"))
    assert local.check(b"nodash@example.org").status == ACCEPT  # never "no mailbox"
    verdict = local.check(b"slash@example.org")
    assert (verdict.status, verdict.tried) == (ACCEPT, [b".qmail-/x"])
    assert local.check(b"uid@example.org").status == REJECT  # uid 7
    for rcpt in (b"root@example.org", b"noid@example.org"):
        verdict = local.check(rcpt)
        assert verdict.status == UNKNOWN and "uid 0" in verdict.reason
    verdict = local.check(b"rel@example.org")
    assert verdict.status == UNKNOWN and "not absolute" in verdict.reason


def cdb_without_the_empty_key(site, records):
    cdbmake.write_cdb(os.path.join(site.qmail, b"users", b"cdb"), records)


def test_cdb_trouble_is_unknown(local):
    h = local.home(b"h")
    path = os.path.join(local.qmail, b"users", b"cdb")
    cdb_without_the_empty_key(local, [(b"!joe\0", b"u\x001001\x00100\x00" + h + b"\x00-\x00")])
    verdict = local.check(b"joe@example.org")
    assert verdict.status == UNKNOWN and "no \"\" record" in verdict.reason
    cdb_without_the_empty_key(local, [(b"", b""), (b"!joe\0", b"u\x001001\x00100\x00" + h)])
    verdict = local.check(b"joe@example.org")
    assert verdict.status == UNKNOWN and "fewer than 6 fields" in verdict.reason
    with open(path, "wb") as f:
        f.write(b"\0" * 10)  # truncated
    verdict = local.check(b"joe@example.org")
    assert verdict.status == UNKNOWN and "truncated" in verdict.reason
    os.unlink(path)
    os.mkdir(path)  # EISDIR on read
    assert local.check(b"joe@example.org").status == UNKNOWN


def test_missing_users_cdb_uses_passwd(local):
    local.account(b"joe")
    assert not os.path.exists(os.path.join(local.qmail, b"users", b"cdb"))
    assert local.check(b"joe@example.org").user == b"joe"


# ================================================================== passwd (qmail-getpw)


def test_getpw_longest_account_first(local):
    local.account(b"joe", files=[b".qmail-sub-x"])
    local.account(b"joe-sub", files=[b".qmail-x"])
    verdict = local.check(b"JOE-Sub-X@example.org")
    assert (verdict.user, verdict.ext, verdict.status) == (b"joe-sub", b"X", ACCEPT)
    verdict = local.check(b"joe-other-x@example.org")
    assert (verdict.user, verdict.ext, verdict.status) == (b"joe", b"other-x", REJECT)


@pytest.mark.parametrize("rcpt,user,dash,ext,tried", [
    (b"joe--x", b"joe", b"-", b"-x", [b".qmail--x", b".qmail--default", b".qmail-default"]),
    (b"joe-", b"joe", b"-", b"", [b".qmail-", b".qmail-default"]),
    (b"-x", b"alias", b"-", b"-x", [b".qmail--x", b".qmail--default", b".qmail-default"]),
    (b"joe-a--b", b"joe", b"-", b"a--b", [b".qmail-a--b", b".qmail-a--default",
                                          b".qmail-a-default", b".qmail-default"]),
    (b"joe-a.b-c", b"joe", b"-", b"a.b-c", [b".qmail-a:b-c", b".qmail-a:b-default",
                                            b".qmail-default"]),
])
def test_getpw_splits_and_default_chain(local, rcpt, user, dash, ext, tried):
    local.account(b"joe")
    verdict = local.check(rcpt + b"@example.org")
    assert (verdict.status, verdict.user, verdict.dash, verdict.ext) == (REJECT, user, dash, ext)
    assert verdict.tried == tried


def test_getpw_who_is_not_a_user(local):
    local.account(b"root", uid=0, owner=0, files=[b".qmail-x"])
    local.account(b"gone", home=os.path.join(local.root, b"nowhere"))
    local.account(b"foreign", uid=OTHER_UID, owner=UID, files=[b".qmail-x"])
    local.account(b"Upper", files=[b".qmail-x"])
    for name in (b"root", b"gone", b"foreign", b"upper", b"Upper"):
        verdict = local.check(name + b"-x@example.org")
        assert (verdict.user, verdict.ext) == (b"alias", name + b"-x"), name


def test_getpw_account_names_up_to_31_bytes(local):
    local.account(b"a" * 31)
    local.account(b"b" * 32)
    assert local.check(b"a" * 31 + b"@example.org").user == b"a" * 31
    assert local.check(b"b" * 32 + b"@example.org").user == b"alias"


def test_getpw_conf_break(local):
    local.account(b"joe", files=[b".qmail-sos"])
    verdict = local.check(b"joe-sos@example.org", brk=b"")  # no extensions
    assert (verdict.user, verdict.ext, verdict.status) == (b"alias", b"joe-sos", REJECT)
    verdict = local.check(b"joe+sos@example.org", brk=b"+")
    assert (verdict.user, verdict.dash, verdict.ext, verdict.status) == (
        b"joe", b"-", b"sos", ACCEPT)  # the dash is always "-"
    # the -default chain splits on "-" whatever conf-break is
    assert local.check(b"joe+sos-x@example.org", brk=b"+").tried == [
        b".qmail-sos-x", b".qmail-sos-default", b".qmail-default"]


def test_getpw_other_alias_user(local):
    local.account(b"catch", files=[b".qmail-anything"])
    assert local.check(b"anything@example.org", usera=b"catch").status == ACCEPT
    del local.passwd[b"alias"]
    verdict = local.check(b"anything@example.org")
    assert verdict.status == UNKNOWN and "Unable to find alias user" in verdict.reason


def test_getpw_alias_user_is_not_checked_but_its_home_is(local):
    local.passwd[b"alias"] = (b"alias", 0, 0, local.passwd[b"alias"][3])
    assert local.check(b"x@example.org").status == UNKNOWN
    local.passwd[b"alias"] = (b"alias", OTHER_UID, 0, os.path.join(local.root, b"nowhere"))
    verdict = local.check(b"x@example.org")
    assert verdict.status == UNKNOWN and "cannot stat home" in verdict.reason


def test_getpw_lookup_error_is_unknown(local):
    def broken(name):
        raise OSError(5, "Input/output error", "/etc/passwd")
    verdict = local.check(b"joe@example.org", getpw=broken)
    assert verdict.status == UNKNOWN and "/etc/passwd" in verdict.reason


# ================================================================== .qmail search (qmail-local)


@pytest.fixture
def joe(local):
    """local with an account joe; returns (site, joe's home)."""
    return local, local.account(b"joe")


def test_dotqmail_kinds_of_file(joe):
    site, home = joe
    os.mkdir(os.path.join(home, b".qmail-dir"))
    os.mkfifo(os.path.join(home, b".qmail-fifo"))
    target = site.dotqmail(home, b"target")
    os.symlink(target, os.path.join(home, b".qmail-link"))
    os.symlink(b"nowhere", os.path.join(home, b".qmail-dangling"))
    site.dotqmail(home, b".qmail-sub")  # a file where a directory would be needed
    os.mkdir(os.path.join(home, b".qmail-d"))
    site.dotqmail(home, b".qmail-d/x")
    assert site.check(b"joe-dir@example.org").status == REJECT
    assert site.check(b"joe-fifo@example.org").status == REJECT
    assert site.check(b"joe-link@example.org").status == ACCEPT
    assert site.check(b"joe-dangling@example.org").status == REJECT
    assert site.check(b"joe-sub/x@example.org").status == REJECT  # ENOTDIR: absent
    assert site.check(b"joe-d/x@example.org").status == ACCEPT
    site.dotqmail(home, b".qmail-Upper")
    assert site.check(b"joe-Upper@example.org").status == REJECT  # looks for .qmail-upper


def test_dotqmail_writable_files_and_homes_are_deferrals(joe):
    site, home = joe
    site.dotqmail(home, b".qmail-w", mode=0o646)
    verdict = site.check(b"joe-w@example.org")
    assert verdict.status == UNKNOWN and "writable" in verdict.reason
    assert site.check(b"joe-w@example.org", patrn=0o000).status == ACCEPT
    os.chmod(home, 0o757)
    verdict = site.check(b"joe-nosuch@example.org")
    assert verdict.status == UNKNOWN and "writable or sticky" in verdict.reason
    os.chmod(home, 0o755 | 0o1000)
    assert site.check(b"joe-nosuch@example.org").status == UNKNOWN
    os.chmod(home, 0o775)
    assert site.check(b"joe-nosuch@example.org").status == REJECT
    assert site.check(b"joe-nosuch@example.org", patrn=0o020).status == UNKNOWN


def test_dotqmail_home_that_is_no_directory(local):
    path = os.path.join(local.root, b"file")
    with open(path, "wb"):
        pass
    local.assign(entry(b"=", b"f", path))
    verdict = local.check(b"f@example.org")
    assert verdict.status == UNKNOWN and "not a directory" in verdict.reason
    local.assign(entry(b"=", b"f", os.path.join(local.root, b"missing")))
    assert local.check(b"f@example.org").status == UNKNOWN


def test_no_extension_needs_no_file(joe):
    site, _ = joe
    verdict = site.check(b"joe@example.org")
    assert (verdict.status, verdict.tried) == (ACCEPT, None)


# ================================================================== permissions


def unprivileged(fn):
    """fn() run as nobody (when the tests run as root; else as ourselves) in a
    child process; returns its (picklable) result."""
    if not ROOT:
        return fn()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(w, pickle.dumps(fn()))
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)


@pytest.fixture
def open_site():
    """A site in a directory nobody may search (tmp_path is not: its parents are 0700)."""
    root = tempfile.mkdtemp(prefix="rcptcheck-perm-")
    os.chmod(root, 0o755)
    site = Site(root, {"me": b"example.org\n", "locals": b"example.org\n"})
    site.account(b"alias", files=[b".qmail-known"])
    try:
        yield site
    finally:
        shutil.rmtree(root, ignore_errors=True)


def status_and_reason(site, rcpt):
    def run():
        verdict = site.check(rcpt)
        return verdict.status, verdict.reason
    return run


@pytest.mark.skipif(not ROOT, reason="needs root to make homes others cannot search")
def test_unsearchable_home_is_unknown_for_extensions_only(open_site):
    open_site.account(b"joe", files=[b".qmail-sos"], mode=0o700)
    status, reason = unprivileged(status_and_reason(open_site, b"joe-nosuch@example.org"))
    assert status == UNKNOWN and "Permission denied" in reason and ".qmail-nosuch" in reason
    assert unprivileged(status_and_reason(open_site, b"joe@example.org"))[0] == ACCEPT
    assert unprivileged(status_and_reason(open_site, b"nosuch@example.org"))[0] == REJECT
    assert open_site.check(b"joe-nosuch@example.org").status == REJECT  # root sees it all


@pytest.mark.skipif(not ROOT, reason="needs root to make files others cannot read")
def test_what_the_session_user_cannot_read_is_unknown(open_site):
    open_site.account(b"joe")
    os.chmod(os.path.join(open_site.root, b"homes"), 0o700)  # homes out of reach
    status, reason = unprivileged(status_and_reason(open_site, b"joe-x@example.org"))
    assert status == UNKNOWN and "cannot stat home" in reason
    os.chmod(os.path.join(open_site.root, b"homes"), 0o755)
    open_site.assign(entry(b"=", b"nobody-here", open_site.home(b"h")))
    os.chmod(os.path.join(open_site.qmail, b"users", b"cdb"), 0o600)
    status, reason = unprivileged(status_and_reason(open_site, b"nobody-here@example.org"))
    assert status == UNKNOWN and "users/cdb" in reason
    os.chmod(os.path.join(open_site.qmail, b"control", b"locals"), 0o600)
    status, reason = unprivileged(status_and_reason(open_site, b"x@example.org"))
    assert status == UNKNOWN and "control/locals" in reason


@pytest.mark.skipif(not ROOT, reason="needs root to make files others cannot read")
def test_unreadable_default_file_is_unknown_when_a_backend_asks(open_site):
    """Without a backend the file only has to exist (stat); a backend needs
    to read it to see whether it hands the mail to a program."""
    open_site.control("virtualdomains", b"virt.example:v\n")
    home = open_site.account(b"v")
    open_site.dotqmail(home, b".qmail-default", PROGRAM_DEFAULT, mode=0o600)
    amap = os.path.join(open_site.root, b"map")
    with open(amap, "wb") as f:
        f.write(b"virt.example\n")

    def run(**kw):
        verdict = open_site.check(b"ann@virt.example", **kw)
        return verdict.status, verdict.reason
    assert unprivileged(run) == (ACCEPT, ".qmail-default exists")
    status, reason = unprivileged(lambda: run(address_map=AddressMap(amap)))
    assert status == UNKNOWN and "to ask the backends: Permission denied" in reason
    assert run(address_map=AddressMap(amap))[0] == REJECT  # root can read it


# ================================================================== backends


PROGRAM_DEFAULT = b"# catch-all\n|/usr/local/bin/deliver-somewhere\n"


@pytest.fixture
def vsite(tmp_path):
    """A virtual domain virt.example handed to user v (uid, own home) whose
    .qmail-default runs a program, and a domain mbox.example whose .qmail-default
    delivers to a Maildir."""
    site = Site(tmp_path, {"me": b"m\n", "locals": b"m\n",
                           "virtualdomains": b"virt.example:v\nmbox.example:mb\n"})
    home = site.account(b"v", files=[b".qmail-listed-exact"])
    site.dotqmail(home, b".qmail-default", PROGRAM_DEFAULT)
    mb = site.account(b"mb")
    site.dotqmail(mb, b".qmail-default", b"./Maildir/\n")
    return site


def write_map(site, name, lines):
    path = os.path.join(site.root, name)
    with open(path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))
    return path


def test_program_default_without_backends_is_accepted(vsite):
    verdict = vsite.check(b"anyone@virt.example")
    assert (verdict.status, verdict.found) == (ACCEPT, b".qmail-default")


@pytest.mark.parametrize("kind", ["text", "cdb"])
def test_address_map(vsite, kind):
    keys = [b"virt.example", b"joe@virt.example", b"mb.example"]
    if kind == "text":
        path = write_map(vsite, b"valid", [b"# valid recipients", b"", b"VIRT.example OK",
                                           b"joe@virt.example\tOK", b"mbox.example"])
    else:
        path = os.path.join(vsite.root, b"valid.cdb")
        cdbmake.write_cdb(path, [(keys[0], b"OK"), (keys[1] + b"\0", b"OK"),
                                 (b"mbox.example", b"")])
    amap = AddressMap(path)
    assert vsite.check(b"JOE@Virt.Example", address_map=amap).status == ACCEPT
    verdict = vsite.check(b"ann@virt.example", address_map=amap)
    assert verdict.status == REJECT and "RCPTCHECK_MAP" in verdict.reason
    # an exact .qmail file is never second-guessed, nor a Maildir catch-all
    assert vsite.check(b"listed-exact@virt.example", address_map=amap).status == ACCEPT
    assert vsite.check(b"ann@mbox.example", address_map=amap).status == ACCEPT


def test_address_map_domain_catch_all_and_undeclared_domains(vsite):
    amap = AddressMap(write_map(vsite, b"map", [b"virt.example", b"@virt.example"]))
    assert vsite.check(b"ann@virt.example", address_map=amap).status == ACCEPT
    amap = AddressMap(write_map(vsite, b"map", [b"other.example", b"ann@other.example"]))
    verdict = vsite.check(b"ann@virt.example", address_map=amap)
    assert verdict.status == UNKNOWN and "program or forward" in verdict.reason


def test_address_map_trouble_is_unknown(vsite):
    for path in (b"/nonexistent/map", b"/nonexistent/map.cdb"):
        verdict = vsite.check(b"ann@virt.example", address_map=AddressMap(path))
        assert verdict.status == UNKNOWN and "cannot read RCPTCHECK_MAP" in verdict.reason
    bad = os.path.join(vsite.root, b"bad.cdb")
    with open(bad, "wb") as f:
        f.write(b"short")
    verdict = vsite.check(b"ann@virt.example", address_map=AddressMap(bad))
    assert verdict.status == UNKNOWN and "truncated" in verdict.reason


def test_forward_default_consults_the_map(vsite):
    vsite.dotqmail(vsite.passwd[b"v"][3], b".qmail-default", b"&inside@backend.example\n")
    amap = AddressMap(write_map(vsite, b"map", [b"virt.example"]))
    assert vsite.check(b"ann@virt.example", address_map=amap).status == REJECT
    vsite.dotqmail(vsite.passwd[b"v"][3], b".qmail-default",
                   b"&inside@backend.example\n./Maildir/\n")
    assert vsite.check(b"ann@virt.example", address_map=amap).status == ACCEPT


@pytest.fixture
def vpop(tmp_path):
    """vpopmail's layout (vadddomain): virtualdomains vpop.example:vpop.example,
    assign +vpop.example-, the domain directory with .qmail-default running
    vdelivermail, an alias domain alias.example, vpasswd.cdb with joe and bob."""
    site = Site(tmp_path, {"me": b"m\n", "locals": b"m\n",
                           "virtualdomains": b"vpop.example:vpop.example\n"
                                             b"alias.example:alias.example\n"})
    site.account(b"alias")
    domain = site.home(b"domains-vpop.example", owner=VPOP_UID, mode=0o700)
    site.dotqmail(domain, b".qmail-default", VDELIVERMAIL)
    site.dotqmail(domain, b".qmail-list")
    site.assign(b"+vpop.example-:vpop.example:89:89:" + domain + b":-::",
                b"+alias.example-:vpop.example:89:89:" + domain + b":-::")
    cdbmake.write_cdb(os.path.join(domain, b"vpasswd.cdb"),
                      [(b"joe", b"$1$x:1:0:Joe:" + domain + b"/joe:NOQUOTA"),
                       (b"bob", b"$1$y:1:0:Bob:" + domain + b"/bob:NOQUOTA")])
    site.domain = domain
    return site


@pytest.mark.parametrize("rcpt,status", [
    (b"joe@vpop.example", ACCEPT),
    (b"JOE@VPOP.example", ACCEPT),
    (b"joe-folder@vpop.example", ACCEPT),   # QMAIL_EXT: joe
    (b"ann@vpop.example", REJECT),
    (b"ann-joe@vpop.example", REJECT),
    (b"list@vpop.example", ACCEPT),         # .qmail-list (qmailadmin)
    (b"bob@alias.example", ACCEPT),
    (b"ann@alias.example", REJECT),
])
def test_vpopmail_backend(vpop, rcpt, status):
    verdict = vpop.check(rcpt, vpopmail=True)
    assert verdict.status == status, verdict.reason


def test_vpopmail_backend_off_accepts_everything(vpop):
    assert vpop.check(b"ann@vpop.example").status == ACCEPT


def test_vpopmail_text_vpasswd_and_no_user_database(vpop):
    os.unlink(os.path.join(vpop.domain, b"vpasswd.cdb"))
    verdict = vpop.check(b"ann@vpop.example", vpopmail=True)
    assert verdict.status == UNKNOWN and "no vpasswd.cdb or vpasswd" in verdict.reason
    with open(os.path.join(vpop.domain, b"vpasswd"), "wb") as f:
        f.write(b"joe:$1$x:1:0:Joe:/d/joe:NOQUOTA\n")
    assert vpop.check(b"joe@vpop.example", vpopmail=True).status == ACCEPT
    assert vpop.check(b"ann@vpop.example", vpopmail=True).status == REJECT


@pytest.mark.parametrize("line,status", [
    (b"| /home/vpopmail/bin/vdelivermail '' delete\n", ACCEPT),
    (b"| /home/vpopmail/bin/vdelivermail '' postmaster@vpop.example\n", ACCEPT),
    (b"| /home/vpopmail/bin/vdelivermail '' /home/vpopmail/domains/x/postmaster\n", ACCEPT),
    (b"|/home/vpopmail/bin/vdelivermail \"\" bounce-no-mailbox\n", REJECT),
    (b"| vdelivermail '' bounce-no-mailbox\n./Maildir/\n", ACCEPT),
    (b"| vdelivermail '' bounce-no-mailbox\n| other\n", UNKNOWN),
    (b"| vdelivermail 'unbalanced bounce-no-mailbox\n", UNKNOWN),
    (b"| \"/home/vpopmail/bin/vdelivermail\" \"\" bounce-no-mailbox\n", REJECT),
    (b"|vdelivermail  ''   'bounce-no-mailbox'  \n", REJECT),
    (b"| $VPOPMAIL/bin/vdelivermail '' bounce-no-mailbox\n", UNKNOWN),
    (b"| vdelivermail '' bounce-no-mailbox # the default\n", UNKNOWN),
    (b"| vdelivermail '' bounce-no-mailbox;true\n", UNKNOWN),
    (b"| vdelivermail bounce-no-mailbox\n", UNKNOWN),  # one argument: it defers
    (b"| preline /usr/bin/procmail\n", UNKNOWN),
])
def test_vpopmail_default_lines(vpop, line, status):
    vpop.dotqmail(vpop.domain, b".qmail-default", line)
    assert vpop.check(b"ann@vpop.example", vpopmail=True).status == status


def test_vpopmail_unreadable_vpasswd_is_unknown(vpop):
    path = os.path.join(vpop.domain, b"vpasswd.cdb")
    os.unlink(path)
    os.mkdir(path)
    verdict = vpop.check(b"ann@vpop.example", vpopmail=True)
    assert verdict.status == UNKNOWN and "vpopmail" in verdict.reason


def test_map_before_vpopmail(vpop):
    amap = AddressMap(write_map(vpop, b"map", [b"vpop.example", b"ann@vpop.example"]))
    assert vpop.check(b"ann@vpop.example", vpopmail=True, address_map=amap).status == ACCEPT
    assert vpop.check(b"joe@vpop.example", vpopmail=True, address_map=amap).status == REJECT


# ================================================================== configuration


def test_from_environ_defaults():
    r = Resolver.from_environ({})
    assert (r.qmail, r.brk, r.usera, r.patrn) == (b"/var/qmail", b"-", b"alias", 0o002)
    assert (r.address_map, r.vpopmail) == (None, False)


def test_from_environ_settings(tmp_path):
    warnings = []
    r = Resolver.from_environ({b"QMAILHOME": b"/q", b"RCPTCHECK_AUTO_BREAK": b"",
                               b"RCPTCHECK_AUTO_USERA": b"catch",
                               b"RCPTCHECK_AUTO_PATRN": b"022",
                               b"RCPTCHECK_PASSWD": b"/etc/pw", b"RCPTCHECK_MAP": b"/m.cdb",
                               b"RCPTCHECK_VPOPMAIL": b"1"}, warn=warnings.append)
    assert (r.qmail, r.brk, r.usera, r.patrn) == (b"/q", b"", b"catch", 0o022)
    assert isinstance(r.getpw, PasswdFile) and r.getpw.path == b"/etc/pw"
    assert r.address_map.path == b"/m.cdb" and r.vpopmail
    assert warnings == []
    r = Resolver.from_environ({b"RCPTCHECK_AUTO_PATRN": b"rw", b"RCPTCHECK_AUTO_BREAK": b"+=",
                               b"RCPTCHECK_VPOPMAIL": b"0"}, warn=warnings.append)
    assert (r.patrn, r.brk, r.vpopmail) == (0o002, b"+", False)
    assert warnings == ["RCPTCHECK_AUTO_PATRN='rw' is not an octal mode; using 002"]


def test_passwd_file(tmp_path):
    path = tmp_path / "passwd"
    path.write_bytes(b"joey:x:5:5::/home/joey:/bin/sh\njoe:x:oops:100::/bad:/bin/sh\n"
                     b"# comment\n+nis::0:0:::\njoe:x:1001:100:Joe:/home/joe:/bin/sh\n"
                     b"joe:x:1002:100:Second:/home/joe2:/bin/sh\nshort:x:1:1\n"
                     b"-x:x:1:1::/h:/bin/sh\nbad:x:one:1::/h:/bin/sh\n"
                     b"root:x:0:0:root:/root:/bin/sh")
    pw = PasswdFile(str(path))
    assert pw(b"joe") == (b"joe", 1001, 100, b"/home/joe")  # the first good line
    assert pw(b"root") == (b"root", 0, 0, b"/root")  # last line, no LF
    assert pw(b"joey") == (b"joey", 5, 5, b"/home/joey")
    assert [pw(name) for name in (b"+nis", b"short", b"bad", b"nosuch", b"-x", b"", b"jo",
                                  b"joe:x")] == [None] * 8
    with pytest.raises(OSError):
        PasswdFile(str(tmp_path / "missing"))(b"joe")


def test_passwd_file_through_the_resolver(spec):
    path = spec.passwd_file()
    resolver = Resolver(qmail=spec.qmail, getpw=PasswdFile(path))
    assert resolver.check(b"joe-sos@example.org").status == ACCEPT
    assert resolver.check(b"joe-nosuch@example.org").status == REJECT
    verdict = Resolver(qmail=spec.qmail, getpw=PasswdFile(path + b"-gone")).check(
        b"joe@example.org")
    assert verdict.status == UNKNOWN and "passwd-gone" in verdict.reason


def test_system_passwd_lookup(tmp_path):
    """The default lookup is getpwnam: root has uid 0 (never a user), and an
    account that does not exist leads to the alias user (here: none)."""
    site = Site(tmp_path, {"me": b"example.org\n", "locals": b"example.org\n"})
    verdict = site.resolver(getpw=Resolver().getpw).check(b"root@example.org")
    assert verdict.user in (None, b"alias")  # None: no alias account on this machine
    assert Resolver().getpw(b"no-such-account-xyz") is None
    assert Resolver().getpw(b"root")[:2] == (b"root", 0)


def test_nul_in_the_address_cuts_it(spec):
    assert spec.check(b"joe-sos@example.org\0-nosuch").status == ACCEPT


# ================================================================== cdbmake / newu


def test_assign_records_format():
    records = cdbmake.assign_records(
        b"=Joe:joe:1001:100:/home/joe:-::\n"
        b"+Vpop.Example-:vpop:89:89:/d:-::trailing:text\n"
        b"xjoe2:j2:1:1:/h2:::\n"
        b"+joE:e:1:1:/h:-::\n"
        b"+:catch:1:1:/c:-::\n"
        b".\nanything after the dot\n")
    assert records == [
        (b"!joe\0", b"joe\x001001\x00100\x00/home/joe\x00-\x00"),
        (b"!vpop.example-", b"vpop\x0089\x0089\x00/d\x00-\x00"),
        (b"!joe2\0", b"j2\x001\x001\x00/h2\x00\x00"),
        (b"!joe", b"e\x001\x001\x00/h\x00-\x00"),
        (b"!", b"catch\x001\x001\x00/c\x00-\x00"),
        (b"", b"-E"),
    ]


@pytest.mark.parametrize("text", [
    b"=joe:joe:1:1:/h:-::\n",              # no "." line
    b"=joe:joe:1:1:/h:-::\n\n.\n",         # blank line
    b"# comment\n.\n",                     # no colon
    b":joe:1:1:/h:-::\n.\n",               # starts with ":"
    b"=joe:joe:1:1:/h:-:\n.\n",            # 6 colons
    b"=j\0oe:joe:1:1:/h:-::\n.\n",         # NUL
    b"=joe:joe:1:1:/h:-::",                # no LF and no "."
])
def test_assign_bad_format(text):
    with pytest.raises(cdbmake.AssignError):
        cdbmake.assign_records(text)


def test_newu_leaves_users_cdb_alone_on_bad_format(tmp_path):
    site = Site(tmp_path)
    site.assign(b"=joe:joe:1:1:/h:-::")
    path = os.path.join(site.qmail, b"users", b"cdb")
    with open(path, "rb") as f:
        before = f.read()
    with open(os.path.join(site.qmail, b"users", b"assign"), "wb") as f:
        f.write(b"=joe:joe:1:1:/h:-::\n")
    with pytest.raises(cdbmake.AssignError):
        cdbmake.newu(site.qmail)
    with open(path, "rb") as f:
        assert f.read() == before
    assert not os.path.exists(path + b".tmp")


def test_cdb_round_trip_with_duplicates_and_empty_tables(tmp_path):
    records = [(b"k%d" % (i % 50), b"v%d" % i) for i in range(200)] + [(b"", b"empty")]
    path = str(tmp_path / "t.cdb")
    cdbmake.write_cdb(path, records)
    db = Cdb.open(path)
    try:
        for i in range(50):
            assert db.get(b"k%d" % i) == b"v%d" % i  # the first of each key
        assert db.get(b"") == b"empty" and db.get(b"nope") is None
    finally:
        os.close(db.fd)
    assert cdbmake.cdb_bytes([])[:8] == (2048).to_bytes(4, "little") + b"\0\0\0\0"


def test_cdb_bytes_match_cdbmake(tmp_path):
    """Byte for byte what tinycdb's `cdb -c` (cdbmake's algorithm) writes."""
    if shutil.which("cdb") is None:
        pytest.skip("tinycdb's cdb is not installed")
    records = [(b"!joe\0", b"joe\x001\x001\x00/h\x00-\x00"), (b"!", b"x"), (b"", b"-"),
               (b"dup", b"1"), (b"dup", b"2")] + [(b"key%d" % i, b"%d" % i) for i in range(300)]
    src = b"".join(b"+%d,%d:%s->%s\n" % (len(k), len(d), k, d) for k, d in records) + b"\n"
    path = str(tmp_path / "ref.cdb")
    subprocess.run(["cdb", "-c", path], input=src, check=True)
    with open(path, "rb") as f:
        assert f.read() == cdbmake.cdb_bytes(records)


# ================================================================== the property


class Model:
    """A random qmail installation, as data: what the files say, not the files."""

    def __init__(self, me, envnoathost, locals_, percenthack, vdoms, accounts, assign, files,
                 brk, usera):
        self.me = me                    # bytes or None (no control/me)
        self.envnoathost = envnoathost  # bytes or None
        self.locals = locals_           # list or None (no control/locals)
        self.percenthack = percenthack  # list
        self.vdoms = vdoms              # virtualdomains lines
        self.accounts = accounts        # name -> (uid, home key, "own"|"foreign"|"missing")
        self.assign = assign            # None (no users/cdb) or [(kind, loc, user, uid, home
        self.files = files              #   key, dash, ext)]; home key -> set of .qmail names
        self.brk = brk
        self.usera = usera

    def __repr__(self):
        return "Model({})".format(", ".join(f"{k}={v!r}" for k, v in vars(self).items()))


DOMAINS = [b"example.org", b"Example.ORG", b"mail.example.org", b"virt.example.com",
           b"x.wild.example.com", b"a.x.wild.example.com", b"wild.example.com",
           b"sub.wild.example.com", b"relay.example.org", b"other.net"]
VDOM_LINES = [b"virt.example.com:vjoe", b"virt.example.com:joe", b".wild.example.com:w",
              b"sub.wild.example.com:", b"bob@virt.example.com:joe", b"Bob@Virt.example.com:o",
              b":catch", b"other.net:", b"example.org:joe", b" virt.example.com:e",
              b"x.wild.example.com:w-x", b"relay.example.org:jo", b"VIRT.example.com:o"]
NAMES = [b"joe", b"vjoe", b"w", b"catch", b"joe-sub", b"o", b"e", b"jo", b"x", b"alias",
         b"root"]
HOMES = [b"h-" + n for n in NAMES] + [b"h-extra"]
FILES = [b".qmail", b".qmail-", b".qmail-default", b".qmail-x", b".qmail-e", b".qmail-o",
         b".qmail-x-default", b".qmail-sub", b".qmail--default", b".qmail-x:e", b".qmail-joe",
         b".qmail-info", b".qmail-ex", b".qmail-X", b".qmail-e-default", b".qmail-bob",
         b".qmail-joe-x", b".qmail-w-x-o", b".qmail-o-default", b".qmail-jo",
         b".qmail-joe-default", b".qmail-default"]
PIECES = [b"joe", b"j", b"o", b"e", b"x", b"-", b".", b"bob", b"info", b"X", b"O", b"%",
          b"sub", b"w", b"@", b"+", b"catch", b"vjoe"]


@st.composite
def models(draw):
    names = draw(st.lists(st.sampled_from(NAMES), unique=True))
    if b"alias" not in names and draw(st.integers(0, 3)):
        names.append(b"alias")  # most sites have one
    accounts = {}
    for name in names:
        odds = 9 if name == b"alias" else 3  # in 1 + odds: uid 0, foreign or missing home
        uid = draw(st.sampled_from([UID] * odds + [0]))
        accounts[name] = (uid, b"h-" + name,
                          draw(st.sampled_from(["own"] * odds + ["foreign", "missing"])))
    assign = None
    if draw(st.booleans()):
        assign = draw(st.lists(st.tuples(
            st.sampled_from([b"=", b"+"]),
            st.sampled_from([b"joe.x", b"joe-", b"jo", b"joE", b"joE", b"zze", b"e", b"",
                             b"vjoe-", b"JOE", b"o"]),
            st.sampled_from([b"u1", b"u2"]),
            st.sampled_from([b"1001", b"1001", b"0", b"7x"]),
            st.sampled_from(HOMES),
            st.sampled_from([b"-", b"-", b""]),
            st.sampled_from([b"", b"x", b"sub-"])), max_size=5))
    files = {home: set() for home in HOMES}
    for home, name in draw(st.lists(st.tuples(st.sampled_from(HOMES), st.sampled_from(FILES)),
                                    min_size=4, max_size=40)):
        files[home].add(name)
    return Model(
        me=draw(st.sampled_from([b"mail.example.org", b"example.org", None])),
        envnoathost=draw(st.sampled_from([None, None, b"example.org", b"other.net"])),
        locals_=draw(st.one_of(st.just([b"example.org", b"mail.example.org"]),
                               st.just([b"Example.ORG"]), st.none(),
                               st.lists(st.sampled_from(DOMAINS), max_size=3))),
        percenthack=draw(st.lists(st.sampled_from([b"relay.example.org", b"other.net"]),
                                  max_size=1)),
        vdoms=draw(st.lists(st.sampled_from(VDOM_LINES), max_size=4)),
        accounts=accounts, assign=assign, files=files,
        brk=draw(st.sampled_from([b"-", b"-", b"+", b""])),
        usera=draw(st.sampled_from([b"alias", b"alias", b"alias", b"catch"])))


EXTENSIONS = [b"", b"-x", b"-e", b"-x-o", b"-info", b"-", b"--default", b"+x", b"-X",
              b"-joe-x", b".x", b"-sub-x", b"-o-e"]
local_parts = st.one_of(
    st.tuples(st.sampled_from(NAMES + [b"JOE", b"Vjoe", b"bob", b"info"]),
              st.sampled_from(EXTENSIONS)).map(b"".join),
    st.lists(st.sampled_from(PIECES), max_size=4).map(b"".join))
addresses = st.tuples(local_parts,
                      st.sampled_from(DOMAINS + [b"example.org"] * 4 + [None])).map(
    lambda t: t[0] if t[1] is None else t[0] + b"@" + t[1])


def build(model, root):
    """The files of model under root; returns (Site, home key -> path)."""
    lines = {"me": None if model.me is None else [model.me],
             "envnoathost": None if model.envnoathost is None else [model.envnoathost],
             "locals": model.locals, "percenthack": model.percenthack,
             "virtualdomains": model.vdoms}
    site = Site(root, {name: None if value is None else b"".join(v + b"\n" for v in value)
                       for name, value in lines.items()})
    paths = {}
    for key in HOMES:
        paths[key] = site.home(key)
        for name in model.files[key]:
            site.dotqmail(paths[key], name)
    for name, (uid, key, state) in model.accounts.items():
        home = paths[key] if state != "missing" else os.path.join(site.root, b"missing", name)
        foreign = state == "foreign" and uid != 0  # the home belongs to someone else
        site.passwd[name] = (name, OTHER_UID if foreign else uid, 100, home)
    if model.assign is not None:
        site.assign(*(kind + loc + b":" + user + b":" + uid + b":100:" + paths[home] + b":"
                      + dash + b":" + ext + b":"
                      for kind, loc, user, uid, home, dash, ext in model.assign))
    return site, paths


def reference_verdict(model, rcpt):
    """What qmail does with rcpt in model, from the spec's prose (§5-§8), written
    without the resolver's code: (status, home key, dash, ext)."""
    # qmail-send's controls
    if model.locals is None and model.me is None:
        return UNKNOWN, None, None, None
    local_domains = [d.lower() for d in (model.locals if model.locals is not None
                                         else [model.me])]
    if model.envnoathost is not None:
        default_host = model.envnoathost
    else:
        default_host = model.me if model.me is not None else b"envnoathost"
    # rewrite: the percent hack, then locals, then virtualdomains
    addr = rcpt if b"@" in rcpt else rcpt + b"@" + default_host
    while True:
        left, _, domain = addr.rpartition(b"@")
        if domain.lower() not in [p.lower() for p in model.percenthack] or b"%" not in left:
            break
        head, _, tail = left.rpartition(b"%")
        addr = head + b"@" + tail
    left, _, domain = addr.rpartition(b"@")
    if domain.lower() in local_domains:
        local_part = left
    else:
        table = {}
        for line in model.vdoms:  # later lines overwrite earlier ones
            if b":" in line:
                key, value = line.split(b":", 1)
                table[key.lower()] = value
        tries = [addr.lower(), domain.lower()]
        tries += [domain[i:].lower() for i in range(1, len(domain)) if domain[i:i + 1] == b"."]
        tries.append(b"")
        hits = [table[t] for t in tries if t in table]
        if not hits or hits[0] == b"":
            return REMOTE, None, None, None
        local_part = hits[0] + b"-" + left
    if local_part == b"":
        return TRASH, None, None, None
    # qmail-lspawn: the assign entries, as qmail-users(5) describes them
    who = None
    if model.assign is not None:
        low = local_part.lower()
        wildchars = {loc[-1] for kind, loc, *_ in model.assign if kind == b"+" and loc}
        exact = [e for e in model.assign if e[0] != b"+" and e[1].lower() == low]
        if exact:
            who = (exact[0], b"")
        else:
            for n in range(len(low), -1, -1):
                if n and low[n - 1] not in wildchars:
                    continue
                wild = [e for e in model.assign if e[0] == b"+" and e[1].lower() == low[:n]]
                if wild:
                    who = (wild[0], local_part[n:])
                    break
    if who is not None:
        (_, _, _, uid, home, dash, ext), rest = who
        uid_value = int(uid[:len(uid) - len(uid.lstrip(b"0123456789"))] or b"0")
        if uid_value == 0:
            return UNKNOWN, None, None, None
        ext = ext + rest
    else:
        # qmail-getpw: every prefix that ends before a break byte, longest first
        ends = [len(local_part)]
        if model.brk:
            ends += [k for k in range(len(local_part) - 1, -1, -1)
                     if local_part[k:k + 1] == model.brk]
        for end in ends:
            account = model.accounts.get(local_part[:end].lower()) if end < 32 else None
            if account and account[0] != 0 and account[2] == "own":
                home = account[1]
                dash = b"" if end == len(local_part) else b"-"
                ext = local_part[end + 1:]
                break
        else:
            alias = model.accounts.get(model.usera)
            if alias is None or alias[0] == 0 or alias[2] == "missing":
                return UNKNOWN, None, None, None
            home, dash, ext = alias[1], b"-", local_part
    # qmail-local
    if dash == b"":
        return ACCEPT, home, dash, ext
    safe = ext.lower().replace(b".", b":")
    parts = safe.split(b"-")
    wanted = [b".qmail" + dash + safe]
    for k in range(len(parts) - 1, -1, -1):
        wanted.append(b".qmail" + dash + b"".join(p + b"-" for p in parts[:k]) + b"default")
    if any(name in model.files[home] for name in wanted):
        return ACCEPT, home, dash, ext
    return REJECT, home, dash, ext


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models(), st.lists(addresses, min_size=1, max_size=8))
def test_resolver_agrees_with_the_reference(model, rcpts):
    with tempfile.TemporaryDirectory(prefix="rcptcheck-prop-") as root:
        site, paths = build(model, root)
        resolver = site.resolver(brk=model.brk, usera=model.usera)
        for rcpt in rcpts:
            verdict = resolver.check(rcpt)
            status, home, dash, ext = reference_verdict(model, rcpt)
            assert verdict.status == status, (rcpt, verdict.reason)
            if status in (ACCEPT, REJECT):
                assert (verdict.home, verdict.dash, verdict.ext) == (paths[home], dash, ext)
