"""What runs in Ray Train's controller actor: how the datasets are split between the workers, and
the callbacks that relay each epoch's report to the terminal or to Tune. This module imports no
torch (nor raytrain's models): the controller unpickles these, and every trial starts a controller.
"""
from __future__ import annotations

import threading

import ray
import ray.train
import ray.tune
from ray.train import DataConfig

from raytrain.console import epoch_line


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
            dataset = dataset.copy(dataset)
            options = self._resolve_execution_options(name)  # a copy: the driver's stay as they are
            options.preserve_order = self.preserve_order
            dataset.context.execution_options = options
            for rank, split in enumerate(dataset.streaming_split(world_size, equal=(name != "val"))):
                output[rank][name] = split
        return output


class EpochLines(ray.train.UserCallback):
    """Runs in Ray Train's controller actor, whose prints never reach the terminal: it sends its lines
    through a Ray queue to a thread in the driver."""

    def __init__(self, label: str, epochs: int):
        from ray.util.queue import Queue

        self.label, self.epochs = label, epochs
        self.queue = Queue(actor_options={"num_cpus": 0})

    def after_report(self, run_context, metrics, checkpoint):
        self.queue.put(epoch_line(self.label, metrics[0], self.epochs))

    def print_lines_until(self, done: threading.Event) -> threading.Thread:
        from ray.util.queue import Empty

        def pump():
            while not done.is_set() or not self.queue.empty():
                try:
                    print(self.queue.get(timeout=0.5), flush=True)
                except Empty:
                    continue

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        return thread


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
        epoch = metrics[0]["epoch"]
        # PBT's epochs, except the last, where _PopulationBasedTraining leaves trials alone.
        relay = checkpoint is not None and self.checkpoint_every and epoch % self.checkpoint_every == 0 and epoch < self.epochs
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
