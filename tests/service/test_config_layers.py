"""The connection settings sit below the service: importing the connections, sinks and
consumers loads nothing of ``bridge.service``."""

from __future__ import annotations

import subprocess
import sys

LOWER = [
    "bridge.connection_settings",
    "bridge.connections",
    "bridge.sinks.nats_config",
    "bridge.sinks.redis_config",
    "bridge.consumer.nats_config",
    "bridge.consumer.redis_config",
]


def test_connections_sinks_and_consumers_do_not_import_the_service() -> None:
    code = (
        f"import sys\nfor name in {LOWER!r}:\n    __import__(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('bridge.service')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_service_config_reexports_the_same_classes() -> None:
    from bridge import connection_settings
    from bridge.service import config

    assert config.TlsConfig is connection_settings.TlsConfig
    assert config.AuthConfig is connection_settings.AuthConfig
