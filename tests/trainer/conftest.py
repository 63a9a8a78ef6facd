"""Fixtures of the trainer tests that start launch/train.py in-process."""

import pytest
import torch.distributed as dist
from launch_scripts import load_launch_script
from ports import free_port


@pytest.fixture(scope="module")
def launcher():
    """launch/train.py's main() in this process, as a world of one.

    The process group it starts stays up until the session ends (pytest_sessionfinish below): DeepSpeed keeps
    its communication backend after a group is destroyed, so a second module's run in the same process would
    meet a destroyed group."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
            mp.setenv(key, value)
        mp.delenv("KVFORGE_FAULT", raising=False)
        yield load_launch_script("train").main


def pytest_sessionfinish(session, exitstatus):
    if dist.is_initialized():
        dist.destroy_process_group()
