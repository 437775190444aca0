"""mypy sees the project's own modules (not Any): a deliberate cross-module type error in a snippet is reported.

kvrack's top-level folders are installed under other names (daemon/ as kvrack.daemon, ...); without the strict
editable install's link tree and the py.typed marker, every kvrack.* import would resolve to Any and mypy would
report nothing, whatever the code did.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SNIPPET = textwrap.dedent("""
    from kvrack.clients import Client, Layout
    from kvrack.daemon.store import Store

    client = Client.connect()
    client.no_such_method()                       # a method Client does not have
    reveal_type(client.lookup)
    layout: Layout = Layout(layers="32", kv_heads=8, head_dim=128)   # a str where an int belongs

    def tier_name(store: Store) -> int:
        return store.tier.name                    # a str returned as an int
""")


@pytest.mark.timeout(300)
def test_mypy_resolves_kvrack_modules_and_reports_cross_module_errors(tmp_path: Path) -> None:
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent))
    assert mypy, "mypy is a test dependency"
    (tmp_path / "snippet.py").write_text(SNIPPET)
    out = subprocess.run([mypy, "--no-incremental", "--python-version", "3.11", "snippet.py"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=280).stdout
    assert '"Client" has no attribute "no_such_method"' in out, out
    assert 'Revealed type is "def (keys: typing.Sequence[bytes]) -> kvrack.clients.results.LookupResult"' \
        in out, out
    assert 'Argument "layers" to "Layout" has incompatible type "str"; expected "int"' in out, out
    assert 'Incompatible return value type (got "str", expected "int")' in out, out
