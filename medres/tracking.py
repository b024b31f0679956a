"""Optional experiment tracking (`train.log_to: [tensorboard, mlflow]`): the resolved config as
params, every epoch's record as metrics, the checkpoint, curves and model card as artifacts.

Trackers are imported only when asked for (`pip install 'medres[tracking]'`); a missing one is a
config error before training starts. The default MLflow store is a SQLite file inside the run folder
(MLflow 3 keeps its file-system store in maintenance mode), so nothing leaves the machine unless
`train.mlflow_uri` names a server.
"""

from __future__ import annotations

import logging
from pathlib import Path

from medres.errors import ConfigInvalid

log = logging.getLogger(__name__)


def _flat(tree: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


class Tracker:
    def __init__(self, cfg, out: Path):
        self.names = list(cfg.train.log_to)
        self.out = Path(out)
        self.tb = None
        self.mlflow = None
        self.run_id: str | None = None
        params = _flat(cfg.model_dump(mode="json"))
        if "tensorboard" in self.names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigInvalid("train.log_to: tensorboard needs the tensorboard package (pip install 'medres[tracking]')") from None
            self.tb = SummaryWriter(str(self.out / "tensorboard"))
            self.tb.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))
        if "mlflow" in self.names:
            try:
                import mlflow
            except ImportError:
                raise ConfigInvalid("train.log_to: mlflow needs mlflow (pip install 'medres[tracking]')") from None
            self.mlflow = mlflow
            uri = cfg.train.mlflow_uri or f"sqlite:///{(self.out / 'mlflow.db').resolve()}"
            mlflow.set_tracking_uri(uri)
            experiment = mlflow.get_experiment_by_name(cfg.name)
            if experiment is None:
                artifacts = None if cfg.train.mlflow_uri else (self.out / "mlartifacts").resolve().as_uri()
                experiment_id = mlflow.create_experiment(cfg.name, artifact_location=artifacts)
            else:
                experiment_id = experiment.experiment_id
            run = mlflow.start_run(experiment_id=experiment_id, run_name=self.out.name)
            self.run_id = run.info.run_id
            mlflow.log_params(params)
            log.info("mlflow run %s at %s", self.run_id, uri)

    def epoch(self, record: dict) -> None:
        step = int(record["epoch"])
        metrics = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"}
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics(metrics, step=step)

    def finish(self, artifacts: list[Path], summary: dict | None = None) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            for key, value in (summary or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.mlflow.log_metric(key, float(value))
            for path in artifacts:
                if Path(path).is_file():
                    self.mlflow.log_artifact(str(path))
            self.mlflow.end_run()

    def abort(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run(status="FAILED")
