"""rtdistill: distil vision foundation models into real-time DETR students, from Python or from the shell.

The Python API; each function returns plain Python values and is what the command of the same name runs::

    import distill

    summary = distill.train("experiments/quickstart.yaml", schedule__epochs=2, output_dir="runs/try")
    metrics = distill.evaluate(summary["run_dir"])                  # {'AP': ..., 'AP50': ..., ...}
    dets = distill.predict(["photo.jpg"], checkpoint=summary["run_dir"], threshold=0.3)
    info = distill.export(summary["run_dir"], "model.onnx")          # {'out': 'model.onnx', 'ok': True, ...}

Configs are a YAML path, a dict (``include:`` paths relative to the working directory) or a
:class:`distill.config.TrainConfig`; overrides are ``key.sub=value`` strings (as on the command line, values
read as YAML) and/or keyword arguments with ``__`` for the dots (``schedule__epochs=2``); the strings apply
first. Checkpoints are anything :func:`students.checkpoint.read_weights` takes: a run directory, ``best.pt``, an
official ``.pth``, a saved or Hub directory, or a Hugging Face Hub model id.

Nothing heavy is imported until a function is called, so ``import distill`` (and ``distill --help``) stay
instant. Wrong input raises :class:`distill.errors.UserError` with a one-line reason.
"""

from .api import evaluate, export, load_train_config, override_strings, predict, train

__all__ = ["evaluate", "export", "load_train_config", "override_strings", "predict", "train"]
