"""The settings every section reads: scale, budget, folders, model, data, seed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hdopt.report.scales import Budget, budget

DATA_ENV = "HDOPT_DATA_DIR"
SHARED_DATA = Path("..") / "shared" / "data"  # where the project's benchmark data sits next to a checkout


def default_data_dir() -> Path | None:
    """``$HDOPT_DATA_DIR``, else ``../shared/data`` when it exists, else None (the hub, when online)."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return SHARED_DATA.resolve() if SHARED_DATA.is_dir() else None


@dataclass
class Context:
    """Attributes: scale and its budget, the report folder, the model alias or path, the data folder
    (None: the Hugging Face hub), the seed, and torch's CPU thread count."""

    scale: str
    folder: Path
    model: str = "smollm2-135m"
    data_dir: Path | None = None
    seed: int = 0
    threads: int = 2

    @property
    def budget(self) -> Budget:
        return budget(self.scale)

    def section_dir(self, key: str) -> Path:
        path = self.folder / "runs" / key
        path.mkdir(parents=True, exist_ok=True)
        return path

    def rel(self, path: str | Path) -> str:
        """``path`` relative to the report folder (how the report refers to its own files)."""
        return Path(path).resolve().relative_to(self.folder.resolve()).as_posix()

    def data_flag(self) -> str:
        return f" --data-dir {self.data_dir}" if self.data_dir else ""

    def settings(self) -> dict:
        """What a cached section must match to be reused."""
        return {"scale": self.scale, "model": self.model, "seed": self.seed,
                "data_dir": str(self.data_dir) if self.data_dir else None,
                "budget": self.budget.to_dict()}  # fmt: skip
