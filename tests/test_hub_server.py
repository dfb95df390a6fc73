"""End-to-end checks of tests/hub_server.py: the REAL huggingface_hub client against the loopback FakeHub."""

from __future__ import annotations

import importlib
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from hub_server import FakeHub, fake_hub, fake_hub_endpoint
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

REPO = "me/model"
# the module (``huggingface_hub.utils.tqdm`` as an attribute is the tqdm class)
HF_TQDM = importlib.import_module("huggingface_hub.utils.tqdm")


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A started FakeHub with the client pointed at it; HF_HOME and the hub cache live under tmp_path."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # read at call time by hf_xet (its logs)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    # both are read at import: the env vars alone do not reach an already-imported client
    monkeypatch.setattr(HF_TQDM, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
    yield from fake_hub(cache_dir=tmp_path / "cache")


@pytest.fixture(params=[True, False], ids=["xet-pipeline", "create_commit"])
def upload_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both upload_folder code paths: the hf_xet pipeline (installed here) and the legacy single create_commit."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not request.param)
    return request.param


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def model_files(seed: int = 0) -> dict[str, bytes]:
    """A binary weights file of a few MB, a nested file and a small JSON: what a run folder looks like."""
    return {
        "model.safetensors": random.Random(seed).randbytes(3 * 1024 * 1024 + 7),
        "config.json": b'{"hidden_size": 8}\n',
        "blocks/layer.0/notes.txt": f"seed {seed}\n".encode(),
    }


def test_create_repo_and_info(hub: FakeHub) -> None:
    api = HfApi()
    url = api.create_repo(REPO, private=True, exist_ok=True)
    assert url.repo_id == REPO and url.endpoint == hub.url
    assert api.create_repo(REPO, private=True, exist_ok=True).repo_id == REPO  # 409 + exist_ok is fine
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(REPO)
    assert err.value.response.status_code == 409
    api.create_repo("me/public", private=False)

    info = api.model_info(REPO)
    assert info.id == REPO and info.private is True and info.sha == hub.head(REPO)
    assert api.repo_info("me/public").private is False
    assert api.list_repo_files(REPO) == []
    # private repos are invisible without a token, as on the Hub
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info(REPO)


def test_unknown_repo_revision_and_file(hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi()
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("me/missing")
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_files("me/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("me/missing", "config.json", cache_dir=tmp_path / "dl")
    with pytest.raises(RepositoryNotFoundError):
        api.upload_folder(folder_path=write_folder(tmp_path / "f", {"a.txt": b"a"}), repo_id="me/missing")

    api.create_repo(REPO)
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(REPO, revision="nope")
    with pytest.raises(RevisionNotFoundError):  # commits go to existing branches only
        api.upload_folder(folder_path=tmp_path / "f", repo_id=REPO, revision="nope")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "absent.txt", cache_dir=tmp_path / "dl")
    assert hub.errors == []


def test_upload_folder_arrives_byte_identical(hub: FakeHub, tmp_path: Path, upload_path: bool) -> None:
    api = HfApi()
    api.create_repo(REPO, exist_ok=True)
    files = model_files()
    info = api.upload_folder(folder_path=write_folder(tmp_path / "run", files), repo_id=REPO, commit_message="run 1")

    assert hub.files(REPO) == files
    assert info.oid == hub.head(REPO) == api.model_info(REPO).sha
    assert hub.commits[-1]["message"] == "run 1"
    assert sorted(api.list_repo_files(REPO)) == sorted(files)
    # every byte went inline in the commit: no LFS/Xet endpoint was called
    assert not [path for _, path in hub.requests if "lfs" in path or "xet" in path]


def test_branches_are_separate(hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo(REPO)
    main_files = model_files(0)
    api.upload_folder(folder_path=write_folder(tmp_path / "main", main_files), repo_id=REPO, revision="main")
    api.create_branch(REPO, branch="v1", exist_ok=True)
    api.create_branch(REPO, branch="v1", exist_ok=True)  # 409 swallowed
    assert hub.files(REPO, "v1") == main_files  # a branch starts at main's head

    v1_files = {"model.safetensors": model_files(1)["model.safetensors"], "extra/only-v1.txt": b"v1\n"}
    api.upload_folder(folder_path=write_folder(tmp_path / "v1", v1_files), repo_id=REPO, revision="v1")

    assert hub.files(REPO, "main") == main_files
    assert hub.files(REPO, "v1") == {**main_files, **v1_files}
    assert "extra/only-v1.txt" in api.list_repo_files(REPO, revision="v1")
    assert "extra/only-v1.txt" not in api.list_repo_files(REPO, revision="main")
    assert api.model_info(REPO, revision="v1").sha == hub.head(REPO, "v1") != hub.head(REPO, "main")
    assert {b.name for b in api.list_repo_refs(REPO).branches} == {"main", "v1"}


def test_downloads_are_byte_identical(hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo(REPO)
    api.upload_folder(folder_path=write_folder(tmp_path / "main", model_files(0)), repo_id=REPO)
    api.create_branch(REPO, branch="v1")
    api.upload_folder(folder_path=write_folder(tmp_path / "v1", model_files(1)), repo_id=REPO, revision="v1")
    cache = tmp_path / "dl"

    for revision in ("main", "v1"):
        expected = hub.files(REPO, revision)
        path = Path(hf_hub_download(REPO, "model.safetensors", revision=revision, cache_dir=cache))
        assert path.read_bytes() == expected["model.safetensors"]
        nested = Path(hf_hub_download(REPO, "blocks/layer.0/notes.txt", revision=revision, cache_dir=cache))
        assert nested.read_bytes() == expected["blocks/layer.0/notes.txt"]

        snapshot = Path(snapshot_download(REPO, revision=revision, cache_dir=cache))
        assert snapshot.name == hub.head(REPO, revision)  # the client keyed its cache by our commit id
        got = {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()}
        assert got == expected
    assert ("HEAD", f"/{REPO}/resolve/v1/model.safetensors") in hub.requests


def test_model_card_round_trip(hub: FakeHub) -> None:
    HfApi().create_repo(REPO)
    card = ModelCard("---\nlicense: apache-2.0\ntags:\n- relearn\n- test\n---\n\n# Re-learned block\n\nText.\n")
    card.push_to_hub(REPO)

    assert ("POST", "/api/validate-yaml") in hub.requests
    assert hub.files(REPO)["README.md"] == str(card).encode()
    loaded = ModelCard.load(REPO)
    assert loaded.data.license == "apache-2.0" and loaded.data.tags == ["relearn", "test"]
    assert "# Re-learned block" in loaded.text
    assert HfApi().model_info(REPO).card_data.license == "apache-2.0"


def test_bad_card_yaml_is_refused_by_validate_yaml(hub: FakeHub, tmp_path: Path) -> None:
    HfApi().create_repo(REPO)
    # ModelCard() itself rejects bad YAML client-side; upload_folder sends README.md to /api/validate-yaml first
    folder = write_folder(tmp_path / "run", {"README.md": b"---\nlicense: [unclosed\n---\n# x\n"})
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        HfApi().upload_folder(folder_path=folder, repo_id=REPO)
    assert hub.requests[-1] == ("POST", "/api/validate-yaml")
    assert hub.files(REPO) == {}


def test_stop_refuses_connections(hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo(REPO)  # leaves a pooled keep-alive connection that stop() must cut as well
    folder = write_folder(tmp_path / "run", {"a.txt": b"a"})
    host, port = hub.url.removeprefix("http://").split(":")
    seen = len(hub.requests)
    hub.stop()

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=2).close()
    with pytest.raises(httpx2.ConnectError):  # after the client's 5 (instant) retries
        api.upload_folder(folder_path=folder, repo_id=REPO)
    assert len(hub.requests) == seen


def test_fail_next_any_path_is_not_retried_by_model_info(hub: FakeHub) -> None:
    HfApi().create_repo(REPO)
    hub.fail_next = 1
    with pytest.raises(HfHubHTTPError) as err:
        HfApi().model_info(REPO)
    assert err.value.response.status_code == 500 and hub.fail_next == 0
    assert HfApi().model_info(REPO).id == REPO


def test_preupload_retries_absorb_five_failures_not_six(hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo(REPO)
    folder = write_folder(tmp_path / "run", {"a.txt": b"a"})
    hub.fail_next, hub.fail_match = 6, "/preupload/"
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_folder(folder_path=folder, repo_id=REPO)
    assert err.value.response.status_code == 500
    assert hub.requests.count(("POST", f"/api/models/{REPO}/preupload/main")) == 6
    assert hub.files(REPO) == {}

    hub.fail_next = 5
    api.upload_folder(folder_path=folder, repo_id=REPO)
    assert hub.files(REPO) == {"a.txt": b"a"}


def test_download_head_is_tried_seven_times(hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo(REPO)
    api.upload_folder(folder_path=write_folder(tmp_path / "run", {"a.txt": b"a"}), repo_id=REPO)
    hub.fail_next, hub.fail_match = 7, "/resolve/"
    # hf_hub_download turns a failed metadata HEAD (nothing cached) into LocalEntryNotFoundError
    with pytest.raises(LocalEntryNotFoundError) as err:
        hf_hub_download(REPO, "a.txt", cache_dir=tmp_path / "dl")
    assert isinstance(err.value.__cause__, HfHubHTTPError) and err.value.__cause__.response.status_code == 500
    assert hub.requests.count(("HEAD", f"/{REPO}/resolve/main/a.txt")) == 7

    hub.fail_next = 6
    assert Path(hf_hub_download(REPO, "a.txt", cache_dir=tmp_path / "dl")).read_bytes() == b"a"


def test_failed_commit_then_retry_leaves_exactly_the_right_files(
    hub: FakeHub, tmp_path: Path, upload_path: bool
) -> None:
    api = HfApi()
    api.create_repo(REPO)
    api.upload_folder(folder_path=write_folder(tmp_path / "old", {"old.txt": b"old", "a.txt": b"v0"}), repo_id=REPO)
    before = hub.files(REPO)
    files = model_files() | {"a.txt": b"v1"}
    folder = write_folder(tmp_path / "run", files)
    # the pipelined uploader (hf_xet installed) retries its commit POST 5 times; create_commit does not retry
    attempts = 6 if upload_path else 1
    hub.fail_next, hub.fail_match = attempts, "/commit/"

    with pytest.raises(HfHubHTTPError) as err:
        api.upload_folder(folder_path=folder, repo_id=REPO, commit_message="push")
    assert err.value.response.status_code == 500
    assert hub.requests.count(("POST", f"/api/models/{REPO}/commit/main")) == 1 + attempts
    assert hub.files(REPO) == before  # a failed commit changes nothing

    n_commits = len(hub.commits)
    info = api.upload_folder(folder_path=folder, repo_id=REPO, commit_message="push")
    assert hub.files(REPO) == before | files
    assert len(hub.commits) == n_commits + 1 and info.oid == hub.head(REPO)

    # running it once more is a no-op: the client sees unchanged oids in preupload and makes no commit
    assert api.upload_folder(folder_path=folder, repo_id=REPO).oid == hub.head(REPO)
    assert len(hub.commits) == n_commits + 1
    assert hub.errors == []


def test_fake_hub_endpoint_restores_the_client(tmp_path: Path) -> None:
    from huggingface_hub import hf_api

    def state() -> tuple:
        return (
            constants.ENDPOINT,
            constants.HUGGINGFACE_CO_URL_TEMPLATE,
            constants.HF_HUB_OFFLINE,
            constants.HF_HUB_CACHE,
            hf_api.api.endpoint,
            os.environ.get("HF_TOKEN"),
            os.environ.get("HF_ENDPOINT"),
        )

    before = state()
    with FakeHub() as hub, fake_hub_endpoint(hub, cache_dir=tmp_path):
        assert HfApi().endpoint == hf_api.api.endpoint == constants.ENDPOINT == hub.url
        assert constants.HF_HUB_OFFLINE is False and constants.HF_HUB_CACHE == str(tmp_path)
    assert state() == before


def test_seeded_repo_is_served(hub: FakeHub, tmp_path: Path) -> None:
    sha = hub.commit("org/seeded", {"a/b.txt": b"seed"}, branch="v2", private=True)
    assert HfApi().list_repo_files("org/seeded", revision="v2") == ["a/b.txt"]
    assert Path(hf_hub_download("org/seeded", "a/b.txt", revision=sha, cache_dir=tmp_path)).read_bytes() == b"seed"
    assert hub.files("org/seeded", sha[:7]) == {"a/b.txt": b"seed"}
