"""Certificates for the TLS tests, made with the `openssl` command line (no Python package needed: the venv has
no `cryptography`): a CA, and server or client certificates it signs for the names asked.

    pki = Pki.create(tmp_path / "pki")                  # a fresh CA
    server = pki.issue("server", ["DNS:localhost", "IP:127.0.0.1"])
    client = pki.issue("client", client=True)
    other = Pki.create(tmp_path / "other")              # a CA nobody trusts

Elliptic-curve keys (P-256): each certificate takes a few milliseconds. Keys are written 0600 in a 0700
directory, as the file-trust rules for files we are given want.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import attrs

OPENSSL = shutil.which("openssl")


@attrs.frozen
class Issued:
    cert: Path
    key: Path


def _run(*args: str | Path) -> None:
    assert OPENSSL is not None, "the TLS tests need the openssl command line"
    subprocess.run([OPENSSL, *map(str, args)], check=True, capture_output=True, timeout=30)


@attrs.frozen
class Pki:
    directory: Path
    name: str

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca.key"

    @classmethod
    def create(cls, directory: Path, name: str = "ondemand test CA") -> Pki:
        directory.mkdir(mode=0o700, parents=True)
        pki = cls(directory, name)
        _run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", pki.ca_key, "-out", pki.ca, "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        os.chmod(pki.ca_key, 0o600)
        return pki

    def issue(self, name: str, names: list[str] | tuple[str, ...] = ("DNS:localhost", "IP:127.0.0.1"), *,
              client: bool = False, days: int = 2) -> Issued:
        """A certificate for `names` (subjectAltName entries) signed by this CA, and its key."""
        cert, key = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        usage = "clientAuth" if client else "serverAuth"
        extensions = ["-addext", f"extendedKeyUsage={usage}", "-addext", "basicConstraints=CA:FALSE"]
        if names:
            extensions += ["-addext", "subjectAltName=" + ",".join(names)]
        _run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key,
             "-out", cert, "-days", str(days), "-subj", f"/CN={name}", "-CA", self.ca, "-CAkey", self.ca_key,
             *extensions)
        os.chmod(key, 0o600)
        return Issued(cert, key)
