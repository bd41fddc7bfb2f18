"""What an `RMTKDTrainer` checkpoint holds beyond `Trainer`'s: the teacher, the kept bases, the reduced shapes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from .configuration_rmtkd import RMTKDConfig
from .kept_basis import load_stream_maps, save_stream_maps
from .structure import apply_structure


TEACHER_DIR = "rmtkd_teacher"


def save_run_extras(trainer, checkpoint: Path) -> None:
    """Write the pre-reduction teacher (a resumed run distils from the same one) and the kept bases of hidden-width
    reductions (what representation distillation maps the teacher through) into `checkpoint`.

    Called before `Trainer` writes its own files, so a checkpoint with a `trainer_state.json` always has them."""
    checkpoint.mkdir(parents=True, exist_ok=True)
    if trainer.teacher is not None and trainer.args.distillation_teacher == "self":
        trainer.teacher.save_pretrained(checkpoint / TEACHER_DIR)
    save_stream_maps(trainer.model, checkpoint)


def restore_reductions(trainer, checkpoint: Path) -> None:
    """Rebuild the reduced shapes, the schedule's state, the kept bases and the teacher from `checkpoint` (the
    weights are loaded by `Trainer` right after).

    Raises:
        `ValueError` if the checkpoint holds a reduced model but not its teacher (`rmtkd_teacher/` missing).
    """
    model = trainer.model
    saved = RMTKDConfig.from_json_file(checkpoint / "config.json")  # 0.1.0 records are converted on read
    new = {k: v for k, v in saved.reduced_modules.items() if k not in model.config.reduced_modules}
    model.config.reduced_modules.update(new)
    if saved.hidden_width is not None and model.config.hidden_width != saved.hidden_width:
        # The hidden width changes the architecture itself: rebuild the inner model from the checkpoint's config.
        model.config.hidden_width = saved.hidden_width
        rebuilt = type(model)(copy.deepcopy(model.config)).model
        model.model = rebuilt.to(trainer.args.device).train(model.training)
    else:
        apply_structure(model.model, new)
    model.config.calibration = saved.calibration
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    callback = trainer.reduction_callback
    exported = (state.get("stateful_callbacks") or {}).get(type(callback).__name__)
    if exported:
        callback.load_attributes(exported["attributes"])
    load_stream_maps(model, checkpoint)
    teacher_dir = checkpoint / TEACHER_DIR
    history = callback.history
    if trainer.args.distillation_teacher == "self" and history and not history[-1].get("undone"):
        if not (teacher_dir / "config.json").exists():
            raise ValueError(
                f"{checkpoint} holds a reduced model but not the teacher it distils from ({TEACHER_DIR}/ is missing "
                "or incomplete: was the folder copied without its subfolders, or the run killed while saving?). Copy "
                "the whole checkpoint folder (cp -r), or resume from an earlier checkpoint."
            )
        teacher = type(model).from_pretrained(teacher_dir).to(trainer.args.device)
        trainer.teacher = trainer._snapshot = trainer._freeze(teacher)
