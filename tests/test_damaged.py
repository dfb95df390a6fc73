"""A damaged model folder gets one clear error naming the file, never a traceback, and nothing is trained."""

import json

import pytest
from tiny import tiny

from hf_relearn.cli.main import main


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "model"
    tiny("gpt2", n_layer=2, n_embd=32).save_pretrained(folder)
    return folder


def _relearn(folder, tmp_path, capsys) -> str:
    out = tmp_path / "out"
    code = main(["relearn", "--model", str(folder), "--block", "decoder.1", "--original_steps", "10",
                 "--max_steps", "1", "--output_dir", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())  # nothing trained, nothing written
    return err


def test_a_truncated_safetensors_file_is_named(saved, tmp_path, capsys):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "model.safetensors is truncated or corrupt" in _relearn(saved, tmp_path, capsys)


def test_a_missing_shard_is_named(saved, tmp_path, capsys):
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (saved / "model.safetensors").rename(saved / names[0])
    (saved / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"transformer.wte.weight": names[0], "lm_head.weight": names[1]}})
    )
    assert f"shard {names[1]} is listed in model.safetensors.index.json but missing" in _relearn(
        saved, tmp_path, capsys
    )


def test_a_config_that_does_not_match_the_weights_is_refused(saved, tmp_path, capsys):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    assert "its weights do not load with its config.json" in _relearn(saved, tmp_path, capsys)


def test_an_unreadable_config_is_named(saved, tmp_path, capsys):
    (saved / "config.json").write_text("{ not json")
    assert "config.json cannot be read" in _relearn(saved, tmp_path, capsys)
