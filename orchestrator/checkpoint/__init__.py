"""The checkpoint format and reading a run's checkpoints: what train, eval and finetune share.

format.py writes and reads one checkpoint (``state.pt``); runs.py lists a run's checkpoints, newest first.
The restore policy of a training run (which checkpoint a restarted group resumes from) is
orchestrator/train/checkpoints.py.
"""
