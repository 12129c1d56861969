"""What can be checked about a checkpoint folder without reading a weight: its family (config.json's
``model_type``, through the registry), its dims within the bounds qvlc builds, and its weight files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qvlc.checkpoint.load import (
    read_config_json,
    refuse_remote_code,
    require_folder,
    weight_files,
)
from qvlc.errors import CheckpointError
from qvlc.models import family
from qvlc.models.common.dims import bound_problems

if TYPE_CHECKING:
    from qvlc.models.common.dims import ModelDims
    from qvlc.models.common.family import Family


def inspect_checkpoint(folder: Path) -> tuple["Family", "ModelDims"]:
    """Everything that can be checked about a checkpoint folder without reading a weight: its family (from
    config.json's model_type), its dims, and that its weight files are all there."""
    folder = require_folder(folder)
    config = read_config_json(folder)
    refuse_remote_code(folder)
    try:
        fam = family(str(config.get("model_type")))
    except CheckpointError as exc:  # name the file the model_type came from
        raise CheckpointError(f"{Path(folder) / 'config.json'}: {exc.problem}", fix=exc.fix, key=exc.key) from None
    dims = fam.dims(config, str(Path(folder) / "config.json"))
    if problems := bound_problems(dims):
        raise CheckpointError(f"{Path(folder) / 'config.json'} describes a model beyond any qvlc builds: "
                              + "; ".join(problems), fix="use the config.json that ships with the checkpoint",
                              key="model.checkpoint")
    weight_files(folder)
    return fam, dims
