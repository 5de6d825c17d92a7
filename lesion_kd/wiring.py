"""How a method (a ``SegmentationModule``) and the data module (``LesionDataModule``) are connected: explicitly,
by one function, instead of each reaching into the other through the trainer.

What each side needs of the other:

* the data module, of the method: whether to build the unlabeled training stream (``model.uses_unlabeled``),
  and the per-sample extras its training loaders add (``model.sample_extras()``: a picklable callable run in the
  loader workers, or None; SemiKD's and the teacher read-out's cached teacher embeddings, ready after the
  method's set-up, so the data module keeps the provider and calls it when it builds the loaders);
* the method, of the data module (``model.connect_data(dm)``, read as ``model.wired_data``): its splits and
  dataset name in set-up (the teacher cache), ``hparams.eval_original_resolution`` and ``sample_by_index`` in
  evaluation.

:func:`wire` does both. ``lesion-kd fit/validate/test/predict`` call it once, right after instantiating the two
(``LesionCLI.after_instantiate_classes``). Code that builds them itself may call it before
``trainer.fit(model, datamodule=dm)``, and need not: ``LesionDataModule.setup``, the first hook Lightning runs,
calls the same :func:`wire` for the module it is being trained or evaluated with when that is not the one it is
wired to. Both sides are duck-typed here (a data module without ``attach``, a module without ``connect_data``,
is left as it is), so this module imports nothing of the suite.
"""

from __future__ import annotations

__all__ = ["wire"]


def wire(model, datamodule) -> None:
    """Connect ``model`` and ``datamodule`` both ways (see the module docstring); either may be None."""
    if model is None or datamodule is None:
        return
    attach = getattr(datamodule, "attach", None)
    if attach is not None:
        attach(model, uses_unlabeled=bool(getattr(model, "uses_unlabeled", False)),
               sample_extras=getattr(model, "sample_extras", None))
    connect = getattr(model, "connect_data", None)
    if connect is not None:
        connect(datamodule)
