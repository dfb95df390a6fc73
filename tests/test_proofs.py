"""The proofs a relearn reports must be able to fail: a frozen tensor moved during training refuses the run (one and
two processes), and the trainable=all arm has nothing frozen to prove."""

import json
import textwrap

import pytest
import torch
from test_distributed import CONFIG, _free_port
from test_relearn import GPT2, base_run, relearn_run
from transformers import TrainerCallback

from hf_relearn import RelearnError

FROZEN = "transformer.h.0.mlp.c_fc.bias"  # layer 0: frozen when decoder.2 is re-learned


class NudgeFrozen(TrainerCallback):
    """Moves one frozen tensor a little at step ``at`` (what a buggy optimizer or a shared tensor would do)."""

    def __init__(self, name: str = FROZEN, at: int = 2):
        self.name, self.at = name, at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.at:
            with torch.no_grad():
                dict(model.named_parameters())[self.name].add_(1e-4)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("proof-base")
    base_run(out, "gpt2", GPT2, steps=60, max_eval_samples=32)
    return out


def test_a_frozen_tensor_moved_mid_run_refuses_the_relearn_naming_it(base, tmp_path):
    with pytest.raises(RelearnError, match=f"frozen tensors changed during training: {FROZEN}"):
        relearn_run(tmp_path / "r", base, "decoder.2", callbacks=[NudgeFrozen()], max_steps=4, eval_steps=2)
    result = json.loads((tmp_path / "r" / "relearn_result.json").read_text())
    assert result["frozen_unchanged"] is False and result["frozen_changed"] == [FROZEN]
    # the same run without the nudge proves the frozen tensors unchanged
    clean = relearn_run(tmp_path / "clean", base, "decoder.2", max_steps=4, eval_steps=2)
    assert clean.frozen_unchanged and clean.frozen_changed == []


def test_trainable_all_has_nothing_frozen_so_a_moving_tensor_is_allowed(base, tmp_path):
    result = relearn_run(
        tmp_path / "all", base, "decoder.2", trainable="all", callbacks=[NudgeFrozen()], max_steps=4, eval_steps=2
    )
    assert result.frozen_unchanged and result.frozen_changed == []
    assert result.trainable_parameters == result.total_parameters


def test_a_frozen_tensor_moved_on_one_of_two_processes_refuses_the_run(base, tmp_path):
    """Only process 1 moves the tensor: the gathered verdict must still refuse the run on the main process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "nudge.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys, json
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            from test_proofs import NudgeFrozen
            from hf_relearn import RelearnError
            from hf_relearn.config import ModelArguments, RelearnArguments
            from hf_relearn.data import DataArguments
            from hf_relearn.runner import relearn

            rank = int(os.environ["RANK"])
            args = RelearnArguments(output_dir={str(tmp_path / "two")!r}, block="decoder.2",
                                    original_run={str(base)!r}, max_steps=4, eval_steps=2,
                                    per_device_train_batch_size=8, disable_tqdm=True, report_to=[])
            callbacks = [NudgeFrozen()] if rank == 1 else []
            try:
                relearn(ModelArguments(model={str(base)!r}), DataArguments(), args, callbacks=callbacks, quiet=True)
            except RelearnError as err:
                print(f"rank {{rank}} refused: {{err}}")
                sys.exit(3)
            """
        )
    )
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(accelerate),
        "launch",
        "--config_file",
        str(CONFIG),
        "--main_process_port",
        str(_free_port()),
        str(script),
    ]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert f"rank 1 refused: frozen tensors changed during training: {FROZEN}" in proc.stdout
    assert "rank 0 refused: frozen tensors changed during training: on another process" in proc.stdout
    result = json.loads((tmp_path / "two" / "relearn_result.json").read_text())
    assert result["world_size"] == 2 and result["frozen_unchanged"] is False
