"""Hub: cards that carry the recovery metrics, pushes to a loopback Hub, block-only uploads, safe failure."""

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from hub_server import FakeHub, fake_hub, fake_hub_endpoint
from huggingface_hub import ModelCard
from pngs import assert_plot
from test_findings import TEMPLATE
from test_relearn import FEW, GPT2, base_run, relearn_run

from hf_relearn import RelearnError, load_relearned
from hf_relearn.cli.main import main
from hf_relearn.hub.cards import relearn_card, study_card
from hf_relearn.hub.push import push, stage
from hf_relearn.model.modeling import load_model
from hf_relearn.relearn.result import RelearnResult
from hf_relearn.storage import DATA_FILE, RESULT_FILE, read_results

hub = pytest.fixture(fake_hub)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    base_run(root / "base", "gpt2", GPT2, steps=300)
    relearn_run(root / "run", root / "base", "decoder.1")
    return root / "run"


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_card_carries_the_recovery_metrics_and_parses_back(run, tmp_path):
    result = json.loads((run / "relearn_result.json").read_text())
    relearn_card(run, "me/gpt2-relearned").save(tmp_path / "README.md")
    card = ModelCard.load(tmp_path / "README.md")
    metrics = {e.metric_type: e.metric_value for e in card.data.eval_results}
    assert metrics["eval_loss"] == pytest.approx(result["final_eval_loss"])
    assert metrics["baseline_eval_loss"] == pytest.approx(result["baseline_eval_loss"])
    assert metrics["after_reset_eval_loss"] == pytest.approx(result["after_reset_eval_loss"])
    assert metrics["steps_to_recover"] == result["steps_to_recover"] > 0
    assert metrics["tokens_to_recover"] == result["tokens_to_recover"]
    assert metrics["fraction_of_original"] == pytest.approx(result["fraction_of_original"])
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** result["final_eval_loss"])
    assert {"hf-relearn", "gpt2"} <= set(card.data.tags) and card.data.pipeline_tag == "text-generation"
    text = card.text
    assert "`decoder.1`" in text and f"Recovered** at step {result['steps_to_recover']}" in text
    assert "![Validation loss while re-learning](relearn_curve.png)" in text and "AutoModelForCausalLM" in text


def test_push_uploads_model_card_result_and_plot(run, hub):
    assert main(["push", str(run), "--repo-id", "me/gpt2-relearned"]) == 0
    files = hub.files("me/gpt2-relearned")
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "README.md",
        "relearn_result.json",
        "relearn_curve.png",
    } <= set(files)
    assert files["model.safetensors"] == (run / "model.safetensors").read_bytes()
    assert_plot(files["relearn_curve.png"], (6, 3.6))
    card = ModelCard.load("me/gpt2-relearned")  # downloaded from the loopback Hub
    result = json.loads(files["relearn_result.json"])
    assert {e.metric_type: e.metric_value for e in card.data.eval_results}["eval_loss"] == pytest.approx(
        result["final_eval_loss"]
    )
    # a branch, private
    assert main(["push", str(run), "--repo-id", "me/private-one", "--private", "--revision", "v1"]) == 0
    assert "README.md" in hub.files("me/private-one", "v1") and hub.meta["me/private-one"]["private"]


def test_only_block_rebuilds_the_recovered_model(run, hub):
    assert main(["push", str(run), "--repo-id", "me/block-only", "--only-block"]) == 0
    files = hub.files("me/block-only")
    assert set(files) == {"block.safetensors", "surgery.json", "README.md", "relearn_result.json", "relearn_curve.png"}
    assert len(files["block.safetensors"]) < len((run / "model.safetensors").read_bytes()) / 4  # README: a quarter
    base = json.loads(files["relearn_result.json"])["model"]
    card = files["README.md"].decode()  # names the base model it is rebuilt on
    assert f"This is **{base}** after hf-relearn surgery" in card
    assert f'load_relearned({json.dumps(base)}, "me/block-only")' in card
    staged = run / "hub" / "block"  # everything was written there first
    assert {p.name: p.read_bytes() for p in staged.iterdir()} == files
    rebuilt = load_relearned(base, "me/block-only").eval()
    full = load_model(str(run)).eval()
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, full(ids).logits)
        assert not torch.equal(load_model(base).eval()(ids).logits, full(ids).logits)
    with pytest.raises(RelearnError, match="does not exist in base|has shape"):
        load_relearned("gpt2", "me/block-only")  # a base of another shape: refused, not mixed


