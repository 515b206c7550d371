"""TensorBoard that shows what matters, in each trial's dir of the run dir.

Per trial, by epoch: `val/acc`, `val/loss`, `train/loss`, `lr/backbone`, `lr/head`, `images_per_s`,
and nothing of Ray's bookkeeping (`TrialBoard` replaces Ray's TBXLoggerCallback). The HParams tab
gets the search space's own domains, replayed through Optuna: categorical and integer
hyperparameters as discrete values (a batch size of 64, not 64.000; shown as strings, the only
kind TensorBoard prints as given and filters by checkbox), floats as their interval,
and the final metrics. After the export, the exported trial also gets its validation confusion
matrix and a grid of the validation images it gets wrong (`write_export_images`)."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import optuna
from ray.tune.experiment import Trial
from ray.tune.logger import LoggerCallback
from tensorboardX import SummaryWriter
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.summary import scalar
from tensorboardX.proto.api_pb2 import DataType, Experiment, HParamInfo, Interval, MetricInfo, MetricName, Status
from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo, SessionStartInfo
from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata

from tuning.lib import metrics as M

# TensorBoard tag <- the trainable's metric; a missing learning rate is a frozen backbone's: 0
SCALARS = {
    "val/acc": M.VAL_ACC, "val/loss": M.VAL_LOSS, "train/loss": M.TRAIN_LOSS,
    "lr/backbone": M.LR_BACKBONE, "lr/head": M.LR_HEAD, "images_per_s": M.IMAGES_PER_S,
}
FINAL_METRICS = ("val/acc", "val/loss", "train/loss")
EXPORT_TAGS = ("export/val_confusion_matrix", "export/val_misclassified")


def domains(space: Callable[[optuna.Trial], Any], draws: int = 256) -> dict[str, optuna.distributions.BaseDistribution]:
    """Every hyperparameter's full domain, found by asking a define-by-run space for random points
    (it does no work): the union over its branches (lr's range differs with the optimizer)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    found: dict[str, optuna.distributions.BaseDistribution] = {}
    for _ in range(draws):
        trial = study.ask()
        space(trial)
        for name, dist in trial.distributions.items():
            found[name] = _union(found.get(name), dist)
        study.tell(trial, 0.0)
    return found


def _union(a, b):
    if a is None:
        return b
    if isinstance(b, optuna.distributions.FloatDistribution):
        return optuna.distributions.FloatDistribution(min(a.low, b.low), max(a.high, b.high), log=a.log or b.log)
    if isinstance(b, optuna.distributions.IntDistribution):
        return optuna.distributions.IntDistribution(min(a.low, b.low), max(a.high, b.high), step=b.step)
    return optuna.distributions.CategoricalDistribution(list(dict.fromkeys([*a.choices, *b.choices])))


def _plugin_summary(tag: str, data: HParamsPluginData) -> Summary:
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams", content=data.SerializeToString()))
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


def discrete_values(dist: optuna.distributions.BaseDistribution) -> list[str] | None:
    """The values of a categorical or integer hyperparameter, as the HParams tab shows them. As
    strings: TensorBoard prints every number with five digits (a batch size of 64.000, a freeze
    depth of 0.0000) and offers a checkbox per value only for strings."""
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return [str(c) for c in dist.choices]
    if isinstance(dist, optuna.distributions.IntDistribution):
        return [str(v) for v in range(dist.low, dist.high + 1, dist.step)]
    return None


def experiment_summary(space_domains: dict[str, optuna.distributions.BaseDistribution]) -> Summary:
    infos = []
    for name, dist in space_domains.items():
        info = HParamInfo(name=name)
        values = discrete_values(dist)
        if values is not None:
            info.type = DataType.Value("DATA_TYPE_STRING")
            info.domain_discrete.extend(values)
        else:
            info.type = DataType.Value("DATA_TYPE_FLOAT64")
            info.domain_interval.CopyFrom(Interval(min_value=dist.low, max_value=dist.high))
        infos.append(info)
    metrics = [MetricInfo(name=MetricName(tag=tag)) for tag in FINAL_METRICS]
    return _plugin_summary("_hparams_/experiment", HParamsPluginData(experiment=Experiment(hparam_infos=infos, metric_infos=metrics)))


def session_start(config: dict[str, Any], group: str, space_domains: dict | None = None) -> Summary:
    info = SessionStartInfo(group_name=group)
    discrete = {n for n, d in (space_domains or {}).items() if discrete_values(d) is not None}
    for name, value in config.items():
        if isinstance(value, str) or name in discrete:
            info.hparams[name].string_value = str(value)
        elif isinstance(value, bool):
            info.hparams[name].bool_value = value
        elif isinstance(value, (int, float, np.integer, np.floating)):  # numpy scalars: Ray #4528
            info.hparams[name].number_value = float(value)
    return _plugin_summary("_hparams_/session_start_info", HParamsPluginData(session_start_info=info))


def session_end(ok: bool) -> Summary:
    status = Status.Value("STATUS_SUCCESS" if ok else "STATUS_FAILURE")
    return _plugin_summary("_hparams_/session_end_info", HParamsPluginData(session_end_info=SessionEndInfo(status=status)))


class EventFile:
    """A trial's event file, written and flushed in the caller's thread. SummaryWriter queues events
    for a thread that flushes every `flush_secs`, and its flush() leaves the queue unwritten: a trial
    stopped by the budget or Ctrl-C kept a 0-byte file, as Ray's last copy to the run dir comes before
    any hook where the writer could be closed."""

    def __init__(self, logdir: str) -> None:
        self.events = EventsWriter(os.path.join(logdir, "events"))

    def add(self, summaries: list[Summary], step: int | None = None) -> None:
        for summary in summaries:
            event = Event(summary=summary, wall_time=time.time())
            if step is not None:
                event.step = step
            self.events.write_event(event)
        self.events.flush()

    def close(self) -> None:
        self.events.close()


class TrialBoard(LoggerCallback):
    """One event file per trial, in the trial's dir (Ray copies it to the run dir with the rest).
    Each result is on disk before Ray's next copy, whatever later ends the trial."""

    _SAVED_FILE_TEMPLATES = ["events.out.tfevents.*"]

    def __init__(self, space_domains: dict[str, optuna.distributions.BaseDistribution]) -> None:
        self.space_domains = space_domains
        self.writers: dict[Trial, EventFile] = {}

    def log_trial_start(self, trial: Trial) -> None:
        if trial in self.writers:
            self.writers[trial].close()
        trial.init_local_path()
        writer = EventFile(trial.local_path)
        writer.add([experiment_summary(self.space_domains), session_start(dict(trial.config), trial.trial_id, self.space_domains)])
        self.writers[trial] = writer

    def log_trial_result(self, iteration: int, trial: Trial, result: dict) -> None:
        if trial not in self.writers:
            self.log_trial_start(trial)
        # the epoch a result belongs to: a report at a rung inside epoch 2 (1.333) is drawn at step 2 too
        step = math.ceil(result.get(M.EPOCH) or result.get("training_iteration", iteration))
        if result.get(M.VAL_ACC) is None:
            return
        values = {tag: result.get(key, 0.0 if key == M.LR_BACKBONE else None) for tag, key in SCALARS.items()}
        self.writers[trial].add([scalar(tag, float(v)) for tag, v in values.items() if v is not None], step)

    def log_trial_end(self, trial: Trial, failed: bool = False) -> None:
        writer = self.writers.pop(trial, None)
        if writer is not None:
            writer.add([session_end(not failed)])
            writer.close()

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        # trials the budget or Ctrl-C stopped get no log_trial_end; their results are on disk already
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


def write_export_images(trial_dir: Path, export_dir: Path, val, predicted: np.ndarray | None = None) -> None:
    """The exported model's confusion matrix on the validation split and a grid of the validation
    images it misclassifies (true -> predicted in the grid's caption row order), as TensorBoard images.
    `predicted`: its class per val image where already known (the final model's), else the export
    predicts them here (seconds at 224 px on a CPU)."""
    import torch
    import torchvision

    from tuning.app.export import META_FILE, load_exported
    from tuning.lib.checkpoint import forward_batch_size
    from tuning.lib.data.transforms import eval_batch

    meta = json.loads((export_dir / META_FILE).read_text())
    x = eval_batch(val.images, meta["image_size"])
    if predicted is None:
        model, meta, norm = load_exported(export_dir)
        step = forward_batch_size(torch.device("cpu"))  # small CPU batches are faster (benchmarks/README.md)
        with torch.inference_mode():
            predicted = torch.cat([model(norm(x[i : i + step])).argmax(1) for i in range(0, len(x), step)]).numpy()
    labels = np.asarray(val.labels)
    classes = meta["classes"]
    matrix = np.zeros((len(classes), len(classes)), dtype=int)
    np.add.at(matrix, (labels, predicted), 1)
    writer = SummaryWriter(str(trial_dir), filename_suffix=".export")
    writer.add_image(EXPORT_TAGS[0], confusion_image(matrix, classes), dataformats="HWC")
    wrong = np.flatnonzero(labels != predicted)[:64]
    if len(wrong):
        images = x[wrong.tolist()].float()
        images = images / 255.0 if images.max() > 1.0 else images
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        grid = torchvision.utils.make_grid(images, nrow=int(math.ceil(math.sqrt(len(wrong)))), padding=2)
        writer.add_image(EXPORT_TAGS[1], grid.numpy(), dataformats="CHW")
        writer.add_text("export/val_misclassified_labels", ", ".join(
            f"{classes[labels[i]]}->{classes[predicted[i]]}" for i in wrong))
    writer.close()


def confusion_image(matrix: np.ndarray, classes: list[str]) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = 2.5 + 0.45 * len(classes)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
           title="val confusion matrix")
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    for (i, j), n in np.ndenumerate(matrix):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > matrix.max() / 2 else "black")
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image
