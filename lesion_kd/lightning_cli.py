"""LesionCLI: LightningCLI with the suite's extras (imported only for fit/validate/test/predict, so that
the suite's own commands, e.g. ``segment`` from an ONNX file, run without Lightning or the training code)."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from .callbacks import LesionCheckpoint
from .data import LesionDataModule
from .data.datamodule import DEFAULT_DATASET
from .io_utils import atomic_copy
from .methods import SegmentationModule
from .results_name import CellName
from .wiring import wire


class LesionCLI(LightningCLI):
    """LightningCLI with the suite's extras: best-by-val-Dice checkpoints, test after fit, W&B, results copy."""

    def __init__(self, *args, **kwargs) -> None:
        argv = kwargs.get("args")
        # the one subcommand this command line runs (None: not known here, every subcommand gets its parser)
        self._only = argv[0] if isinstance(argv, list) and argv and argv[0] in LightningCLI.subcommands() else None
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        """Only the subcommand being run: LightningCLI builds a parser for each of fit/validate/test/predict
        (the trainer's, the method's and the data module's signatures introspected four times, ~1 s of
        ``lesion-kd fit --help``), and a command line runs one of them."""
        every = LightningCLI.subcommands()
        return {self._only: every[self._only]} if getattr(self, "_only", None) else every

    def add_arguments_to_parser(self, parser) -> None:
        from typing import Literal, Union

        parser.add_lightning_class_args(LesionCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/dice",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-{step}",
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="after fit, test the best checkpoint and write metrics.json")
        parser.add_argument("--wandb", type=bool, default=False,
                            help="also log to Weights & Biases (offline unless WANDB_API_KEY / WANDB_MODE say otherwise)")
        parser.add_argument("--wandb_log_model", type=Union[bool, Literal["all"]], default=False,
                            help="with --wandb: upload checkpoints as W&B artifacts at the end of training (true: the "
                                 "best and last, aliased 'best'/'latest'; all: every checkpoint as it is saved)")
        parser.add_argument("--wandb_num_images", type=int, default=4,
                            help="with --wandb: log the first N validation images with predicted and ground-truth "
                                 "masks at every validation (0: none)")
        parser.add_argument("--record_train_ids", type=bool, default=False,
                            help="write train_ids_rank<r>.json (the labeled and unlabeled image ids each process "
                                 "trained on) into the run directory: checks data sharding under DDP")
        parser.add_argument("--on_nonfinite", type=str, default="stop", choices=["stop", "skip"],
                            help="a non-finite loss or gradient stops the run naming the term and step (stop), "
                                 "or drops that step and counts it (skip)")
        parser.add_argument("--max_loss_ratio", type=float, default=100.0,
                            help="stop a run whose training loss exceeds this many times the supervised loss of its "
                                 "first step (a diverged run writes no result; 0: off)")
        parser.add_argument("--predict_output", type=str | None, default=None,
                            help="predict: folder for <id>_mask.png and <id>_overlay.png (default: predictions/ in the run directory)")
        parser.add_argument("--results_root", type=str | None, default=None,
                            help="copy metrics.json and the resolved config to "
                                 "RESULTS_ROOT/<dataset>/<method>-<network>-<labels>pct-seed<k>/ (never checkpoints)")

    def _sub(self):
        return self.config[self.subcommand] if self.subcommand else self.config

    _config_yaml: str | None = None

    def _config_text(self) -> str:
        """The subcommand's resolved config as YAML (every option, defaults included), as ``config.yaml`` holds it.

        Dumped once per run: the method's hyperparameters (LightningCLI's ``_dump_config``), the run record,
        W&B and ``config.yaml`` all read this text (each dumped it again before, ~0.1 s apiece). The parsed
        config does not change once the classes are instantiated."""
        if self._config_yaml is None:
            self._config_yaml = self._parser(self.subcommand).dump(self._sub(), skip_none=False, format="yaml")
        return self._config_yaml

    def _dump_config(self) -> None:
        # LightningCLI's dump of the whole config for the instantiated classes' hyperparameters: the same text,
        # when a subcommand runs (no argument links here, so skip_link_targets changes nothing)
        if hasattr(self, "config_dump"):
            return
        if not self.subcommand:
            return super()._dump_config()
        import yaml

        self.config_dump = yaml.safe_load(self._config_text())

    def _resolved_config(self) -> dict:
        """The resolved config (every option, defaults included) as plain data, without the --config paths."""
        import yaml

        config = yaml.safe_load(self._config_text())
        config.pop("config", None)  # the --config file paths: the resolved values are what matters
        return config

    def instantiate_trainer(self, **kwargs):

        from .callbacks import (
            PROGRESS_FILE_ENV,
            CheckpointOnSigterm,
            DivergenceGuard,
            ProgressFile,
            ProgressLines,
            RunRecord,
            StepSeeding,
            TrainIdsRecorder,
            WandbPredictionImages,
            WandbRunId,
            redact_secrets,
            secret_safe_wandb_logger,
        )

        sub = self._sub()
        configured = sub.get("trainer.logger")
        if configured is None or configured is True:
            # Lightning's default logger is replaced by a CSVLogger below (csv_unless_configured); asking for none
            # here spares its default's warning that tensorboardX is not installed, on every run
            kwargs["logger"] = False
        trainer = super().instantiate_trainer(**kwargs)
        csv_unless_configured(trainer, configured)
        for cb in trainer.callbacks:
            if isinstance(cb, SecretSafeSaveConfig):
                cb.config_text = self._config_text()
        extra: list = [CheckpointOnSigterm(), StepSeeding(), RunRecord(run_options(self._resolved_config())),
                       DivergenceGuard(sub.get("max_loss_ratio", 100.0))]
        if trainer.progress_bar_callback is None:  # a log file, not a terminal: a line now and then instead
            extra.append(ProgressLines())
        if os.environ.get(PROGRESS_FILE_ENV):  # a run of `lesion-kd sweep`: its progress bar reads this file
            extra.append(ProgressFile(os.environ[PROGRESS_FILE_ENV]))
        if self.subcommand == "fit":
            self._resuming = self._resolve_last(trainer)
        if sub.get("record_train_ids"):
            extra.append(TrainIdsRecorder())
        if sub.get("wandb"):
            # Offline unless credentials or an explicit mode say otherwise; a W&B sweep agent (WANDB_SWEEP_ID)
            # may hold its key in ~/.netrc only, and its runs must report to the sweep's server.
            if not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ and "WANDB_SWEEP_ID" not in os.environ:
                os.environ["WANDB_MODE"] = "offline"
            dm = self.datamodule.hparams
            dataset = self.datamodule.dataset_label  # a user folder or listing: its name only
            cell = CellName.of(self.model.results_name, self.model.hparams.network, dm.labeled_fraction,
                               sub.get("seed_everything"))
            name = f"{dataset}-{cell}"
            # the resolved config (every option, defaults included) as the run config, secrets never written
            config = self._resolved_config()
            # a resumed run (--ckpt_path last) continues its W&B run: the id is kept beside the run's files
            id_file = Path(trainer.log_dir) / "wandb_id.txt" if trainer.log_dir else None
            run_id = id_file.read_text().strip() if self._resuming and id_file and id_file.is_file() else None
            logger = secret_safe_wandb_logger(name=name, save_dir=trainer.default_root_dir,
                                              log_model=sub.get("wandb_log_model"), config=redact_secrets(config),
                                              **({"id": run_id, "resume": "allow"} if run_id else {}))
            trainer.loggers = [*trainer.loggers, logger]
            extra += [WandbPredictionImages(sub.get("wandb_num_images")), WandbRunId()]
        # before ModelCheckpoint, which Lightning keeps last
        trainer.callbacks[0:0] = extra
        return trainer

    _resuming = False

    def _resolve_last(self, trainer) -> bool:
        """``--ckpt_path last``: the latest last.ckpt under the run root, resumed in its own run directory."""
        from .resume import find_last_checkpoint, resume_in_place

        sub = self._sub()
        if sub.get("ckpt_path") != "last":
            return False
        ckpt = find_last_checkpoint(trainer.default_root_dir, sub.get("checkpoint", {}).get("dirpath"))
        if ckpt is None:
            print(f"--ckpt_path last: no last.ckpt under {trainer.default_root_dir}; starting a new run", flush=True)
            self.config_init[self.subcommand]["ckpt_path"] = None
            return False
        print(f"--ckpt_path last: resuming {ckpt}", flush=True)
        self.config_init[self.subcommand]["ckpt_path"] = str(ckpt)
        return resume_in_place(trainer, ckpt)

    def after_instantiate_classes(self) -> None:
        # the one place the method and the data module are connected, both ways, for every subcommand
        wire(self.model, self.datamodule)

    def after_fit(self) -> None:
        if not self._sub().get("test_after_fit"):
            return
        ckpt = self.trainer.checkpoint_callback.best_model_path if self.trainer.checkpoint_callback else ""
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt or None)
        self._publish()

    def before_fit(self) -> None:
        self.model.on_nonfinite = self._sub().get("on_nonfinite", "stop")
        ckpt = self.config_init[self.subcommand].get("ckpt_path")
        if ckpt and not os.environ.get(ALLOW_CHANGED_RESUME):
            changed = changed_run_options(ckpt, run_options(self._resolved_config()))
            changed += changed_hparams(ckpt, dict(self.model.hparams), getattr(self.model, "NEUTRAL_ADDED_OPTIONS", None))
            if changed:
                raise SystemExit(
                    f"lesion-kd fit: {ckpt} was trained with another configuration (seed, data, budget or model), "
                    f"and resuming it would mix two runs in one result and overwrite the first one's config.yaml and "
                    f"split.json: {'; '.join(changed)}. Resume with the run's own config.yaml "
                    f"(--config <run>/config.yaml), start a new run (another --trainer.default_root_dir), or set "
                    f"{ALLOW_CHANGED_RESUME}=1 to resume anyway."
                )

    def before_predict(self) -> None:
        self.model.predict_output = self._sub().get("predict_output")

    def after_test(self) -> None:
        self._publish()

    def _publish(self) -> None:
        root = self._sub().get("results_root")
        run_dir = Path(self.trainer.log_dir)  # a collective under DDP: every rank asks
        if not root or not self.trainer.is_global_zero:
            return
        dm, model = self.datamodule, self.model
        cell = CellName.of(model.results_name, model.hparams.network, dm.hparams.labeled_fraction,
                           self._sub().get("seed_everything"))
        dest = Path(root) / dm.dataset_name / cell.folder
        dest.mkdir(parents=True, exist_ok=True)
        # the kept predicted masks of the report's grid (predictions/<id>.png), then metrics.json last: its
        # presence marks a finished cell (reproduce-table)
        for png in sorted((run_dir / "predictions").glob("*.png")):
            atomic_copy(png, dest / "predictions" / png.name)
        for name in ("config.yaml", "metrics_original_resolution.json", "metrics.csv", "metrics.json"):
            if (run_dir / name).is_file():
                atomic_copy(run_dir / name, dest / name)
        print(f"results copied to {dest}")