def test_failed_push_keeps_everything_local_and_a_retry_completes(run, tmp_path):
    before = _digest(run)
    with FakeHub() as server, fake_hub_endpoint(server, cache_dir=tmp_path / "cache"):
        server.fail_next, server.fail_match = 10, "/commit/"
        with pytest.raises(
            RelearnError,
            match=r"push to me/flaky failed \(the Hub answered with an error\): HfHubHTTPError: .*500.*"
            r"staged upload is complete in .*run the same command again",
        ):
            push(run, "me/flaky")
        assert server.head("me/flaky") is None or "model.safetensors" not in server.files("me/flaky")
        staged = _digest(run / "hub" / "full")
        assert {k: v for k, v in _digest(run).items() if not k.startswith("hub/")} == {
            k: v for k, v in before.items() if not k.startswith("hub/")
        }
        server.fail_next = 0
        push(run, "me/flaky")  # the retry
        assert set(server.files("me/flaky")) == set(staged)
        # the server goes away mid-session: one clear error, nothing lost
        server.stop()
        with pytest.raises(RelearnError, match=r"push to me/down failed \(could not reach the Hub\)"):
            push(run, "me/down")
    assert {k: v for k, v in _digest(run).items() if not k.startswith("hub/")} == {
        k: v for k, v in before.items() if not k.startswith("hub/")
    }
    with FakeHub() as again, fake_hub_endpoint(again, cache_dir=tmp_path / "cache2"):
        push(run, "me/down")
        assert "model.safetensors" in again.files("me/down")


def test_bad_input(run, tmp_path, capsys):
    assert main(["push", str(tmp_path), "--repo-id", "me/x"]) == 2
    assert "no relearn_result.json here" in capsys.readouterr().err
    assert main(["push", str(run), "--repo-id", "not-a-repo-id"]) == 2
    assert "use NAMESPACE/NAME" in capsys.readouterr().err
    with pytest.raises(RelearnError, match="no block.safetensors"):
        load_relearned("gpt2", str(tmp_path))


def test_trainer_push_to_hub_writes_our_card(run, hub, tmp_path, monkeypatch):
    # transformers keeps one HfApi (with its endpoint) from its first Hub call: make it build a new one here
    monkeypatch.setattr("transformers.utils.hub._hf_api", None)
    base = json.loads((run / "relearn_result.json").read_text())["model"]
    result = relearn_run(tmp_path / "r", Path(base), "decoder.2", push_to_hub=True, hub_model_id="me/trainer-push")
    files = hub.files("me/trainer-push")
    card = ModelCard(files["README.md"].decode())
    metrics = {e.metric_type: e.metric_value for e in card.data.eval_results}
    assert metrics["steps_to_recover"] == result.steps_to_recover and "model.safetensors" in files
    # the very card `hf-relearn push` stages for the same run and repo id
    assert files["README.md"].decode() == (stage(tmp_path / "r", "me/trainer-push") / "README.md").read_text()


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """A finished tiny study (one base, two layers re-learned) with its report."""
    from test_study import TINY_RECIPE

    from hf_relearn.report.build import build_report
    from hf_relearn.study.recipe import Recipe
    from hf_relearn.study.run import run_study

    out = tmp_path_factory.mktemp("study")
    recipe = {**TINY_RECIPE, "sweep": {"blocks": ["decoder.0", "decoder.1"], "seeds": [0]}}
    recipe["base"] = {
        **TINY_RECIPE["base"],
        "config_overrides": {**TINY_RECIPE["base"]["config_overrides"], "n_layer": 2},
    }
    run_study(Recipe.from_dict(recipe), out, progress=False)
    build_report(out)
    return out


def test_study_card_has_the_table_and_plots(study):
    card = study_card(study)
    assert (
        "hf-relearn study: tiny" in card.text
        and "| decoder.0 |" in card.text
        and "plots/cost_vs_layer.png" in card.text
    )
    assert "relearn-study" in card.data.tags


def test_stage_is_atomic_and_complete(run):
    folder = stage(run, "me/x")
    assert (folder / "README.md").exists() and (folder / "model.safetensors").exists()
    assert not list(folder.parent.glob(".*.tmp"))


