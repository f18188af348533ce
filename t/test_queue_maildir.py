"""bin/qmail-queue-maildir over pipes: message on fd 0, envelope on fd 1, exit codes of
qmail-queue(8), and the delivered file in Maildir/new."""

import os
import re
import subprocess

import pytest

from helpers import QUEUE_MAILDIR, RE_DATE


def deliver(tmp_path, message, envelope, maildir=None):
    """Run qmail-queue-maildir; returns (exit status, [files in new/], stderr)."""
    maildir = maildir or str(tmp_path / "Maildir")
    env_file = tmp_path / "envelope"
    env_file.write_bytes(envelope)
    with open(env_file, "rb") as env_fd:
        p = subprocess.run([QUEUE_MAILDIR], input=message, stdout=env_fd,
                           stderr=subprocess.PIPE, cwd=str(tmp_path),
                           env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                "MAILDIR": maildir})
    new = os.path.join(maildir, "new")
    files = []
    if os.path.isdir(new):
        for name in sorted(os.listdir(new)):
            with open(os.path.join(new, name), "rb") as f:
                files.append(f.read())
    return p.returncode, files, p.stderr


def test_delivers_with_return_path_delivered_to_and_received(tmp_path):
    status, files, _ = deliver(tmp_path, b"Subject: hi\n\nbody\n",
                               b"Fa@b.c\0Tu@example.com\0Tv@example.org\0\0")
    assert status == 0
    assert len(files) == 1
    head, _, rest = files[0].partition(b"Received: (qmail ")
    assert head == b"Return-Path: <a@b.c>\nDelivered-To: u@example.com\nDelivered-To: v@example.org\n"
    assert re.match(rb"\d+ invoked from network\); ", rest)
    line, _, message = rest.partition(b"\n")
    assert RE_DATE.search(line)
    assert message == b"Subject: hi\n\nbody\n"
    # tmp/ is left empty, cur/ exists
    md = tmp_path / "Maildir"
    assert os.listdir(md / "tmp") == []
    assert os.path.isdir(md / "cur")


def test_null_sender_and_default_maildir_in_cwd(tmp_path):
    env_file = tmp_path / "envelope"
    env_file.write_bytes(b"F\0Tu@example.com\0\0")
    with open(env_file, "rb") as env_fd:
        p = subprocess.run([QUEUE_MAILDIR], input=b"x\n", stdout=env_fd, cwd=str(tmp_path),
                           env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert p.returncode == 0
    (name,) = os.listdir(tmp_path / "Maildir" / "new")
    assert (tmp_path / "Maildir" / "new" / name).read_bytes().startswith(b"Return-Path: <>\n")


def test_control_bytes_in_addresses_cannot_add_header_lines(tmp_path):
    status, files, _ = deliver(tmp_path, b"x\n", b"Fa\rb\0Tu\nX-Evil: 1\0\0")
    assert status == 0
    assert files[0].startswith(b"Return-Path: <a?b>\nDelivered-To: u?X-Evil: 1\n")


def test_large_message_is_copied_exactly(tmp_path):
    message = b"".join(b"%077d\n" % i for i in range(20000))  # about 1.5 MB
    status, files, _ = deliver(tmp_path, message, b"Fa@b.c\0Tu@x\0\0")
    assert status == 0
    assert files[0].endswith(b"\n" + message)


@pytest.mark.parametrize("envelope, code", [
    (b"", 54),                         # nothing at all
    (b"Fa@b.c", 54),                   # no NUL after the sender
    (b"Fa@b.c\0Tu@x\0", 54),           # no final NUL
    (b"Fa@b.c\0Tu@x", 54),             # EOF inside a recipient
    (b"Xa@b.c\0\0", 91),               # does not start with F
    (b"Fa@b.c\0Xu@x\0\0", 91),         # entry not starting with T
    (b"F" + b"a" * 1004 + b"\0\0", 11),          # sender too long
    (b"Fa\0T" + b"u" * 1004 + b"\0\0", 11),      # recipient too long
])
def test_bad_envelope_is_not_delivered(tmp_path, envelope, code):
    status, files, err = deliver(tmp_path, b"Subject: x\n\nbody\n", envelope)
    assert status == code
    assert files == []
    assert err.startswith(b"qmail-queue-maildir: ")
    assert os.listdir(tmp_path / "Maildir" / "tmp") == []


def test_address_of_1003_bytes_is_fine(tmp_path):
    status, files, _ = deliver(tmp_path, b"x\n", b"F" + b"a" * 1003 + b"\0Tu\0\0")
    assert status == 0
    assert len(files) == 1


def test_unusable_maildir_is_61(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"not a directory")
    status, files, _ = deliver(tmp_path, b"x\n", b"Fa\0Tu\0\0", maildir=str(blocker))
    assert status == 61
    assert files == []


def test_unreadable_envelope_is_54(tmp_path):
    # fd 1 open for writing only: reading the envelope fails
    out = tmp_path / "out"
    with open(out, "wb") as w:
        p = subprocess.run([QUEUE_MAILDIR], input=b"x\n", stdout=w, cwd=str(tmp_path),
                           env={"PATH": "/usr/bin:/bin", "MAILDIR": str(tmp_path / "md")})
    assert p.returncode == 54
    assert os.listdir(tmp_path / "md" / "new") == []
