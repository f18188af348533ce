"""The sans-I/O core: qmail-smtpd's decisions, with no I/O at all.

session.py plays one SMTP connection as a generator of requests
(requests.py); everything a client can see is in replies.py.  Nothing in
this package opens a file, a socket or a process, reads the clock or the
environment: the drivers (../driver.py) and the tests' reference world
(t/world.py) answer its requests.  t/test_core_purity.py checks that.
"""