def test_push_of_a_study_uploads_its_card_table_plots_and_recipe(study, hub):
    assert main(["push", str(study), "--repo-id", "me/tiny-study"]) == 0
    files = hub.files("me/tiny-study")
    plots = [f"plots/{p.name}" for p in sorted((study / "plots").glob("*.png"))]
    assert plots == ["plots/cost_vs_layer.png", "plots/curves.png", "plots/recovery_by_position.png"]
    assert set(files) == {"README.md", "results.csv", "recipe.yaml", *plots}  # no run folders, no models
    for name in ("results.csv", "recipe.yaml", *plots):
        assert files[name] == (study / name).read_bytes(), name
    card = ModelCard.load("me/tiny-study")  # downloaded from the loopback Hub
    assert "relearn-study" in card.data.tags and card.text.startswith("\n# hf-relearn study: tiny\n")
    rows = read_results(study / "results.csv")
    assert [r["block"] for r in rows] == ["decoder.0", "decoder.1"]
    assert f"An hf-relearn study: 2 relearn runs on {rows[0]['base_model']}." in card.text
    for r in rows:  # one seed: each run's own numbers, as the study measured them
        jump = 100 * (r["after_reset_eval_loss"] / r["baseline_eval_loss"] - 1)
        share = 100 * r["steps_to_recover"] / r["original_steps"]
        assert (
            f"| base | {r['block']} | block | {jump:.2f}% | {r['steps_to_recover']} | {share:.1f}% | "
            f"{r['tokens_to_recover']} | 1/1 | {r['original_steps_to_same_loss']} |"
        ) in card.text
    assert all(f"![{Path(p).stem}]({p})" in card.text for p in plots)  # the pushed plots, shown in the card


