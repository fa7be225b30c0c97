"""An imported checkpoint is an ordinary one: eval, embed, search, classify, explain (rollout) and the web app use it."""

from __future__ import annotations

from pathlib import Path

import pytest

from clipforge.cli import main
from tests.interop.tiny_models import write_hf_clip


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("imported")
    checkpoint = folder / "clip.pt"
    assert main(["import", f"hf:{write_hf_clip(folder / 'hf')}", "--out", str(checkpoint)]) == 0
    return checkpoint


def test_eval_embed_search_and_classify_run_on_an_imported_checkpoint(
    imported: Path, shapes_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    images = shapes_manifest.parent / "images"
    data = ["kind=manifest", f"path={shapes_manifest}"]
    assert main(["eval", "--checkpoint", str(imported), "--task", "retrieval", "--data", *data]) == 0
    assert "image_retrieval_recall@1" in capsys.readouterr().out
    assert main(["embed", "--checkpoint", str(imported), "--images", str(images), "--out", str(tmp_path / "e")]) == 0
    assert (
        main(["search", "--index", str(tmp_path / "e"), "--checkpoint", str(imported), "--query", "a red circle"]) == 0
    )
    assert (
        main(["classify", "--checkpoint", str(imported), "--labels", "red,blue", str(next(images.glob("*.png")))]) == 0
    )
    assert "%" in capsys.readouterr().out


def test_rollout_explains_an_imported_vit(imported: Path, shapes_manifest: Path, tmp_path: Path) -> None:
    image = next((shapes_manifest.parent / "images").glob("*.png"))
    out = tmp_path / "explain.png"
    command = ["explain", "--checkpoint", str(imported), "--image", str(image), "--text", "a red circle"]
    assert main([*command, "--method", "rollout", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_web_page_serves_an_imported_checkpoint(imported: Path, shapes_manifest: Path, tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from clipforge.search.app import create_app
    from clipforge.search.index import Index

    images = shapes_manifest.parent / "images"
    assert main(["embed", "--checkpoint", str(imported), "--images", str(images), "--out", str(tmp_path / "e")]) == 0
    client = TestClient(create_app(Index.load(tmp_path / "e", str(imported))))
    response = client.get("/api/search", params={"q": "a blue square", "k": 3})
    assert response.status_code == 200 and len(response.json()["results"]) == 3


def test_commands_take_an_hf_folder_as_checkpoint_with_no_import_step(
    imported: Path, shapes_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """One weights resolution: ``--checkpoint hf:FOLDER`` is read where a checkpoint is, with the same outputs."""
    folder = write_hf_clip(tmp_path / "hf")
    image = str(next((shapes_manifest.parent / "images").glob("*.png")))
    capsys.readouterr()
    assert main(["classify", "--checkpoint", f"hf:{folder}", "--labels", "red,blue", image]) == 0
    direct = capsys.readouterr().out
    assert main(["classify", "--checkpoint", str(imported), "--labels", "red,blue", image]) == 0
    assert capsys.readouterr().out == direct and "%" in direct