ALLOW_CHANGED_RESUME = "LESION_KD_RESUME_CHANGED_CONFIG"


def csv_unless_configured(trainer, configured) -> None:
    """Lightning's default logger (``trainer.logger`` left at null/true) is TensorBoard where tensorboard happens
    to be installed and CSV elsewhere; the suite reads ``metrics.csv`` (the report's curves, sweeps, exact
    resume), so the default is a CSVLogger wherever the run happens. A logger the config names is kept."""
    from .callbacks import SecretSafeCSVLogger

    if configured is None or configured is True:
        trainer.loggers = [SecretSafeCSVLogger(save_dir=trainer.default_root_dir)]


# What makes a run this run, besides the model's options (compared through the checkpoint's hyperparameters):
# the seed, the data options except those that only say where things are or how fast they load, and the
# trainer options that set the training budget and its arithmetic.
DATA_NEUTRAL = frozenset({"root", "data_dir", "cache_dir", "num_workers", "predict_input", "run_dir",
                          "eval_original_resolution"})
TRAINER_RUN = ("max_steps", "max_epochs", "min_steps", "min_epochs", "val_check_interval", "check_val_every_n_epoch",
               "accumulate_grad_batches", "precision", "limit_train_batches", "limit_val_batches",
               "gradient_clip_val", "gradient_clip_algorithm", "devices", "num_nodes")


