"""Pretraining, in the order a run uses it: trainer.py (`train_and_evaluate`, read top to bottom as the run
happens), steps.py (the train state; the jitted train and eval steps), losses.py, optim.py,
checkpointing.py, metric_writer.py."""
