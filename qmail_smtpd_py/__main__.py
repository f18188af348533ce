"""`python -m qmail_smtpd_py`: the same as the qmail-smtpd-py command."""
import sys

from .cli import main

sys.exit(main())
