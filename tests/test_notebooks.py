"""Execute every ablation notebook at toy size (nbclient), so they cannot rot.

Each notebook runs in a fresh ``python3`` kernel with ``LORI_NOTEBOOK_TOY=1`` (tiny random Llama,
a few steps per run) and ``LORI_NOTEBOOK_OUT`` set to a temp dir, two kernels at a time
(``LORI_NOTEBOOK_PARALLEL`` changes that); the tests check that every cell ran and that each
notebook wrote and showed its plots. The notebooks assert their own invariants.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
CELL_TIMEOUT = 300  # seconds; a cell runs a whole sweep

# notebook -> (results folder under LORI_NOTEBOOK_OUT, plots it writes there)
EXPECTED = {
    "ablation_sparsity_lr.ipynb": ("sparsity_lr", ["sparsity_lr.png"]),
    "ablation_granularity.ipynb": ("granularity", ["granularity.png", "sparsity_by_layer.png"]),
    "ablation_calibration_steps.ipynb": ("calibration_steps", ["calibration_steps.png"]),
    "ablation_merge_weights.ipynb": ("merge_weights", ["merge_weights.png"]),
}


def test_every_notebook_is_listed():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_is_committed_without_outputs(name):
    book = json.loads((NOTEBOOKS / name).read_text())
    nbformat.validate(nbformat.from_dict(book))
    for cell in book["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{name}: strip the outputs"


async def _execute_all(names: list[str], out: Path, parallel: int) -> dict[str, tuple[Any, Exception | None]]:
    """Execute the notebooks, ``parallel`` kernels at a time; name -> (executed notebook, error)."""
    gate = asyncio.Semaphore(parallel)

    async def one(name: str) -> tuple[Any, Exception | None]:
        async with gate:
            book = nbformat.read(NOTEBOOKS / name, as_version=4)
            client = nbclient.NotebookClient(
                book, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(out)}},
            )
            try:
                await client.async_execute()
            except Exception as err:  # noqa: BLE001 - reported by the notebook's own test
                return book, err
            return book, None

    results = await asyncio.gather(*(one(name) for name in names))
    return dict(zip(names, results))


@pytest.fixture(scope="module")
def executed(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, dict[str, tuple[Any, Exception | None]]]:
    """The selected notebooks executed once at toy size, two kernels at a time (the toy runs are
    single-threaded, so two kernels use two cores)."""
    names = sorted({item.callspec.params["name"] for item in request.session.items
                    if getattr(item, "originalname", None) == "test_notebook_runs_at_toy_size"})
    out = tmp_path_factory.mktemp("notebooks")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORI_NOTEBOOK_TOY", "1")
        mp.setenv("LORI_NOTEBOOK_OUT", str(out))
        mp.setenv("OMP_NUM_THREADS", "1")  # toy model: threads only contend
        parallel = int(os.environ.get("LORI_NOTEBOOK_PARALLEL", "2"))
        return out, asyncio.run(_execute_all(names, out, parallel))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_at_toy_size(name, executed):
    out, results = executed
    book, error = results[name]
    if error is not None:
        raise error  # CellExecutionError names the cell and carries the kernel's traceback
    errors = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    folder, plots = EXPECTED[name]
    for plot in plots:
        path = out / folder / plot
        assert path.is_file() and path.stat().st_size > 1000, f"{name} did not write {path}"
    shown = [o for c in book.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(shown) == len(plots)
