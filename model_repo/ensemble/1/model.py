"""`ensemble`, as NVIDIA's tensorrtllm_backend names it: forwards to aligned_llm (serving/trtllm_model.py)."""
import sys
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[3]
if str(_REPO_ROOT) not in sys.path:  # a checkout served without `pip install -e .`
    sys.path.insert(0, str(_REPO_ROOT))

from serving.trtllm_model import FrontModel  # noqa: E402


class TritonPythonModel(FrontModel):
    tokens = False
