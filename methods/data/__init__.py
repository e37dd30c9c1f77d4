"""Task data: real benchmarks (GLUE, GSM8K) from the hub or local files, and the split protocols.

Every source is turned into the same thing: train / validation / test lists of JSON rows whose
fields are those of the task's ``TaskSpec`` (the Hugging Face dataset's field names), written as
jsonl by the workflow's ``task_data`` rule; nothing downstream knows where a task came from.
"""
