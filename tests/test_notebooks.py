import nbformat
from nbclient import NotebookClient

from conftest import ROOT


def run_notebook(name: str, tmp_path) -> tuple[str, list]:
    """Execute ``notebooks/<name>`` in a fresh kernel: its printed text and its PNG outputs."""
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    pngs = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    return text, pngs


def test_quickstart_notebook_runs_end_to_end(tmp_path):
    text, pngs = run_notebook("quickstart.ipynb", tmp_path)
    assert "random init" in text and "trained" in text
    assert "1/class (10 images): kNN top-1" in text and "10% (127 images)" in text  # few labels, from Python
    assert len(pngs) == 1


def test_embedding_search_notebook_runs_end_to_end(tmp_path):
    text, pngs = run_notebook("embedding_search.ipynb", tmp_path)
    assert "300 images" in text and "query: " in text and "leave-one-out retrieval over 300 queries" in text
    recall = float(text.split("'recall@1': ")[1].split(",")[0])
    assert recall > 80, text  # a trained encoder finds same-digit neighbours
    assert len(pngs) == 2  # the gallery and the map