def run_options(config: dict) -> dict:
    """``{"seed_everything": .., "data.<option>": .., "trainer.<budget option>": ..}`` of a resolved config
    (as ``config.yaml`` holds it), secrets redacted: what ``--ckpt_path`` requires to be the same on resume."""
    from .callbacks import redact_secrets

    def flat(d: dict, prefix: str) -> dict:
        out: dict = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}.{k}") if isinstance(v, dict) else {f"{prefix}.{k}": v})
        return out

    out = {"seed_everything": config.get("seed_everything")}
    data = dict(config.get("data") or {})
    if "dataset" in data and data["dataset"] is None and not data.get("root"):
        data["dataset"] = DEFAULT_DATASET  # unset means this (a run from before data.dataset could be unset resumes)
    out.update(flat({k: v for k, v in data.items() if k not in DATA_NEUTRAL}, "data"))
    trainer = config.get("trainer") or {}
    out.update({f"trainer.{k}": trainer.get(k) for k in TRAINER_RUN})
    return redact_secrets(out)


def _norm(v):  # tuples vs lists, numbers vs strings after a round trip: compare what JSON sees
    import json

    return json.loads(json.dumps(v, default=str, sort_keys=True))


def changed_run_options(ckpt: str | os.PathLike, options: dict) -> list[str]:
    """``option: old -> new`` for every run option (``run_options``) that differs between the run a checkpoint
    belongs to and this command. The old options come from the checkpoint (``RunRecord``), else from the
    ``config.yaml`` of its run directory (checkpoints written before the record existed); none: nothing to say."""
    import torch
    import yaml

    old = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("lesion_kd_run")
    if old is None:
        config_file = Path(ckpt).parent.parent / "config.yaml"
        if not config_file.is_file():
            return []
        old = run_options(yaml.safe_load(config_file.read_text()) or {})
    absent = object()
    out = []
    for key in sorted(set(old) | set(options)):
        a, b = old.get(key, absent), options.get(key, absent)
        if a is absent or b is absent:
            continue  # an option added to (or removed from) the code since: the model check covers options
        if _norm(a) != _norm(b):
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def changed_hparams(ckpt: str | os.PathLike, hparams: dict, neutral: dict | None = None) -> list[str]:
    """``key: old -> new`` for every model hyperparameter that differs between a checkpoint and this run.

    A key the checkpoint lacks, i.e. an option added to the code since, counts as changed (its default may
    change the training, as ``map_centered``'s did), unless ``neutral`` names it with the value that trains
    exactly as the code did before the option existed (a module's ``NEUTRAL_ADDED_OPTIONS``) and the run
    has that value."""
    import torch

    from .callbacks import redact_secrets

    norm = _norm
    # mmap: only the small hyper_parameters entry is read, not the weights (the trainer loads those next).
    # Both sides redacted: a checkpoint holds its secrets redacted (RunRecord), and that is no change.
    old = redact_secrets(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters") or {})
    hparams = redact_secrets(hparams)
    absent = object()

    def show(v) -> str:
        return "(absent)" if v is absent else repr(v)

    out = []
    for key in sorted((set(old) | set(hparams)) - {"_instantiator"}):
        a, b = old.get(key, absent), hparams.get(key, absent)
        if a is absent and b is not absent and key in (neutral or {}) and norm(b) == norm(neutral[key]):
            continue
        if a is absent or b is absent or norm(a) != norm(b):
            out.append(f"model.{key.lstrip('_')}: {show(a)} -> {show(b)}")
    return out


class SecretSafeSaveConfig(SaveConfigCallback):
    """``config.yaml`` beside the run, written atomically, secrets redacted (``callbacks.redact_secrets``).

    A config with nothing to redact is written exactly as LightningCLI writes it. A redacted one still resumes:
    ``--config <run>/config.yaml --ckpt_path last`` compares redacted values with redacted values."""

    config_text: str | None = None  # the config as LesionCLI dumped it already (LesionCLI._config_text)

    def setup(self, trainer, pl_module, stage: str) -> None:
        import yaml

        from .callbacks import redact_secrets
        from .data.io import atomic_write_bytes

        if self.already_saved:
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if trainer.is_global_zero and log_dir is not None:
            text = self.config_text or self.parser.dump(self.config, skip_none=False)
            doc = yaml.safe_load(text)
            redacted = redact_secrets(doc)
            if redacted is not doc:
                text = yaml.safe_dump(redacted, sort_keys=False)
            atomic_write_bytes(Path(log_dir) / self.config_filename, text.encode())
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


def run_lightning(args: list[str] | None) -> None:
    LesionCLI(
        SegmentationModule,
        LesionDataModule,
        subclass_mode_model=True,
        save_config_callback=SecretSafeSaveConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
        parser_kwargs={"default_env": False},
    )
