"""The console's vendored chart library is the pinned one, byte for byte, with its licence beside it."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from services.console.vendor import ECHARTS, VENDOR_DIR, VendorError, extract, npm_integrity


def test_the_committed_file_is_the_pinned_build() -> None:
    data = (VENDOR_DIR / ECHARTS.name).read_bytes()
    assert hashlib.sha256(data).hexdigest() == ECHARTS.sha256
    assert f't.version="{ECHARTS.version}"'.encode() in data  # the build says which version it is
    for name in ("echarts-LICENSE", "echarts-NOTICE"):
        assert (VENDOR_DIR / name).read_text().strip(), name
    assert "Apache License" in (VENDOR_DIR / "echarts-LICENSE").read_text()


def a_tarball(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_a_tarball_or_file_other_than_the_pinned_one_is_refused() -> None:
    build = b"/* a chart library */"
    files = {"package/dist/echarts.min.js": build, "package/LICENSE": b"Apache License", "package/NOTICE": b"n"}
    tarball = a_tarball(files)
    pin = ECHARTS.__class__(**{**vars(ECHARTS), "integrity": npm_integrity(tarball),
                               "sha256": hashlib.sha256(build).hexdigest()})
    assert extract(tarball, pin) == {"echarts.min.js": build, "echarts-LICENSE": b"Apache License",
                                     "echarts-NOTICE": b"n"}
    with pytest.raises(VendorError, match="integrity"):
        extract(tarball + b"\0", pin)
    tampered = a_tarball({**files, "package/dist/echarts.min.js": build + b"alert(1)"})
    with pytest.raises(VendorError, match="sha256"):
        extract(tampered, ECHARTS.__class__(**{**vars(pin), "integrity": npm_integrity(tampered)}))
    with pytest.raises(VendorError, match="has no file"):
        lacking = a_tarball({"package/dist/echarts.min.js": build})
        extract(lacking, ECHARTS.__class__(**{**vars(pin), "integrity": npm_integrity(lacking)}))
