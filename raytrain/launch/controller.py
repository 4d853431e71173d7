"""What runs in Ray Train's controller actor: how the datasets are split between the workers, and
the callbacks that relay each epoch's report to the terminal or to Tune. This module imports no
torch (nor raytrain's models): the controller unpickles these, and every trial starts a controller.
"""
from __future__ import annotations

import threading
import time

import ray
import ray.train
import ray.tune
from ray.train import DataConfig

from raytrain.console import epoch_line, progress, say


class SplitData(DataConfig):
    """Train (and its cached first epoch) is split into equal parts (DDP needs the same number of
    steps on every worker); val is split unevenly so that every val sample is evaluated exactly once per epoch.

    Blocks keep the dataset's order (preserve_order), not the order their tasks finish in, and the
    splitter then ignores locality and hands each block to the split with the fewest rows so far:
    which worker sees which samples in which order is the same in every run with the same seed.
    """

    preserve_order = True  # no measurable cost: docs/decisions.md (benchmarks/order.py)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            dataset = ordered(dataset, self._resolve_execution_options(name))
            if world_size == 1:  # one reader needs no split, nor the coordinator actor a split starts
                output[0][name] = dataset.iterator()
                continue
            for rank, split in enumerate(dataset.streaming_split(world_size, equal=(name != "val"))):
                output[rank][name] = split
        return output


def ordered(dataset: ray.data.Dataset, options) -> ray.data.Dataset:
    """A copy of `dataset` that runs with the execution `options` and keeps its blocks' order
    (SplitData.preserve_order). A deep copy, with a DataContext of its own: the datasets made from
    one cached split share theirs, whose options this would otherwise overwrite for all of them."""
    dataset = dataset.copy(dataset, _deep_copy=True)
    options.preserve_order = SplitData.preserve_order
    dataset.context.execution_options = options
    return dataset


def single_reader(dataset: ray.data.Dataset) -> ray.data.DataIterator:
    """The whole of `dataset` for one reader, in its order, as SplitData gives it to a run of one worker."""
    return ordered(dataset, DataConfig.default_ingest_options()).iterator()


class EpochLines(ray.train.UserCallback):
    """Runs in Ray Train's controller actor, whose prints never reach the terminal: it sends its lines
    through a Ray queue to a thread in the driver (show_until), which rank 0's ProgressRelay shares."""

    def __init__(self, label: str, epochs: int):
        from ray.util.queue import Queue

        self.label, self.epochs = label, epochs
        self.queue = Queue(actor_options={"num_cpus": 0})

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put(epoch_line(self.label, metrics[0], self.epochs))


class ProgressRelay:
    """Rank 0's progress within an epoch, from the training loop to the driver: called once a batch,
    it sends (what, done, total) at most every `every_s` seconds, and the end of each epoch."""

    def __init__(self, queue, label: str, epochs: int, every_s: float = 0.5):
        self.queue, self.label, self.epochs, self.every_s = queue, label, epochs, every_s
        self.last = 0.0

    def __call__(self, epoch: int, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last < self.every_s:
            return
        self.last = now
        self.queue.put((f"{self.label} epoch {epoch}/{self.epochs}", done, total))


def show_until(queue, done: threading.Event) -> threading.Thread:
    """A driver thread that prints the lines that arrive on `queue` and draws its ProgressRelays'
    progress (console.progress: one display per run, a new one each epoch), until `done`."""
    from ray.util.queue import Empty

    def pump():
        displays: dict[str, tuple[str, object]] = {}  # run -> (its current epoch's title, display)
        while not done.is_set() or not queue.empty():
            try:
                item = queue.get(timeout=0.5)
            except Empty:
                continue
            if isinstance(item, str):
                say(item)
                continue
            title, count, total = item
            run = title.rsplit(" epoch ", 1)[0]
            if run not in displays or displays[run][0] != title:
                displays[run] = (title, progress(title, leave=False))
            displays[run][1](count, total)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def relays_checkpoint(epoch: int, checkpoint_every: int | None, epochs: int) -> bool:
    """Whether a trial hands Tune its checkpoint of `epoch`: PBT's epochs (every `checkpoint_every`),
    except the last, where _PopulationBasedTraining leaves trials alone."""
    return bool(checkpoint_every) and epoch % checkpoint_every == 0 and epoch < epochs


class RelayToTune(ray.train.UserCallback):
    """Runs in Ray Train's controller: hands each epoch's metrics, and on PBT's epochs the checkpoint,
    to the trial function, which reports them to Tune. (Ray's TuneReportCallback relays metrics only,
    and PBT clones trials by their Tune checkpoints: docs/decisions.md.)"""

    def __init__(self, checkpoint_every: int | None, epochs: int):
        from ray.util.queue import Queue

        self.checkpoint_every, self.epochs = checkpoint_every, epochs
        # One item at a time: Train waits for Tune's decision (stop, pause) before its next epoch.
        self.queue = Queue(maxsize=1, actor_options={"num_cpus": 0})

    def after_report(self, run_context, metrics, checkpoint):
        relay = checkpoint is not None and relays_checkpoint(metrics[0]["epoch"], self.checkpoint_every, self.epochs)
        self.queue.put((metrics[0], checkpoint if relay else None))

    def fit_and_report(self, trainer) -> None:
        """trainer.fit() in a thread while this one reports to Tune; Tune ends the trial by raising
        in ray.tune.report, and the Train run, owned by this trial's actor, ends with it."""
        failure = []

        def fit():
            try:
                trainer.fit()
            except BaseException as err:  # re-raised below, in Tune's thread
                failure.append(err)
            finally:
                self.queue.put(None)

        thread = threading.Thread(target=fit, daemon=True)
        thread.start()
        while (item := self.queue.get()) is not None:
            metrics, checkpoint = item
            ray.tune.report(metrics, checkpoint=checkpoint)
        thread.join()
        if failure:
            raise failure[0]
