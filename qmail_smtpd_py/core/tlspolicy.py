"""Relaying by client certificate, as the netqmail TLS patch decides it.

In TLS, an RCPT that rcpthosts would refuse is allowed when the client's
certificate verified against control/clientca.pem and the e-mail address in
its subject is listed in control/tlsclients (judged once per connection,
at the first such RCPT).  Otherwise the refusal says why.
"""

from __future__ import annotations

from . import replies
from .requests import Outcome, PeerCertificate


def judge_certificate(certificate: Outcome, tls_clients: frozenset[bytes] | None
                      ) -> tuple[bytes | None, bytes | None]:
    """(email, None) if the certificate allows relaying, else (None, reason)
    with reason None when the client gave no certificate."""
    if type(certificate) is not PeerCertificate:
        return None, None
    if certificate.verify_error is not None:
        return None, certificate.verify_error
    if not certificate.emails:
        return None, replies.TLS_CERT_NO_EMAIL
    email = certificate.emails[0]
    if tls_clients is None or email not in tls_clients:
        return None, replies.TLS_CERT_NOT_LISTED
    return email, None
