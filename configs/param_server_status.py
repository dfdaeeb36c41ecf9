"""A config for the param-server janitor/status process: only the store section matters.

    python -m param_server.main --config=configs/param_server_status.py --workdir=DIR --mode=status
    python -m param_server.main --config=configs/param_server_status.py:memory ...   # (tests only)
"""

from rlax_tpu.config import get_base_config


def get_config(arg: str = ""):
    config = get_base_config()
    config.name = "param_server_status"
    if arg == "fast":  # short janitor period, for demos and tests
        config.store.janitor_interval_s = 0.2
    return config
