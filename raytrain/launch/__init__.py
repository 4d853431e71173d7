"""The Ray Train and Ray Tune glue, and the only place that builds trainers and tuners.

    session.py   Ray itself: join the cluster or start a local one; errors from inside Ray
    trainer.py   run_training: one TorchTrainer run of N DDP workers in an experiment directory
    tuner.py     run_search: a Tuner whose every trial is such a run, over config.search.space
    tracking.py  MLflow, as Ray Train and Tune callbacks
"""
