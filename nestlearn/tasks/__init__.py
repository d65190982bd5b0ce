"""Data and tasks: byte-level LM, synthetic recall (MQAR, NIAH), formal languages, continual streams.

Every task yields ``Batch(inputs [B, T] long, targets [B, T] long, mask [B, T] float)`` over a
256-byte vocabulary; ``task.batch_at(step, batch, seq_len, seed)`` is a pure function, so a run
resumed at step k sees exactly the batches k, k+1, ... . This package imports nothing else from
nestlearn.
"""

from .base import PAD, Batch, BatchStream, Task, TaskError, masked_cross_entropy
from .continual import ContinualTask, domain_perf, forgetting_percent, loss_increase
from .corpus import Corpus, Span, load_corpus, stdlib_corpus
from .formal import LANGUAGES, FormalTask, Language
from .registry import get_task, register_task, task_names, task_options
from .synthetic import MQARTask, NIAHTask, accuracy_by_length
from .text import CorpusLM, LMTask

__all__ = [
    "PAD", "Batch", "BatchStream", "Task", "TaskError", "masked_cross_entropy",
    "ContinualTask", "domain_perf", "forgetting_percent", "loss_increase", "Corpus", "Span", "load_corpus", "stdlib_corpus",
    "LANGUAGES", "FormalTask", "Language", "get_task", "register_task", "task_names", "task_options",
    "MQARTask", "NIAHTask", "accuracy_by_length", "CorpusLM", "LMTask",
]
