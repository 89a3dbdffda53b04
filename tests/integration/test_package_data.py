"""A wheel of touchstream carries what the code reads at run time: templates, static files, schemas.

The build runs on a copy of the sources (pip's in-tree build would write build/ and *.egg-info into
the checkout), then the wheel is unpacked into a folder that is put first on sys.path of a fresh
interpreter, which loads the schemas, the OpenAPI document and the console's templates from it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _sources() -> set[str]:
    console = REPO / "services" / "console"
    expected = {f"services/console/templates/{p.name}" for p in (console / "templates").glob("*.html")}
    expected |= {f"services/console/{p.relative_to(console).as_posix()}" for p in (console / "static").rglob("*")
                 if p.is_file()}
    expected |= {f"touchstream/schemas/{p.name}" for p in (REPO / "schemas").iterdir() if p.is_file()}
    return expected


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("touchstream", "services", "schemas"):
        # symlinks=True: touchstream/schemas stays the link to ../schemas it is in the checkout.
        shutil.copytree(REPO / name, src / name, symlinks=True, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
                    "-w", str(out), str(src)], check=True, timeout=300)
    [built] = out.glob("touchstream-*.whl")
    return built


def test_the_wheel_lists_templates_static_files_and_schemas(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = _sources()
    assert {"touchstream/schemas/ScoreUpdate.v3.avsc", "touchstream/schemas/registry.txt",
            "touchstream/schemas/openapi.yaml",
            "touchstream/schemas/rules.schema.json", "services/console/templates/login.html",
            "services/console/static/console.js", "services/console/static/console.css",
            "services/console/static/charts.js", "services/console/static/vendor/echarts.min.js"} <= expected
    assert expected <= names, sorted(expected - names)


def test_code_installed_from_the_wheel_finds_its_files(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    probe = (
        "import touchstream.avro as a, services.console.web as w, services.ingest.app as i\n"
        "import services.triggers.rule_check as r\n"
        f"assert a.__file__.startswith({str(target)!r}), a.__file__\n"
        f"assert w.__file__.startswith({str(target)!r}), w.__file__\n"
        "a.schema('ScoreUpdate'); assert i.load_openapi()['openapi']\n"
        "assert r.SCHEMA_FILE.is_file() and str(r.SCHEMA_FILE).startswith(a.__file__.rsplit('/', 1)[0])\n"
        "assert 'Log in' in w.template_env().get_template('login.html').render(\n"
        "    csrf='', logged_in=False, next='/', error=None)\n"
        "assert (w.HERE / 'static' / 'console.js').is_file()\n"
        "import hashlib, services.console.vendor as v\n"
        "assert hashlib.sha256(w._static_bytes('vendor/' + v.ECHARTS.name)).hexdigest() == v.ECHARTS.sha256\n"
        "print('ok')\n"
    )
    # PYTHONPATH puts the unpacked wheel ahead of the editable install of the checkout.
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
