#!/usr/bin/env python3
"""Vendor uPlot (MIT, https://github.com/leeoniya/uPlot) into the package: the report
inlines it into its HTML, so a report needs no network when it is viewed.

    python3 scripts/vendor_uplot.py [--tarball uplot-1.6.32.tgz] [--check]

Downloads the pinned release's npm tarball (or reads one given, e.g. from
`npm pack uplot@1.6.32`), checks its sha256 against the pin below, and writes
dist/uPlot.iife.min.js, dist/uPlot.min.css and LICENSE to slurmexecutor/reports/vendor/.
`--check`: verify that the vendored files are exactly those of the pinned tarball.
Each file's sha256 is pinned too (FILE_SHA256; the tests check the package's copies
offline).
To move to another release, change VERSION and SHA256 (`npm view uplot@X dist.tarball`,
then sha256sum of it) and run this again.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tarfile
import urllib.request
from pathlib import Path

VERSION = "1.6.32"
SHA256 = "4b8a8191e425658e3ea8c8c1314b0fc679c861ee3a1af2b20c7b16ba50b5133d"
URL = f"https://registry.npmjs.org/uplot/-/uplot-{VERSION}.tgz"
FILES = {"package/dist/uPlot.iife.min.js": "uPlot.iife.min.js",
         "package/dist/uPlot.min.css": "uPlot.min.css", "package/LICENSE": "LICENSE"}
#: sha256 of each vendored file (tests/test_report.py checks the package's copies)
FILE_SHA256 = {
    "uPlot.iife.min.js": "19c8d4c6ad88929a79f4ae49d6f7161566dfd0ba3d15cc495e974f787eb78f1f",
    "uPlot.min.css": "df630c6a8d6f8eeaff264b50f73ce5b114f646ffd9a0bb74f049b0a00135fa04",
    "LICENSE": "8f989229699b4fe2f1a0432d0e9edc338a8a911e250e2d1b01ecd770a5f5b1bd"}
VENDOR = Path(__file__).resolve().parent.parent / "slurmexecutor" / "reports" / "vendor"


def tarball(path: Path | None) -> bytes:
    data = path.read_bytes() if path else urllib.request.urlopen(URL, timeout=60).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        sys.exit(f"uplot-{VERSION}.tgz has sha256 {digest}, expected {SHA256}")
    return data


def members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        found = {}
        for name, target in FILES.items():
            member = archive.extractfile(name)
            if member is None:
                sys.exit(f"{name} is missing from the tarball")
            found[target] = member.read()
            digest = hashlib.sha256(found[target]).hexdigest()
            if digest != FILE_SHA256[target]:
                sys.exit(f"{name} has sha256 {digest}, expected {FILE_SHA256[target]}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tarball", type=Path, help="a local uplot-VERSION.tgz")
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args()
    files = members(tarball(args.tarball))
    files["VERSION"] = f"{VERSION}\n".encode()
    if args.check:
        stale = [name for name, body in files.items()
                 if not (VENDOR / name).exists() or (VENDOR / name).read_bytes() != body]
        print(f"vendored uPlot {VERSION}: " + (f"differs in {stale}" if stale else "ok"))
        return 1 if stale else 0
    VENDOR.mkdir(exist_ok=True)
    for name, body in files.items():
        (VENDOR / name).write_bytes(body)
    print(f"uPlot {VERSION} (sha256 {SHA256[:12]}...) -> {VENDOR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