def test_card_command_prints_the_card_push_would_upload(run, tmp_path, capsys):
    assert main(["card", str(run), "--repo-id", "me/gpt2-relearned"]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == str(relearn_card(run, "me/gpt2-relearned")).strip()
    assert main(["card", str(run), "--repo-id", "me/gpt2-relearned", "-o", str(tmp_path / "card.md")]) == 0
    card = ModelCard.load(tmp_path / "card.md")
    assert {e.metric_type for e in card.data.eval_results} >= {"eval_loss", "baseline_eval_loss"}


def test_a_user_card_template_gets_the_same_values_on_card_and_push(run, hub, tmp_path, capsys):
    template = tmp_path / "mine.md"
    template.write_text("---\n{{ card_data }}\n---\n\n# Mine: {{ block }} from {{ base_model }}, {{ tolerance }}\n")
    result = json.loads((run / "relearn_result.json").read_text())
    expected = f"# Mine: {result['block']} from {result['model']}, 1%"
    assert main(["card", str(run), "--card-template", str(template)]) == 0
    assert expected in capsys.readouterr().out
    assert main(["push", str(run), "--repo-id", "me/own-card", "--card-template", str(template)]) == 0
    card = ModelCard.load("me/own-card")  # the metadata is still ours: the model-index carries the recovery
    assert expected in card.text and "eval_loss" in {e.metric_type for e in card.data.eval_results}


def test_a_bad_card_template_is_one_clear_error_and_stages_nothing(run, tmp_path, capsys):
    assert main(["card", str(run), "--card-template", str(tmp_path / "missing.md")]) == 2
    assert "missing.md: no such file" in capsys.readouterr().err
    broken = tmp_path / "broken.md"
    broken.write_text("{% if block %}never closed\n")
    with pytest.raises(RelearnError, match="broken.md: TemplateSyntaxError"):
        stage(run, "me/x", card_template=broken)
    assert (
        not (run / "hub" / "full").exists() or "never closed" not in (run / "hub" / "full" / "README.md").read_text()
    )


def test_card_of_a_folder_without_a_run_is_one_clear_error(tmp_path, capsys):
    assert main(["card", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no relearn_result.json here" in err and "study folder" in err and "Traceback" not in err


# -------------------------------------------------------------------------------------- a push with a rejected token
@pytest.fixture(scope="module")
def tiny_run(quiet_gpt2_base, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("push")
    relearn_run(root / "run", quiet_gpt2_base, "decoder.1", **FEW)
    return root / "run"


def test_a_push_with_a_rejected_token_gives_one_error_and_keeps_everything_local(tiny_run, tmp_path):
    before = _digest(tiny_run)
    # the fake Hub accepts any bearer token, so the Hub's answer to a bad one (401 on the first call) is injected
    with FakeHub() as server, fake_hub_endpoint(server, token="hf_bad", cache_dir=tmp_path / "cache"):
        server.fail_status, server.fail_next, server.fail_match = 401, 100, "/api/"
        with pytest.raises(RelearnError) as err:
            push(tiny_run, "me/denied", token="hf_bad")
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith("push to me/denied failed (the Hub answered with an error): HfHubHTTPError: ")
        assert "401" in message and "Nothing local was lost" in message and "run the same command again" in message
        assert "me/denied" not in server.meta  # nothing reached the Hub: not even the repo was made
        staged = tiny_run / "hub" / "full"
        assert str(staged) in message and (staged / "model.safetensors").exists() and (staged / "README.md").exists()
        after = _digest(tiny_run)
        assert {k: v for k, v in after.items() if not k.startswith("hub/")} == {
            k: v for k, v in before.items() if not k.startswith("hub/")
        }
        # a good token: the same command completes
        server.fail_next = 0
        push(tiny_run, "me/denied", token="hf_good")
        assert set(server.files("me/denied")) == set(_digest(staged))
    assert os.environ.get("HF_TOKEN") != "hf_bad"


# ------------------------------------------------------------------------------ the card of a result written by hand
def _card(tmp_path, **changes) -> ModelCard:
    """The card of a run folder written by hand: a real result's fields with distinctive numbers, its data settings,
    and a base folder whose own card names a license and a dataset."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: apache-2.0\ndatasets:\n- tiny_shakespeare\n---\n\n# base\n")
    result = {f.name: TEMPLATE.get(f.name) for f in dataclasses.fields(RelearnResult)}
    result |= dict(
        model=str(base),
        architecture="gpt2",
        block="decoder.1",
        recovered=True,
        baseline_eval_loss=2.0,
        after_reset_eval_loss=3.5,
        final_eval_loss=2.015,
        steps_to_recover=250,
        examples_to_recover=12345,
        tokens_to_recover=987654,
        original_steps=2000,
        fraction_of_original=0.125,
        original_steps_to_same_loss=678,
    )
    result |= changes
    run = tmp_path / "run"
    run.mkdir()
    (run / RESULT_FILE).write_text(json.dumps(result))
    (run / DATA_FILE).write_text(json.dumps({"train_file": "../shared/data/tinyshakespeare.txt"}))
    relearn_card(run, "me/gpt2-relearn-d1").save(tmp_path / "README.md")
    return ModelCard.load(tmp_path / "README.md")


def test_the_card_states_every_recovery_figure_in_prose_and_in_model_index(tmp_path):
    card = _card(tmp_path)
    (results,) = {(e.task_type, e.dataset_name, e.dataset_split) for e in card.data.eval_results}
    assert results == ("text-generation", "tinyshakespeare.txt", "validation")
    metrics = {e.metric_type: (e.metric_name, e.metric_value) for e in card.data.eval_results}
    assert metrics == {
        "eval_loss": ("eval loss after re-learning", 2.015),
        "baseline_eval_loss": ("eval loss of the intact model", 2.0),
        "after_reset_eval_loss": ("eval loss right after the reset", 3.5),
        "perplexity": ("perplexity after re-learning", pytest.approx(7.500727381202963, rel=1e-12)),
        "baseline_perplexity": ("perplexity of the intact model", pytest.approx(7.38905609893065, rel=1e-12)),
        "after_reset_perplexity": ("perplexity right after the reset", pytest.approx(33.11545195869231, rel=1e-12)),
        "steps_to_recover": ("optimizer steps to recover", 250),
        "examples_to_recover": ("training examples to recover", 12345),
        "tokens_to_recover": ("tokens to recover", 987654),
        "fraction_of_original": ("fraction of the original training budget", 0.125),
        "original_steps_to_same_loss": ("the original run's steps to the same loss (from scratch)", 678),
    }
    text = card.text
    assert "| intact model (baseline) | 2.0000 | 7.389 |" in text  # perplexity = exp(loss), to 3 decimals
    assert "| right after the reset | 3.5000 | 33.115 |" in text
    assert "| after re-learning | 2.0150 | 7.501 |" in text
    assert "**Recovered** at step 250 = 12.5% of the original 2000 steps." in text
    assert "- steps / examples / tokens to recover: 250 / 12345 / 987654\n" in text
    assert "- fraction of the original training budget: 12.5%\n" in text
    assert "- the original run first reached the same loss at step 678 (learning from scratch)" in text


def test_the_card_carries_the_tags_and_the_source_cards_license_and_datasets(tmp_path):
    data = _card(tmp_path, architecture="bert", objective="mlm").data
    assert data.tags == ["hf-relearn", "relearn", "bert"] and data.pipeline_tag == "fill-mask"
    assert data.license == "apache-2.0" and data.datasets == ["tiny_shakespeare"]
    assert yaml.safe_load((tmp_path / "README.md").read_text().split("---")[1])["license"] == "apache-2.0"


@pytest.mark.parametrize(
    "init, seed, arm, words",
    [
        ("zero", 7, "all", "every parameter trainable"),
        ("scratch", 3, "lora-rest", "the block frozen at random and LoRA adapters on every other layer"),
    ],
)
def test_the_card_names_the_block_init_seed_and_arm(tmp_path, init, seed, arm, words):
    text = " ".join(_card(tmp_path, block="decoder.2", init=init, seed=seed, trainable=arm).text.split())
    assert (
        f"block `decoder.2` (12 tensors, 12,704 parameters) was reset ({init}, seed {seed}) and re-learned with "
        f"{words} on tinyshakespeare.txt (clm objective)"
    ) in text
