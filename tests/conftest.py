import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# ATTNLAB_TEST_THREADS=1 when another heavy process shares the cores (OpenMP spin-waits otherwise)
torch.set_num_threads(int(os.environ.get("ATTNLAB_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


sys.path.insert(0, str(Path(__file__).parent))  # test helpers (workflow_tools, fake_comfy) import by name

pytest_plugins = ["comfy_pass_tools"]  # the `backend` fixture of the guidance-pass node tests
