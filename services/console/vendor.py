"""The chart library the console's pages use, vendored: Apache ECharts, pinned by version and checksums.

`make vendor-charts` (`python -m services.console.vendor`) fetches the pinned npm registry tarball,
checks it against the registry's own integrity string (sha512, as npm does), takes the built file
and the licence out of it, checks the file's sha256, and writes them to `static/vendor/`. The result
is committed: the file ships in the wheel and the image, and `make test` / `make demo` never need the
npm registry; `tests/unit/console/test_vendored_charts.py` checks the committed bytes against the pins.
To move to another version, change the three pins (the registry's `dist.integrity` of that version,
and the new file's sha256 that this command prints when it refuses the old one) and run it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

VENDOR_DIR = Path(__file__).resolve().parent / "static" / "vendor"


@dataclass(frozen=True)
class VendoredFile:
    """One file taken from a pinned npm package."""

    package: str
    version: str
    integrity: str  # the registry's dist.integrity of the tarball
    member: str  # the path inside the tarball
    name: str  # the file name under static/vendor/
    sha256: str  # of the file itself

    @property
    def tarball_url(self) -> str:
        """
        >>> ECHARTS.tarball_url
        'https://registry.npmjs.org/echarts/-/echarts-6.1.0.tgz'
        """
        return f"https://registry.npmjs.org/{self.package}/-/{self.package}-{self.version}.tgz"


ECHARTS = VendoredFile(
    package="echarts", version="6.1.0",
    integrity="sha512-q0yaFPggC9FUdsWH4blavRWFmxdrIodbkoKNAjJudAI6CA9gNPxHtV2RcZNEepZVlk4yvBYkOkbk6HIVpIyHZA==",
    member="package/dist/echarts.min.js", name="echarts.min.js",
    sha256="b66b25aeb4df84e33199dc21694014d336d222cbd9deb0e5a7c14bd6aa0d0fd0",
)
# Apache-2.0 asks for the licence and the NOTICE to travel with the file.
LICENCE_MEMBERS = {"package/LICENSE": "echarts-LICENSE", "package/NOTICE": "echarts-NOTICE"}


class VendorError(ValueError):
    """A fetched file is not the pinned one."""


def npm_integrity(data: bytes) -> str:
    """npm's integrity string (SRI, sha512) of a tarball.

    >>> npm_integrity(b"")[:20]
    'sha512-z4PhNX7vuL3xV'
    """
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def extract(tarball: bytes, pin: VendoredFile) -> dict[str, bytes]:
    """Check the tarball and the file against the pins; return the file and the licence texts by their names."""
    if npm_integrity(tarball) != pin.integrity:
        raise VendorError(f"{pin.tarball_url}: integrity {npm_integrity(tarball)} is not the pinned {pin.integrity}")
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as archive:
        wanted = {pin.member: pin.name, **LICENCE_MEMBERS}
        files = {}
        for member, name in wanted.items():
            try:
                found = archive.extractfile(member)
            except KeyError:
                found = None
            if found is None:
                raise VendorError(f"{pin.tarball_url} has no file {member}")
            files[name] = found.read()
    digest = hashlib.sha256(files[pin.name]).hexdigest()
    if digest != pin.sha256:
        raise VendorError(f"{pin.member} of {pin.package} {pin.version} has sha256 {digest}, "
                          f"not the pinned {pin.sha256}")
    return files


def main() -> int:
    """Fetch, check and write the vendored files; exit 1 with the reason if anything is not as pinned."""
    with urllib.request.urlopen(ECHARTS.tarball_url, timeout=120) as response:
        tarball = response.read()
    try:
        files = extract(tarball, ECHARTS)
    except VendorError as exc:
        print(f"vendor: {exc}", file=sys.stderr)
        return 1
    VENDOR_DIR.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (VENDOR_DIR / name).write_bytes(data)
    print(f"vendor: {ECHARTS.package} {ECHARTS.version} -> {VENDOR_DIR / ECHARTS.name} (sha256 {ECHARTS.sha256})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
