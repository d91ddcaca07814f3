"""rawvm's in-VM agent. Installs the environment bundle, runs tasks, reports telemetry, powers off when idle."""

__version__ = "0.1.0"

DEFAULT_PORT = 8470
